"""One model's engine worker: continuous batching of every request's streams, one step at a time."""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from charlstm.generate.engine import Engine
from charlstm.generate.engine import Request as EngineRequest
from charlstm.generate.textmodel import TextModel
from charlstm.serve.schemas import GenerateResponse, GenerationFailed, Timing

log = logging.getLogger("charlstm.server")


# ---------------------------------------------------------------------------------------- jobs


class Job:
    """One request's streams: the text the worker has produced for them, and how each ended."""

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
        self.closed = False
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

    def fail(self, kind: str, message: str) -> None:
        if not self.done:
            self.error = GenerationFailed(kind, message)
            self.changed.set()

    def close(self) -> None:
        """The request is over (finished, failed, or its client left): free its slots at once."""
        if not self.closed:
            self.closed = True
            self.fail("cancelled", "the request was closed before its text was complete")
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

    def __init__(self, model: TextModel, name: str, max_batch: int, tick_seconds: float) -> None:
        self.model = model
        self.name = name
        self.max_batch = max_batch
        self.tick_seconds = tick_seconds
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
            requests = [job.requests[i] for job, i in joining]
            try:
                sids, steps = await asyncio.to_thread(self._tick, requests, cancels)
                self._deliver(joining, sids, steps)
            except Exception:  # a bug must fail the requests in flight, not stop the worker
                log.exception(
                    "engine of model %s failed; its requests end with an error", self.name
                )
                self._reset(
                    "internal", "the model failed while generating; the server logged the cause"
                )

    def _deliver(self, joining: list[tuple[Job, int]], sids: list[int], steps: list) -> None:
        """On the event loop: record the new streams and hand each step's text to its job."""
        for (job, i), sid in zip(joining, sids):
            if job in self.jobs:
                self.running[sid] = (job, i)
                job.sids.append(sid)
            else:  # its client left while the stream was being added
                self.to_cancel.append(sid)
        for outputs in steps:
            for sid, out in outputs.items():
                entry = self.running.get(sid)
                if entry is None:
                    continue
                job, i = entry
                job.feed(i, out.text, out.finished)
                if out.finished:
                    del self.running[sid]
                    if job.done:
                        self.jobs.discard(job)

    def _tick(self, requests: list[EngineRequest], cancels: list[int]) -> tuple[list[int], list]:
        """In the worker thread: apply leaves and joins, then step until there is news or the tick's
        time is up. Returns the new streams' ids and each step's outputs."""
        engine = self.engine
        for sid in cancels:
            engine.cancel(sid)
        sids = [engine.add(r) for r in requests]
        steps = []
        start = time.perf_counter()
        while engine.active:
            self.peak_active = max(self.peak_active, engine.active)
            steps.append(engine.step())
            if self._news.is_set() or time.perf_counter() - start >= self.tick_seconds:
                break
        if steps:
            self.steps += len(steps)
            per_step = (time.perf_counter() - start) / len(steps)
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * per_step
        return sids, steps

    def _reset(self, kind: str, message: str) -> None:
        """Fail every request and start again with an empty engine."""
        for job in list(self.jobs):
            job.fail(kind, message)
        self.jobs.clear()
        self.waiting.clear()
        self.running.clear()
        self.to_cancel.clear()
        self.engine = Engine(self.model.model, self.model.vocab.decode, self.model.device)
