"""One model's engine worker: every request's streams in one batch, many characters a tick.

A request is a `Job`: its streams (one per sample) share one start text, primed once
(`engine.Prefix`) and a bounded piece per tick, so that a long start text never holds up the
streams already running; requests with the same start text share its primed state too (a small
cache per worker). A request that fails, while its streams are added or stepped, ends alone with
its own error; the others go on in the same engine. A job's slots are released as soon as its
generation ends, however it ends, whether or not its client has read the text yet.

Each tick makes one engine call that draws many characters for every running stream, as many
as fit in `tick_seconds` at the speed measured for a batch of that size (`Pace`), so that a new
request still joins within a tick while what surrounds a call (the hand-over, the stop rules, the
events) is paid once per tick instead of once per character. The call's model work runs in a
thread (the compiled kernels hold no Python lock while they run), everything else on the event
loop, which keeps admitting and answering requests meanwhile. A client is woken for its text at
once for its first, then at most every `chunk_seconds` (`Job.publish`): an event costs a write to
the socket and a pass through the ASGI layers, so fewer, larger chunks leave more of the machine
to the model.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable

from charlstm.generate.engine import Engine, Prefix, StepOutput
from charlstm.generate.engine import Request as EngineRequest
from charlstm.generate.textmodel import TextModel
from charlstm.serve.schemas import GenerateResponse, GenerationFailed, Timing

log = logging.getLogger("charlstm.server")

# Characters of start text primed per tick, at most (and at most half a tick's time): the lab model
# primes about 250 k characters a second on one core, so about 4 ms.
PRIME_CHARS = 1024
PRIME_PIECE = 256  # characters per call of `Engine.prime`: the time limit is checked between calls
# Characters per stream in one engine call, at most: past this a call gains nothing on the Python
# around it, and a stream that stops early (a stop string) wastes the rest of its call.
MAX_CHARS = 256
PREFIX_CACHE = 64  # primed start texts a worker keeps for later requests with the same one
CHUNK_SECONDS = 0.05  # how long a stream's text may wait to be sent after its first (`publish`)
FAILED = "the model failed while generating; the server logged the cause"


class Pace:
    """How long one engine step (one character for every row) takes, by batch size, measured on
    the calls the worker makes: an average per power-of-two bucket of rows, since a step of 64 rows
    costs far more than one of 2 and the per-row and batched kernels differ in kind. `chars(n, s)`
    is how many characters per stream fit in `s` seconds at `n` rows."""

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        self.max_chars = max_chars
        self.seconds: dict[int, float] = {}  # bucket → seconds per step

    @staticmethod
    def bucket(rows: int) -> int:
        return max(1, rows).bit_length()

    def step_seconds(self, rows: int) -> float | None:
        """The measured seconds of a step of `rows`, from their bucket, else a cautious guess from
        the nearest measured one until this bucket has its own: a larger batch's time as it is (a
        step of fewer rows costs no more), a smaller one's doubled per doubling of the rows."""
        b = self.bucket(rows)
        if b in self.seconds:
            return self.seconds[b]
        if not self.seconds:
            return None
        near = min(self.seconds, key=lambda k: (abs(k - b), -k))
        return self.seconds[near] * 2.0 ** max(0, b - near)

    def chars(self, rows: int, seconds: float) -> int:
        per_step = self.step_seconds(rows)
        if per_step is None:  # nothing measured yet: a short first call, to measure
            return 1
        return max(1, min(self.max_chars, int(seconds / per_step)))

    def record(self, rows: int, steps: int, seconds: float) -> None:
        if steps < 1:
            return
        b, per_step = self.bucket(rows), seconds / steps
        old = self.seconds.get(b)
        self.seconds[b] = per_step if old is None else 0.7 * old + 0.3 * per_step


# ---------------------------------------------------------------------------------------- jobs


