"""The HTTP server: an API and a web page over trained models, with continuous batching.

Each served model has one `ModelWorker`, a background asyncio task that owns a `generation.Engine`
and runs its steps in a worker thread, so that the event loop keeps answering while the model works.
Requests do not queue behind each other: a new request's streams join the engine's batch between two
steps and leave it when they finish, so that requests arriving together share every batched model
step (continuous batching, as text-generation-inference and vLLM do). Each request reads its text
from its own `Job`, which the worker fills after every tick (a few steps, at most `tick_seconds`).

    app = create_app([charlstm.load("runs/byron")], ServerConfig(max_concurrency=32))
    uvicorn.run(app)                      # or, from a shell: charlstm serve runs/byron

Endpoints: POST /v1/generate, POST /v1/generate/stream (server-sent events), GET /v1/models,
GET /v1/model, GET /healthz; the page at /; the OpenAPI document at /openapi.json, shown at /docs.

Limits follow the trusted servers: invalid fields are 422 with the field and the reason, bodies over
`max_body_bytes` are 413, streams beyond `max_concurrency` are 429 with Retry-After, a generation
past `time_limit` ends with an error, and a client that goes away frees its slot at once.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# the request model is built inside `create_app` from the server's limits.
import asyncio
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, create_model

from charlstm.api import TextModel
from charlstm.corpus import normalise_newlines
from charlstm.errors import UserError
from charlstm.generation import Engine
from charlstm.generation import Request as EngineRequest
from charlstm.model import count_parameters
from charlstm.sampling import SamplingParams, StopRule, stream_seeds
from charlstm.vocabulary import describe_char

log = logging.getLogger("charlstm.server")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServerConfig:
    max_length: int = 4000  # characters generated per sample
    max_concurrency: int = 64  # streams (samples) admitted at once, all models together
    max_batch: int | None = None  # rows per engine step; None = max_concurrency (waiting beyond it)
    max_start_chars: int = 2000
    max_num_samples: int = 16
    max_body_bytes: int = 64 * 1024
    time_limit: float = 120.0  # seconds per generation, from admission to its last character
    tick_seconds: float = 0.01  # longest run of engine steps between two hand-overs of text

    def __post_init__(self) -> None:
        for name in ("max_length", "max_concurrency", "max_start_chars", "max_num_samples",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {self.max_batch}")
        if not (self.time_limit > 0 and self.tick_seconds > 0):
            raise UserError("time_limit and tick_seconds must be > 0")


# ---------------------------------------------------------------------------------------- schemas


StopString = Annotated[str, Field(min_length=1, max_length=100)]


class GenerateRequest(BaseModel):
    """What to generate. Limits that depend on the server (length, start text, samples) are checked
    against its configuration, listed under `limits` by GET /v1/model."""

    # strict: "0.5" is not a temperature; forbid: a misspelt field is an error, never ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    start_text: str = Field(" ", min_length=1, description="Text the samples continue.")
    length: int = Field(200, ge=1, description="Characters to generate per sample.")
    temperature: float = Field(0.3, ge=0, allow_inf_nan=False, description="0 is greedy.")
    top_k: int | None = Field(None, ge=0, description="Keep the k most likely characters; 0 = off.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling.")
    repetition_penalty: float = Field(1.0, ge=1, allow_inf_nan=False)
    num_samples: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**64, description="Same seed, same text; none = random.")
    stop: list[StopString] = Field(default_factory=list, max_length=8,
                                   description="End a sample before any of these strings.")
    max_lines: int | None = Field(None, ge=1)
    max_stanzas: int | None = Field(None, ge=1)
    unknown: Literal["error", "skip"] = Field(
        "error", description="Start-text characters the model never saw: reject, or drop them.")
    model: str | None = Field(None, description="Which served model; the first one by default.")


def request_model(config: ServerConfig) -> type[GenerateRequest]:
    """`GenerateRequest` with this server's limits in its schema, so that /docs shows them and one
    422 names every bad field at once."""
    return create_model(
        "GenerateRequest", __base__=GenerateRequest, __doc__=GenerateRequest.__doc__,
        start_text=(str, Field(" ", min_length=1, max_length=config.max_start_chars,
                               description="Text the samples continue.")),
        length=(int, Field(min(200, config.max_length), ge=1, le=config.max_length,
                           description="Characters to generate per sample.")),
        num_samples=(int, Field(1, ge=1, le=min(config.max_num_samples, config.max_concurrency))),
    )


class Timing(BaseModel):
    first_chunk_ms: float | None
    total_ms: float
    characters: int  # generated, all samples together
    chars_per_second: float


class GenerateResponse(BaseModel):
    model: str
    samples: list[str]  # each the start text followed by its generated text
    finish_reasons: list[Literal["length", "stop"]]
    seed: int
    timing: Timing


class ErrorDetail(BaseModel):
    field: str
    reason: str


class ValidationErrorResponse(BaseModel):
    detail: list[ErrorDetail]


class ErrorResponse(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Request body too large."},
    422: {"model": ValidationErrorResponse, "description": "A field is invalid: which, and why."},
    429: {"model": ErrorResponse, "description": "Too many concurrent generations; see Retry-After."},
}


class FieldError(Exception):
    """A request field that fails a check only the server can make; answered as 422."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class Busy(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


class GenerationFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


# ---------------------------------------------------------------------------------------- jobs


class Job:
    """One request's streams: the text the worker has produced for them, and how each ended."""

    def __init__(self, requests: list[EngineRequest], start_text: str, seed: int,
                 deadline: float, on_close: Callable[["Job"], None]) -> None:
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
            timing=Timing(first_chunk_ms=first, total_ms=total * 1e3, characters=chars,
                          chars_per_second=chars / total if total > 0 else 0.0),
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

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine {self.name}")

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
            job.fail("time_limit", f"the generation ran past its time limit of {limit:g} s; "
                                   "ask for fewer characters or try again when the server is less busy")
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
                log.exception("engine of model %s failed; its requests end with an error", self.name)
                self._reset("internal", "the model failed while generating; the server logged the cause")

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


# ---------------------------------------------------------------------------------------- the server


class Server:
    """The served models, their workers and the concurrency slots they share."""

    def __init__(self, models: Sequence[TextModel], config: ServerConfig) -> None:
        if not models:
            raise UserError("give at least one run to serve")
        self.config = config
        self.used = 0  # admitted streams, all models together
        self.workers: dict[str, ModelWorker] = {}
        max_batch = config.max_batch or config.max_concurrency
        for m in models:
            name, k = m.name, 2
            while name in self.workers:  # two runs both called "run": run, run-2
                name, k = f"{m.name}-{k}", k + 1
            self.workers[name] = ModelWorker(m, name, max_batch, config.tick_seconds)
        self.default = next(iter(self.workers))

    def worker(self, name: str | None) -> ModelWorker:
        worker = self.workers.get(name or self.default)
        if worker is None:
            raise FieldError("model", f"no model named {name!r}; this server has "
                                      f"{', '.join(self.workers)}")
        return worker

    def admit(self, body: GenerateRequest) -> tuple[ModelWorker, Job]:
        """Check a request against the server's limits and the model's vocabulary, take its slots
        and hand it to its model's worker."""
        c = self.config
        worker = self.worker(body.model)
        if body.length > c.max_length:
            raise FieldError("length", f"must be at most {c.max_length} (the server's --max-length)")
        if len(body.start_text) > c.max_start_chars:
            raise FieldError("start_text", f"has {len(body.start_text)} characters; the limit is "
                                           f"{c.max_start_chars}")
        limit = min(c.max_num_samples, c.max_concurrency)
        if body.num_samples > limit:
            raise FieldError("num_samples", f"must be at most {limit}")
        vocab = worker.model.vocab
        text = normalise_newlines(body.start_text)
        missing = vocab.unknown(text)
        if missing and body.unknown == "error":
            shown = ", ".join(describe_char(ch) for ch in missing[:10])
            raise FieldError("start_text", f"has characters the model never saw: {shown}; remove "
                                           'them or send "unknown": "skip" to drop them')
        text = "".join(ch for ch in text if ch in vocab)
        if not text:
            raise FieldError("start_text", "has no character the model knows; give another one")
        try:
            params = SamplingParams(body.temperature, body.top_k, body.top_p, body.repetition_penalty)
            rule = StopRule(tuple(body.stop), body.max_lines, body.max_stanzas)
        except UserError as exc:  # the schema should have caught it; keep the 422 promise anyway
            raise FieldError("body", str(exc)) from None
        n = body.num_samples
        if self.used + n > c.max_concurrency:
            wait = min(w.seconds_until_free() for w in self.workers.values())
            raise Busy(max(1, min(60, math.ceil(wait))))
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        prompt = vocab.encode(text)
        requests = [EngineRequest(prompt, body.length, params, int(s), rule)
                    for s in stream_seeds(seed, n)]
        self.used += n
        job = Job(requests, text, seed, time.perf_counter() + c.time_limit,
                  on_close=lambda j: self._release(worker, j))
        worker.submit(job)
        return worker, job

    def _release(self, worker: ModelWorker, job: Job) -> None:
        self.used -= len(job.requests)
        worker.drop(job)

    async def shutdown(self) -> None:
        for w in self.workers.values():
            await w.stop()

    def model_info(self, name: str) -> dict[str, Any]:
        w = self.workers[name]
        m, meta = w.model, w.model.meta
        c = self.config
        val = m.val_loss
        return {
            "name": name,
            "model": meta.get("model", {}),
            "parameters": count_parameters(m.model),
            "vocab_size": len(m.vocab),
            "vocabulary": "".join(m.vocab.chars),
            "dataset": (meta.get("config") or {}).get("data", {}).get("dataset"),
            "step": meta.get("step"),
            "metrics": meta.get("metrics") or {},
            "val_loss": val,
            "val_bits_per_char": None if val is None else val / math.log(2),
            "device": str(m.device),
            "limits": {"max_length": c.max_length, "max_start_chars": c.max_start_chars,
                       "max_num_samples": min(c.max_num_samples, c.max_concurrency),
                       "max_concurrency": c.max_concurrency, "time_limit": c.time_limit},
        }


