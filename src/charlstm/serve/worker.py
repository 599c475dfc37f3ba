"""One model's engine worker: continuous batching of every request's streams, one step at a time.

A request is a `Job`: its streams (one per sample) share one start text, primed once
(`engine.Prefix`) and a bounded piece per tick, so that a long start text never holds up the
streams already running. A request that fails, while its streams are added or stepped, ends alone
with its own error; the others go on in the same engine. A job's slots are released as soon as
its generation ends, however it ends, whether or not its client has read the text yet.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from charlstm.generate.engine import Engine, Prefix
from charlstm.generate.engine import Request as EngineRequest
from charlstm.generate.textmodel import TextModel
from charlstm.serve.schemas import GenerateResponse, GenerationFailed, Timing

log = logging.getLogger("charlstm.server")

# Characters of start text primed per tick, at most (and at most half a tick's time): the lab model
# primes about 250 k characters a second on one core, so about 4 ms.
PRIME_CHARS = 1024
PRIME_PIECE = 256  # characters per call of `Engine.prime`: the time limit is checked between calls
FAILED = "the model failed while generating; the server logged the cause"


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

    def feed(self, index: int, text: str, finished: bool) -> None:
        self.drawn[index] += 1
        if text:
            self.generated[index] += text
            self.pending[index] = self.pending.get(index, "") + text
        if finished:
            cut = len(self.generated[index]) < self.drawn[index]
            length = self.requests[index].length
            self.finish_reasons[index] = "stop" if cut or self.drawn[index] < length else "length"
        self.changed.set()
        self._settle()

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
                out, self.pending = self.pending, {}
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
    """Runs one model's engine: streams join between steps, text goes back to each `Job`.

    Only `_tick` touches the engine, and it runs in one worker thread at a time; everything else
    runs on the event loop, so no lock is needed."""

    def __init__(
        self,
        model: TextModel,
        name: str,
        max_batch: int,
        tick_seconds: float,
        prime_chars: int = PRIME_CHARS,
    ) -> None:
        self.model = model
        self.name = name
        self.max_batch = max_batch
        self.tick_seconds = tick_seconds
        self.prime_chars = prime_chars  # start-text characters primed per tick, at most
        self.engine = Engine(model.model, model.vocab.decode, model.device)
        self.jobs: set[Job] = set()
        self.waiting: deque[tuple[Job, int]] = deque()  # streams not yet in the engine
        self.running: dict[int, tuple[Job, int]] = {}  # engine stream id → (job, sample index)
        self.to_cancel: list[int] = []
        self.peak_active = 0  # the largest batch a step has seen (shows that requests share it)
        self.steps = 0
        self.step_seconds = 1e-3  # moving average, for Retry-After
        self._news = threading.Event()  # ends a tick early: someone joined or left
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
        self.jobs.add(job)
        self.waiting.extend((job, i) for i in range(len(job.requests)))
        self._poke()

    def drop(self, job: Job) -> None:
        """Take a job's streams out of the batch at the next step boundary."""
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
        self._news.set()
        if self._wake is not None:
            self._wake.set()

    def _expire(self) -> None:
        now = time.perf_counter()
        for job in [j for j in self.jobs if now > j.deadline]:
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
            room = self.max_batch - len(self.running)
            joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            cancels, self.to_cancel = self.to_cancel, []
            self._news.clear()
            try:
                added, steps = await asyncio.to_thread(self._tick, joining, cancels)
            except Exception:  # the engine itself failed (one request's failure ends in _tick)
                log.exception(
                    "engine of model %s failed; its requests end with an error", self.name
                )
                self._reset("internal", FAILED)
                continue
            self._deliver(joining, added, steps)

    def _deliver(self, joining: list[tuple[Job, int]], added: list, steps: list) -> None:
        """On the event loop: record the new streams (put back those whose start text is still
        being primed, fail the requests that could not join), then hand each step's text to its
        job (fail the request of a stream that failed)."""
        later = []
        for (job, i), result in zip(joining, added):
            if result is None:  # its start text is not all primed yet
                later.append((job, i))
            elif isinstance(result, Exception):
                self._fail_alone(job, "could not add a stream of", result)
            elif job in self.jobs:
                self.running[result] = (job, i)
                job.sids.append(result)
            else:  # its client left, or the request failed, while the stream was being added
                self.to_cancel.append(result)
        self.waiting.extendleft(reversed([e for e in later if e[0] in self.jobs]))
        for outputs in steps:
            for sid, out in outputs.items():
                entry = self.running.get(sid)
                if entry is None:
                    continue
                job, i = entry
                if out.finished:
                    del self.running[sid]
                if out.error is None:
                    job.feed(i, out.text, out.finished)
                else:
                    self._fail_alone(job, "failed on a stream of", out.error)

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

    def _tick(self, joining: list[tuple[Job, int]], cancels: list[int]) -> tuple[list, list]:
        """In the worker thread: apply leaves, prime start texts (oldest request first, at most
        `prime_chars` characters and half a tick's time), add the streams whose start text is
        primed, then step until there is news or the tick's time is up. Returns, per joining
        stream, its id, None (its start text is not primed yet) or the exception that kept it out;
        and each step's outputs."""
        engine = self.engine
        for sid in cancels:
            engine.cancel(sid)
        start = time.perf_counter()
        budget = self.prime_chars
        added: list = []
        failed: dict[int, Exception] = {}  # id(job) → why it could not join
        for job, i in joining:
            prefix = job.prefix
            try:
                if id(job) in failed:
                    raise failed[id(job)]
                if prefix is None:  # the job ended while it waited
                    added.append(None)
                    continue
                while not _primed(prefix, engine) and budget > 0:
                    if time.perf_counter() - start >= self.tick_seconds / 2:
                        budget = 0
                        break
                    budget -= engine.prime(prefix, min(budget, PRIME_PIECE))
                if not _primed(prefix, engine):
                    added.append(None)
                    continue
                added.append(engine.add(job.requests[i], prefix))
            except Exception as exc:  # noqa: BLE001 - this request's own failure ends it alone
                failed[id(job)] = exc
                added.append(exc)
        priming = time.perf_counter() - start
        unprimed = any(a is None for a in added)
        steps = []
        start = time.perf_counter()
        while engine.active:
            self.peak_active = max(self.peak_active, engine.active)
            steps.append(engine.step())
            elapsed = time.perf_counter() - start
            if self._news.is_set() or elapsed >= self.tick_seconds:
                break
            if unprimed and elapsed >= priming:  # start texts wait: share the time with them
                break
        if steps:
            self.steps += len(steps)
            per_step = (time.perf_counter() - start) / len(steps)
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * per_step
        return added, steps

    def _reset(self, kind: str, message: str) -> None:
        """Fail every request and start again with an empty engine."""
        for job in list(self.jobs):
            job.fail(kind, message)
        self.jobs.clear()
        self.waiting.clear()
        self.running.clear()
        self.to_cancel.clear()
        self.engine = Engine(self.model.model, self.model.vocab.decode, self.model.device)


def _primed(prefix: Prefix, engine: Engine) -> bool:
    """Whether `prefix` is all primed, by this engine (after a reset, its state is stale)."""
    return prefix.complete and prefix.owner is engine
