"""One model's worker: its requests' streams stepped by engines in threads of their own, many
characters a tick.

A request is a `Job`: its streams (one per sample) share one start text, primed once per engine
(`engine.Prefix`) and a bounded piece per tick, so that a long start text never holds up the
streams already running; requests with the same start text share its primed state too (a small
cache per engine). A request that fails, while its streams are added or stepped, ends alone with
its own error; the others go on in the same engine. A job's slots are released as soon as its
generation ends, however it ends, whether or not its client has read the text yet.

The streams are shared among `Shard`s, one per core where the compiled kernels run: each is an
engine and a thread that steps it. Each tick makes one engine call that draws many characters for
every stream of the shard, as many as fit in `tick_seconds` at the speed measured for a batch of
that size (`Pace`), so that a new request still joins within a tick while what surrounds a call
(adding streams, the stop rules, decoding) is paid once per tick instead of once per character.
The compiled kernels hold no Python lock while they run; the shard hands each call's text to the
event loop, which feeds the jobs and keeps admitting and answering requests meanwhile. A client
is woken for its text at once for its first, then at most every `chunk_seconds`
(`Job.publish`): an event costs a write to the socket and a pass through the ASGI layers, so
fewer, larger chunks leave more of the machine to the model.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable

from charlstm.generate.engine import Engine, Prefix, StepOutput, runs_compiled
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
        self.prefixes: dict[int, Prefix] = {}  # per shard index: that shard's primed start text
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
            self.prefix, self.prefixes = None, {}  # its primed state is not needed any more
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


class Shard:
    """One engine and the thread that steps it: its own rows of the model's batch.

    The thread owns the engine and `running`; the event loop appends streams to `inbox` (a deque:
    its appends and pops are atomic) and wakes the thread; the thread reads whether a job is
    `done` (a job that failed, timed out or lost its client leaves before the next call) and
    hands each call's text, and any request's failure, to its `ModelWorker` on the loop."""

    def __init__(self, worker: "ModelWorker", index: int, threads: int | None) -> None:
        self.worker = worker
        self.index = index
        self.threads = threads  # for `Engine`: 1 where the worker has one shard per core
        self.engine = self._new_engine()
        self.pace = Pace(worker.max_chars)
        self.inbox: deque[tuple[Job, int]] = deque()  # streams not yet in the engine
        self.running: dict[int, tuple[Job, int]] = {}  # engine stream id → (job, sample index)
        self.prefixes: OrderedDict[bytes, Prefix] = OrderedDict()  # the loop's: primed starts
        self.assigned = 0  # the loop's: streams given to this shard that have not left it
        self.max_batch = worker.max_batch  # rows at most
        self.peak_active = 0  # the largest batch a step has seen (shows that requests share it)
        self.steps = 0  # engine steps (characters per running stream) so far
        self.calls = 0  # engine calls so far
        self.step_seconds = 1e-3  # moving average of one step's time, for Retry-After
        self.fewest_left = 1  # characters left to the running stream nearest its end
        self.work = threading.Event()  # set when the thread has something new to look at
        self.stopping = False
        self.thread: threading.Thread | None = None

    def _new_engine(self) -> Engine:
        m = self.worker.model
        return Engine(m.model, m.vocab.decode, m.device, threads=self.threads)

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.stopping = False
            name = f"charlstm-engine-{self.worker.name}-{self.index}"
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Stop the thread (after the call under way) and start over with an empty engine."""
        thread, self.thread = self.thread, None
        if thread is not None:
            self.stopping = True
            self.work.set()
            thread.join()
        self.inbox.clear()
        self.running.clear()
        self.engine = self._new_engine()

    def prefix(self, prefix: Prefix) -> Prefix:
        """On the loop: this shard's `Prefix` of this start text: one already primed (or being
        primed) for an earlier request, else `prefix`, kept for later ones (the least recently
        used go)."""
        key = prefix.prompt.tobytes()
        known = self.prefixes.pop(key, None)
        if known is not None and (known.owner in (None, self.engine)):
            prefix = known
        self.prefixes[key] = prefix
        while len(self.prefixes) > PREFIX_CACHE:
            self.prefixes.popitem(last=False)
        return prefix

    def forget(self, prefix: Prefix) -> None:
        """On the loop: a start text failed to prime; the next request with it starts over."""
        key = prefix.prompt.tobytes()
        if self.prefixes.get(key) is prefix:
            del self.prefixes[key]

    def _run(self) -> None:
        if self.threads == 1 and self.engine.compiled:
            try:
                kernels_single_threaded()
            except Exception:  # its calls then go through the kernels' worker threads: slower
                log.exception(
                    "model %s: an engine thread could not run single-threaded", self.worker.name
                )
        while True:
            self.work.clear()
            if self.stopping:
                return
            if not (self.inbox or self.running):
                self.work.wait()
                continue
            try:
                self.tick()
            except Exception:  # the engine itself failed (one request's failure ends alone)
                log.exception(
                    "engine of model %s failed; its requests end with an error", self.worker.name
                )
                self.inbox.clear()
                self.running.clear()
                self.engine = self._new_engine()
                self.worker.post(self.worker.fail_shard, self, "internal", FAILED)

    def tick(self) -> None:
        """One tick, in the shard's thread: drop the streams of jobs that are done, prime the
        joining streams' start texts (oldest request first, at most `prime_chars` characters and
        half a tick's time), add the streams whose start text is primed, then one engine call of
        as many characters per stream as fit in a tick (`Pace`), and before the earliest deadline
        of a running request where that leaves one or more; then hand the text to the loop.

        The compiled kernels hold no Python lock while they run, so the loop and the other shards
        go on meanwhile; the rest of the tick (the batch's bookkeeping, decoding, stop rules)
        takes Python's lock in turn with them."""
        worker, engine = self.worker, self.engine
        for sid, (job, _) in list(self.running.items()):
            if job.done:  # failed, timed out or closed: its streams leave now
                del self.running[sid]
                engine.cancel(sid)
        joining: list[tuple[Job, int, Prefix]] = []
        room = self.max_batch - len(self.running)
        while room > len(joining) and self.inbox:
            job, i = self.inbox.popleft()
            prefix = job.prefixes.get(self.index)
            if not job.done and prefix is not None:  # else it ended while it waited
                joining.append((job, i, prefix))
        start = time.perf_counter()
        prefixes = list({id(p): p for _, _, p in joining}.values())
        failed: dict[int, Exception] = {}  # id(prefix) → why priming it failed
        if any(not _primed(p, engine) for p in prefixes):
            failed = self._prime(engine, prefixes)
        priming = time.perf_counter() - start
        later: list[tuple[Job, int]] = []
        gone: set[Job] = set()  # jobs that failed to join in this tick
        for job, i, prefix in joining:
            if job in gone:
                continue
            try:
                if id(prefix) in failed:
                    raise failed[id(prefix)]
                if not _primed(prefix, engine):
                    later.append((job, i))
                    continue
                sid = engine.add(job.requests[i], prefix)
            except Exception as exc:  # noqa: BLE001 - this request's own failure ends it alone
                gone.add(job)
                worker.post(worker.fail_alone, job, "could not add a stream of", exc)
                continue
            self.running[sid] = (job, i)
        for prefix in (p for p in prefixes if id(p) in failed):
            worker.post(self.forget, prefix)
        self.inbox.extendleft(reversed(later))
        if not engine.active:
            return
        # Start texts that wait for the next tick get as much time as this one's priming took.
        budget = min(priming, worker.tick_seconds) if later else worker.tick_seconds
        deadline = min((job.deadline for job, _ in self.running.values()), default=math.inf)
        rows = engine.active
        self.peak_active = max(self.peak_active, rows)
        now = time.perf_counter()
        call = engine.begin_step(self.pace.chars(rows, min(budget, deadline - now)))
        call.run()
        seconds = time.perf_counter() - now
        outputs = engine.finish_step(call)
        drawn = max((o.drawn for o in outputs.values()), default=0)
        self.pace.record(rows, drawn, seconds)
        self.calls += 1
        self.steps += drawn
        if drawn:
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * seconds / drawn
        delivered = []
        for sid, out in outputs.items():
            entry = self.running.get(sid)
            if entry is None:
                continue
            if out.finished:
                del self.running[sid]
            delivered.append((*entry, out))
        left = [engine.streams[sid] for sid in self.running if sid in engine.streams]
        self.fewest_left = min((s.request.length - s.drawn for s in left), default=1)
        worker.post(worker.deliver, delivered)

    def _prime(self, engine: Engine, prefixes: list[Prefix]) -> dict[int, Exception]:
        """Run the start texts through the model, in order, a piece at a time, until
        `prime_chars` characters or half a tick's time are spent; returns {id(prefix): the
        exception} for those that failed."""
        start = time.perf_counter()
        budget = self.worker.prime_chars
        failed: dict[int, Exception] = {}
        for prefix in prefixes:
            try:
                while not _primed(prefix, engine) and budget > 0:
                    if time.perf_counter() - start >= self.worker.tick_seconds / 2:
                        return failed
                    budget -= engine.prime(prefix, min(budget, PRIME_PIECE))
            except Exception as exc:  # noqa: BLE001 - the requests of this start text end alone
                failed[id(prefix)] = exc
        return failed