# ---------------------------------------------------------------------------------------- transport


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before it is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            too_big = declared.isdigit()
            response = JSONResponse(
                {"detail": f"request body larger than {self.max_bytes} bytes" if too_big
                 else "invalid Content-Length header"}, status_code=413 if too_big else 400)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body that declared no length
                    raise HTTPException(413, f"request body larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends, a vanished client
    included, so that its generation stops and its slot is freed at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 status_code: int = 200) -> None:  # FastAPI's OpenAPI reads status_code's default
        super().__init__(content, status_code,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(event: str, data: Any) -> str:
    # json.dumps writes no raw newline, so one `data:` line always holds the whole payload.
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(job: Job, model: str) -> AsyncIterator[str]:
    yield sse("start", {"model": model, "start_text": job.start_text, "num_samples": len(job.requests),
                        "seed": job.seed})
    try:
        async for texts in job.chunks():
            for i, text in sorted(texts.items()):
                yield sse("chunk", {"index": i, "text": text})
    except GenerationFailed as exc:
        yield sse("error", {"error": exc.kind, "message": exc.message})
        return
    yield sse("done", job.response(model).model_dump())


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query") else [str(p) for p in loc]
    name = ".".join(p for p in parts if not p.isdigit())
    index = "".join(f"[{p}]" for p in parts if p.isdigit())
    return (name or "body") + index


def _unprocessable(errors: list[ErrorDetail]) -> JSONResponse:
    return JSONResponse({"detail": [e.model_dump() for e in errors]}, status_code=422)


# ---------------------------------------------------------------------------------------- the app


def create_app(models: Sequence[TextModel], config: ServerConfig | None = None) -> FastAPIOffline:
    """The ASGI application serving `models` (the first is the default)."""
    config = config or ServerConfig()
    server = Server(models, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for w in server.workers.values():
            w.start()
        yield
        await server.shutdown()

    app = FastAPIOffline(title="charlstm", version=_version(), lifespan=lifespan,
                         static_url="/docs-assets",
                         description="Generate text with character-level recurrent models.")
    app.state.server = server
    Body = request_model(config)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _unprocessable([
            ErrorDetail(field="body" if e.get("type") == "json_invalid" else _field_name(e["loc"]),
                        reason=e.get("msg", "")) for e in exc.errors()])

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError) -> JSONResponse:
        return _unprocessable([ErrorDetail(field=exc.field, reason=exc.reason)])

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse(
            {"detail": f"the server is generating its limit of {config.max_concurrency} streams; "
                       f"retry in {exc.retry_after} s"},
            status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["generate"],
              responses={**_ERRORS, 504: {"model": ErrorResponse, "description": "Time limit."}})
    async def generate(body: Body, request: Request) -> GenerateResponse:
        """Generate `num_samples` texts and return them whole."""
        worker, job = server.admit(body)
        watcher = asyncio.create_task(_close_on_disconnect(request, job))
        try:
            async for _ in job.chunks():
                pass
        except GenerationFailed as exc:
            status = {"time_limit": 504, "shutdown": 503, "cancelled": 499}.get(exc.kind, 500)
            raise HTTPException(status, exc.message) from None
        finally:
            watcher.cancel()
            job.close()
        return job.response(worker.name)

    @app.post("/v1/generate/stream", tags=["generate"], response_class=EventStream,
              responses={**_ERRORS, 200: {
                  "content": {"text/event-stream": {}},
                  "description": "Server-sent events: `start` (model, start text, seed), one `chunk` "
                                 "per piece of text ({index, text}), then `done` (the same object "
                                 "as POST /v1/generate) or `error` ({error, message}, e.g. "
                                 "error=time_limit)."}})
    async def generate_stream(body: Body) -> EventStream:
        """Generate and stream the text as server-sent events while it is produced."""
        worker, job = server.admit(body)
        return EventStream(_events(job, worker.name), on_close=job.close)

    @app.get("/v1/models", tags=["models"])
    async def models_info() -> dict[str, Any]:
        """Every served model: configuration, vocabulary, training metrics, validation loss."""
        return {"default": server.default, "models": [server.model_info(n) for n in server.workers]}

    @app.get("/v1/model", tags=["models"], responses={404: {"model": ErrorResponse}})
    async def model_info(model: str | None = None) -> dict[str, Any]:
        """One model (the default unless `model` names another)."""
        name = model or server.default
        if name not in server.workers:
            raise HTTPException(404, f"no model named {name!r}; this server has "
                                     f"{', '.join(server.workers)}")
        return server.model_info(name)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": list(server.workers), "streams": server.used,
                "max_concurrency": config.max_concurrency}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _close_on_disconnect(request: Request, job: Job) -> None:
    # The body has been read, so the next message can only be the client leaving.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.close()


def _version() -> str:
    from charlstm import __version__

    return __version__


def serve(runs: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None, threads: int = 1, log_level: str = "info") -> None:
    """Load `runs` once and serve them until interrupted."""
    import uvicorn

    from charlstm.api import load
    from charlstm.hardware import set_threads

    # One intra-op thread: a step is a few small matrix products, too small to gain from more
    # threads, and the event loop needs a core of its own (two threads made steps 5-100× slower).
    set_threads(threads)
    models = [load(run) for run in runs]
    app = create_app(models, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