class Job:
    """One request's streams: the text the worker has produced for them, and how each ended.

    `on_close(job)` runs once, as soon as the job is done (finished, failed, or closed because its
    client left): it releases the job's slots."""

    def __init__(
        self,
        requests: list[EngineRequest],
        start_text: str,
        seed: int,
        deadline: float,
        on_close: Callable[["Job"], None],
    ) -> None:
        n = len(requests)
        self.requests = requests
        self.start_text = start_text
        self.seed = seed
        self.deadline = deadline
        self.generated = [""] * n
        self.drawn = [0] * n  # characters drawn per stream (text may be shorter after a stop cut)
        self.finish_reasons: list[str | None] = [None] * n
        self.pending: dict[int, str] = {}  # text not yet handed to the client
        self.pending_since: float | None = None  # when the oldest of it was drawn
        self.told = False  # whether the client has been woken for text yet (`publish`)
        self.error: GenerationFailed | None = None
        self.sids: list[int] = []
        self.prefix: Prefix | None = Prefix(requests[0].prompt)  # the samples' one start text
        self.closed = False
        self.released = False
        self.changed = asyncio.Event()
        self.started = time.perf_counter()
        self.first_chunk: float | None = None
        self._on_close = on_close

    @property
    def done(self) -> bool:
        return self.error is not None or all(r is not None for r in self.finish_reasons)

    def feed(self, index: int, text: str, finished: bool, drawn: int = 1) -> None:
        """Stream `index` drew `drawn` more characters, of which `text` is its client's (a stop
        rule may cut or hold back the rest); `publish` then wakes the client for it."""
        self.drawn[index] += drawn
        if text:
            self.generated[index] += text
            self.pending[index] = self.pending.get(index, "") + text
            if self.pending_since is None:
                self.pending_since = time.perf_counter()
        if finished:
            cut = len(self.generated[index]) < self.drawn[index]
            length = self.requests[index].length
            self.finish_reasons[index] = "stop" if cut or self.drawn[index] < length else "length"
        self._settle()

    def publish(self, hold: float = 0.0) -> None:
        """Wake the client for the text fed so far when it is its first, when the job is over, or
        when the oldest of it has waited `hold` seconds: text goes out in chunks of about `hold`
        seconds' worth, so that the cost of an event (a write to the socket, the layers of the
        ASGI stack) is paid once per chunk, while a new request still sees its first text at
        once."""
        if self.done or (
            self.pending and (not self.told or time.perf_counter() - self.pending_since >= hold)
        ):
            self.told = True
            self.changed.set()

    def fail(self, kind: str, message: str) -> None:
        if not self.done:
            self.error = GenerationFailed(kind, message)
            self.changed.set()
        self._settle()

    def close(self) -> None:
        """The response is over (sent, or its client left): stop generating if it still is."""
        if not self.closed:
            self.closed = True
            self.fail("cancelled", "the request was closed before its text was complete")

    def _settle(self) -> None:
        if self.done and not self.released:
            self.released = True
            self.prefix = None  # its primed state is not needed any more
            self._on_close(self)

    async def chunks(self) -> AsyncIterator[dict[int, str]]:
        """{sample index: new text} as the worker produces it; raises `GenerationFailed`."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.pending:
                out, self.pending, self.pending_since = self.pending, {}, None
                if self.first_chunk is None:
                    self.first_chunk = time.perf_counter()
                yield out
            if self.error is not None:
                raise self.error
            if self.done:
                return

    def response(self, model: str) -> GenerateResponse:
        now = time.perf_counter()
        chars = sum(len(g) for g in self.generated)
        total = now - self.started
        first = None if self.first_chunk is None else (self.first_chunk - self.started) * 1e3
        return GenerateResponse(
            model=model,
            samples=[self.start_text + g for g in self.generated],
            finish_reasons=[r or "length" for r in self.finish_reasons],
            seed=self.seed,
            timing=Timing(
                first_chunk_ms=first,
                total_ms=total * 1e3,
                characters=chars,
                chars_per_second=chars / total if total > 0 else 0.0,
            ),
        )


# ---------------------------------------------------------------------------------------- workers


class ModelWorker:
    """Runs one model's engine: streams join between ticks, text goes back to each `Job`.

    Everything runs on the event loop but the model's work in `_tick`, which the loop awaits
    without touching the engine meanwhile, so no lock is needed."""

    def __init__(
        self,
        model: TextModel,
        name: str,
        max_batch: int,
        tick_seconds: float,
        prime_chars: int = PRIME_CHARS,
        max_chars: int = MAX_CHARS,
        chunk_seconds: float = CHUNK_SECONDS,
    ) -> None:
        self.model = model
        self.name = name
        self.max_batch = max_batch
        self.tick_seconds = tick_seconds  # the engine's time per tick, about (see `Pace`)
        self.prime_chars = prime_chars  # start-text characters primed per tick, at most
        self.chunk_seconds = chunk_seconds  # text waits this long at most to go out (`Job.publish`)
        self.pace = Pace(max_chars)
        self.engine = Engine(model.model, model.vocab.decode, model.device)
        self.jobs: set[Job] = set()
        self.waiting: deque[tuple[Job, int]] = deque()  # streams not yet in the engine
        self.running: dict[int, tuple[Job, int]] = {}  # engine stream id → (job, sample index)
        self.to_cancel: list[int] = []
        self.prefixes: OrderedDict[bytes, Prefix] = OrderedDict()  # start text → its primed state
        self.peak_active = 0  # the largest batch a step has seen (shows that requests share it)
        self.steps = 0  # engine steps (characters per running stream) so far
        self.calls = 0  # engine calls so far
        self.step_seconds = 1e-3  # moving average of one step's time, for Retry-After
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.warm_up_seconds: float | None = None  # set by `warm_up` (the server's start-up)

    def warm_up(self) -> None:
        """Load the engine's compiled kernels and run them once on this model, before the worker
        takes requests (`Engine.warm_up`; free on the reference path, milliseconds once numba's
        cache holds the kernels). A failure is logged, not raised: the server still starts, and a
        broken engine fails each request with an error as it would have anyway."""
        try:
            self.warm_up_seconds = self.engine.warm_up()
        except Exception:  # see the docstring: the server starts anyway, with the cause logged
            log.exception("warming up the engine of model %s failed", self.name)
            return
        if self.engine.compiled:
            log.info(
                "model %s: generation kernels ready in %.2f s", self.name, self.warm_up_seconds
            )

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"engine {self.name}"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._reset("shutdown", "the server is shutting down")

    def submit(self, job: Job) -> None:
        self.start()
        job.prefix = self._prefix(job.prefix)
        self.jobs.add(job)
        self.waiting.extend((job, i) for i in range(len(job.requests)))
        self._poke()

    def _prefix(self, prefix: Prefix) -> Prefix:
        """The worker's own `Prefix` of this start text: one already primed (or being primed) for
        an earlier request, else `prefix`, kept for later ones (the least recently used go)."""
        key = prefix.prompt.tobytes()
        known = self.prefixes.pop(key, None)
        if known is not None and (known.owner in (None, self.engine)):
            prefix = known
        self.prefixes[key] = prefix
        while len(self.prefixes) > PREFIX_CACHE:
            self.prefixes.popitem(last=False)
        return prefix

    def drop(self, job: Job) -> None:
        """Take a job's streams out of the batch at the next tick."""
        self.jobs.discard(job)
        if any(j is job for j, _ in self.waiting):
            self.waiting = deque(e for e in self.waiting if e[0] is not job)
        for sid in job.sids:
            if self.running.pop(sid, None) is not None:
                self.to_cancel.append(sid)
        self._poke()

    def seconds_until_free(self) -> float:
        """A guess at when the first running stream ends, for Retry-After."""
        remaining = [job.requests[i].length - job.drawn[i] for job, i in self.running.values()]
        return (min(remaining) if remaining else 1) * self.step_seconds

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _expire(self) -> None:
        now = time.perf_counter()
        for job in [j for j in self.jobs if now > j.deadline]:
            self._time_out(job)

    def _time_out(self, job: Job) -> None:
        limit = job.deadline - job.started
        job.fail(
            "time_limit",
            f"the generation ran past its time limit of {limit:g} s; "
            "ask for fewer characters or try again when the server is less busy",
        )
        self.drop(job)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not (self.waiting or self.running or self.to_cancel):
                self._wake.clear()
                await self._wake.wait()
            self._expire()
            try:
                await self._tick()
            except Exception:  # the engine itself failed (one request's failure ends alone)
                log.exception(
                    "engine of model %s failed; its requests end with an error", self.name
                )
                self._reset("internal", FAILED)

    async def _tick(self) -> None:
        """One tick, on the event loop: apply leaves, prime the joining streams' start texts
        (oldest request first, at most `prime_chars` characters and half a tick's time), add the
        streams whose start text is primed, then one engine call of as many characters per
        stream as fit in a tick (`Pace`), and before the earliest deadline of a running request
        where that leaves one or more; then hand each stream's text to its job.

        The model's work (priming, the call's compiled kernels) runs in a thread, outside
        Python's lock where the kernels allow it, while the event loop goes on serving; the rest
        (the batch's bookkeeping, decoding, stop rules) runs here, so that no other thread runs
        Python beside the event loop. Meanwhile nothing else touches the engine: leaves and new
        requests wait in `to_cancel` and `waiting` for the next tick."""
        engine = self.engine
        cancels, self.to_cancel = self.to_cancel, []
        for sid in cancels:
            engine.cancel(sid)
        room = self.max_batch - len(self.running)
        joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        start = time.perf_counter()
        failed: dict[int, Exception] = {}  # id(prefix) → why priming it failed
        prefixes = list({id(j.prefix): j.prefix for j, _ in joining if j.prefix}.values())
        if any(not _primed(p, engine) for p in prefixes):
            failed = await asyncio.to_thread(self._prime, engine, prefixes)
        priming = time.perf_counter() - start
        later = []
        for job, i in joining:
            if job not in self.jobs or job.prefix is None:  # it ended while it waited
                continue
            try:
                if id(job.prefix) in failed:
                    raise failed[id(job.prefix)]
                if not _primed(job.prefix, engine):
                    later.append((job, i))
                    continue
                sid = engine.add(job.requests[i], job.prefix)
            except Exception as exc:  # noqa: BLE001 - this request's own failure ends it alone
                self._fail_alone(job, "could not add a stream of", exc)
                continue
            self.running[sid] = (job, i)
            job.sids.append(sid)
        for prefix in (p for p in prefixes if id(p) in failed):
            self.prefixes.pop(prefix.prompt.tobytes(), None)
        self.waiting.extendleft(reversed(later))
        if not engine.active:
            return
        # Start texts that wait for the next tick get as much time as this one's priming took.
        budget = min(priming, self.tick_seconds) if later else self.tick_seconds
        deadline = min((job.deadline for job, _ in self.running.values()), default=math.inf)
        rows = engine.active
        self.peak_active = max(self.peak_active, rows)
        now = time.perf_counter()
        call = engine.begin_step(self.pace.chars(rows, min(budget, deadline - now)))
        await asyncio.to_thread(call.run)
        seconds = time.perf_counter() - now
        outputs = engine.finish_step(call)
        drawn = max((o.drawn for o in outputs.values()), default=0)
        self.pace.record(rows, drawn, seconds)
        self.calls += 1
        self.steps += drawn
        if drawn:
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * seconds / drawn
        self._deliver(outputs)

    def _prime(self, engine: Engine, prefixes: list[Prefix]) -> dict[int, Exception]:
        """In a thread: run the start texts through the model, in order, a piece at a time, until
        `prime_chars` characters or half a tick's time are spent; returns {id(prefix): the
        exception} for those that failed."""
        start = time.perf_counter()
        budget = self.prime_chars
        failed: dict[int, Exception] = {}
        for prefix in prefixes:
            try:
                while not _primed(prefix, engine) and budget > 0:
                    if time.perf_counter() - start >= self.tick_seconds / 2:
                        return failed
                    budget -= engine.prime(prefix, min(budget, PRIME_PIECE))
            except Exception as exc:  # noqa: BLE001 - the requests of this start text end alone
                failed[id(prefix)] = exc
        return failed

    def _deliver(self, outputs: dict[int, StepOutput]) -> None:
        """Hand each stream's text to its job (fail the request of a stream that failed, and the
        requests past their deadline: text drawn after it is not theirs to send), then wake the
        clients whose text should go out (`Job.publish`)."""
        now = time.perf_counter()
        fed = {}  # the jobs that got text, once each, in order
        for sid, out in outputs.items():
            entry = self.running.get(sid)
            if entry is None:  # its request ended during the call
                continue
            job, i = entry
            if out.finished:
                del self.running[sid]
            if now > job.deadline:
                self._time_out(job)
            elif out.error is None:
                job.feed(i, out.text, out.finished, out.drawn)
                fed[job] = None
            else:
                self._fail_alone(job, "failed on a stream of", out.error)
        for job in fed:
            job.publish(self.chunk_seconds)

    def _fail_alone(self, job: Job, what: str, error: Exception) -> None:
        """End one request with an error (its other streams leave the batch: `drop`)."""
        if not job.done:
            log.error(
                "model %s %s a request; that request ends with an error",
                self.name,
                what,
                exc_info=error,
            )
        job.fail("internal", FAILED)

    def _reset(self, kind: str, message: str) -> None:
        """Fail every request and start again with an empty engine."""
        for job in list(self.jobs):
            job.fail(kind, message)
        self.jobs.clear()
        self.waiting.clear()
        self.running.clear()
        self.to_cancel.clear()
        self.prefixes.clear()
        self.engine = Engine(self.model.model, self.model.vocab.decode, self.model.device)


def _primed(prefix: Prefix, engine: Engine) -> bool:
    """Whether `prefix` is all primed, by this engine (after a reset, its state is stale)."""
    return prefix.complete and prefix.owner is engine