class ModelWorker:
    """Runs one model: requests in, text out to each `Job`, on the event loop; the model's
    steps in `Shard`s, each an engine with a thread of its own.

    The shards step their engines while the loop sends the text already drawn, and a call never
    waits for the loop to get round to it. A server has one shard per core where the compiled
    kernels run (`charlstm serve`): each steps its own rows in its own thread, so that no call
    waits for another thread's block of rows (a call split over threads ends with its slowest
    block, and hands Python's lock back and forth to start and end each one: at 64 streams of the
    lab model, the threads of a split call were idle for half of it while the event loop ran).
    A request goes to the shard with the fewest streams (`Shard.assigned`, counted on the loop: a
    shard's own `running` and `inbox` change under the loop's feet while its thread adds
    streams), its samples spread over several only when it does not fit in that one."""

    def __init__(
        self,
        model: TextModel,
        name: str,
        max_batch: int,
        tick_seconds: float,
        prime_chars: int = PRIME_CHARS,
        max_chars: int = MAX_CHARS,
        chunk_seconds: float = CHUNK_SECONDS,
        shards: int = 1,
    ) -> None:
        self.model = model
        self.name = name
        self.tick_seconds = tick_seconds  # the engine's time per call, about (see `Pace`)
        self.prime_chars = prime_chars  # start-text characters primed per tick, at most
        self.max_chars = max_chars
        self.chunk_seconds = chunk_seconds  # text waits this long at most to go out (`Job.publish`)
        compiled = runs_compiled(model.model, model.device)
        n = max(1, min(shards, max_batch)) if compiled else 1
        self.max_batch = -(-max_batch // n)  # rows per shard
        # one shard: its engine's calls on every core; several: each single-threaded
        self.shards = [Shard(self, i, 1 if n > 1 else None) for i in range(n)]
        self.jobs: set[Job] = set()
        self._timers: dict[Job, asyncio.TimerHandle] = {}  # each job's time limit
        self._homes: dict[Job, list[Shard | None]] = {}  # each stream's shard, until it leaves
        self._loop: asyncio.AbstractEventLoop | None = None
        self.warm_up_seconds: float | None = None  # set by `warm_up` (the server's start-up)

    # What the shards did, all together (the server's health figures and the tests read them).
    @property
    def engine(self) -> Engine:
        """The first shard's engine (the only one, unless the worker has one shard per core)."""
        return self.shards[0].engine

    @property
    def active(self) -> int:
        return sum(s.engine.active for s in self.shards)

    @property
    def peak_active(self) -> int:
        return max(s.peak_active for s in self.shards)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.shards)

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.shards)

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
        """Start the shards' threads (on the event loop that will receive their text)."""
        self._loop = asyncio.get_running_loop()
        for shard in self.shards:
            shard.start()

    async def stop(self) -> None:
        for shard in self.shards:
            await asyncio.to_thread(shard.stop)  # waits for the call under way, at most
        self._fail_all(self.jobs, "shutdown", "the server is shutting down")

    def submit(self, job: Job) -> None:
        self.start()
        assert self._loop is not None
        n = len(job.requests)
        fewest = min(self.shards, key=lambda s: s.assigned)
        if fewest.assigned + n <= self.max_batch:  # it fits in one: its start text primed once
            homes = [fewest] * n
        else:  # spread its streams, each to the shard with the fewest
            homes = []
            for _ in job.requests:
                homes.append(min(self.shards, key=lambda s: s.assigned + homes.count(s)))
        for shard in homes:
            shard.assigned += 1
        assert job.prefix is not None
        for shard in dict.fromkeys(homes):
            job.prefixes[shard.index] = shard.prefix(job.prefix)
        self.jobs.add(job)
        self._homes[job] = list(homes)
        self._timers[job] = self._loop.call_later(
            max(0.0, job.deadline - time.perf_counter()), self._time_out, job
        )
        for i, shard in enumerate(homes):
            shard.inbox.append((job, i))
        for shard in dict.fromkeys(homes):
            shard.work.set()

    def drop(self, job: Job) -> None:
        """The job is done: its streams leave the batch before their shards' next call (each
        thread sees `job.done`), and its waiting ones are skipped."""
        self.jobs.discard(job)
        timer = self._timers.pop(job, None)
        if timer is not None:
            timer.cancel()
        for i in range(len(self._homes.get(job, ()))):
            shard = self._leave(job, i)
            if shard is not None:
                shard.work.set()
        self._homes.pop(job, None)

    def _leave(self, job: Job, i: int) -> "Shard | None":
        """Stream i of `job` has left its shard (finished, or its job is done): one fewer there."""
        homes = self._homes.get(job)
        shard = homes[i] if homes else None
        if shard is not None:
            shard.assigned -= 1
            homes[i] = None
        return shard

    def seconds_until_free(self) -> float:
        """A guess at when the first running stream ends, for Retry-After."""
        return min(s.fewest_left * s.step_seconds for s in self.shards)

    def post(self, callback: Callable, *args) -> None:
        """From a shard's thread: run `callback(*args)` on the event loop."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
            loop.call_soon_threadsafe(callback, *args)

    # On the event loop, from here on.

    def deliver(self, delivered: list[tuple[Job, int, StepOutput]]) -> None:
        """Hand each stream's text to its job (fail the request of a stream that failed, and the
        requests past their deadline: text drawn after it is not theirs to send), then wake the
        clients whose text should go out (`Job.publish`)."""
        now = time.perf_counter()
        fed = {}  # the jobs that got text, once each, in order
        for job, i, out in delivered:
            if out.finished:
                self._leave(job, i)
            if job.done:  # it ended while the engine drew this
                continue
            if now > job.deadline:
                self._time_out(job)
            elif out.error is None:
                job.feed(i, out.text, out.finished, out.drawn)
                fed[job] = None
            else:
                self.fail_alone(job, "failed on a stream of", out.error)
        for job in fed:
            job.publish(self.chunk_seconds)

    def fail_alone(self, job: Job, what: str, error: Exception) -> None:
        """End one request with an error (its other streams leave the batch: `drop`)."""
        if not job.done:
            log.error(
                "model %s %s a request; that request ends with an error",
                self.name,
                what,
                exc_info=error,
            )
        job.fail("internal", FAILED)

    def fail_shard(self, shard: Shard, kind: str, message: str) -> None:
        """A shard's engine failed: fail its requests (its thread has started over)."""
        shard.prefixes.clear()
        self._fail_all([j for j, homes in self._homes.items() if shard in homes], kind, message)

    def _fail_all(self, jobs, kind: str, message: str) -> None:
        for job in list(jobs):
            job.fail(kind, message)
            self.drop(job)

    def _time_out(self, job: Job) -> None:
        if job.done:
            return
        limit = job.deadline - job.started
        job.fail(
            "time_limit",
            f"the generation ran past its time limit of {limit:g} s; "
            "ask for fewer characters or try again when the server is less busy",
        )
        self.drop(job)


def kernels_single_threaded() -> None:
    """`kernels.single_threaded` for the calling thread (a shard's, which steps its rows itself)."""
    from charlstm.generate.kernels import single_threaded

    single_threaded()


def _primed(prefix: Prefix, engine: Engine) -> bool:
    """Whether `prefix` is all primed, by this engine (after a reset, its state is stale)."""
    return prefix.complete and prefix.owner is engine
