"""The HTTP server: an API and a web page over trained models, with continuous batching.

Each served model has one `ModelWorker`, a background asyncio task that owns a
`generate.engine.Engine` and runs the model's part of its steps in a thread, so that the event loop
keeps answering while the model works. Requests do not queue behind each other: a new request's
streams join the engine's batch between two ticks and leave it when they finish, so that requests
arriving together share every batched model step (continuous batching, as text-generation-inference
and vLLM do). Each tick draws many characters per stream in one engine call (about `tick_seconds`
of work); each request reads its text from its own `Job`, in chunks. The document at /openapi.json
states every check a request meets (`_document`). At start-up, before uvicorn listens, each worker
warms its engine's compiled kernels at its model's shapes (`ModelWorker.warm_up`), so that the
first request does not pay for loading them.

    app = create_app([charlstm.load("runs/byron")], ServerConfig(max_concurrency=32))
    uvicorn.run(app)                      # or, from a shell: charlstm serve runs/byron

Endpoints: POST /v1/generate, POST /v1/generate/stream (server-sent events), GET /v1/models,
GET /v1/model, GET /healthz; OpenAI's POST /v1/completions and GET /v1/models/{model}, through the
same limits and workers (`openai_compat`); the page at /; the OpenAPI document at /openapi.json,
shown at /docs.

Limits follow the trusted servers: invalid fields are 422 with the field and the reason, bodies over
`max_body_bytes` are 413, streams beyond `max_concurrency` are 429 with Retry-After, a generation
past `time_limit` ends with an error, and a client that goes away frees its slot at once.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# the request model is built inside `create_app` from the server's limits.
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from charlstm.data.corpus import normalise_newlines
from charlstm.data.vocabulary import describe_char
from charlstm.errors import UserError
from charlstm.generate.engine import Request as EngineRequest
from charlstm.generate.sampling import SamplingParams, StopRule, stream_seeds
from charlstm.generate.textmodel import TextModel
from charlstm.hardware import available_cores
from charlstm.model import count_parameters
from charlstm.serve import openai_compat
from charlstm.serve.schemas import (
    COMPONENTS,
    GENERATE_FAILURES,
    Busy,
    ErrorDetail,
    FieldError,
    GenerateRequest,
    GenerateResponse,
    GenerationFailed,
    Health,
    ModelInfo,
    ModelList,
    OpenAIModel,
    ServerConfig,
    exact_integer_bounds,
    json_response,
    model_choice,
    request_model,
    responses,
    stream_ok,
    vocabulary_rules,
)
from charlstm.serve.security import Guard, is_loopback, protocol
from charlstm.serve.worker import Job, ModelWorker

log = logging.getLogger("charlstm.server")

STATIC_DIR = Path(__file__).parent / "static"
SWITCH_INTERVAL = 0.001  # seconds a thread may wait for Python's lock in `charlstm serve` (`serve`)


# --------------------------------------------------------------------------------------- the server


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
            self.workers[name] = ModelWorker(
                m,
                name,
                max_batch,
                config.tick_seconds,
                chunk_seconds=config.chunk_seconds,
                shards=config.engine_threads or available_cores(),
            )
        self.default = next(iter(self.workers))

    def worker(self, name: str | None) -> ModelWorker:
        worker = self.workers.get(name or self.default)
        if worker is None:
            raise FieldError(
                "model", f"no model named {name!r}; this server has {', '.join(self.workers)}"
            )
        return worker

    def admit(self, body: GenerateRequest) -> tuple[ModelWorker, Job]:
        """Check a request against the server's limits and the model's vocabulary, take its slots
        and hand it to its model's worker."""
        c = self.config
        worker = self.worker(body.model)
        if body.length > c.max_length:
            raise FieldError(
                "length", f"must be at most {c.max_length} (the server's --max-length)"
            )
        if len(body.start_text) > c.max_start_chars:
            raise FieldError(
                "start_text",
                f"has {len(body.start_text)} characters; the limit is {c.max_start_chars}",
            )
        limit = min(c.max_num_samples, c.max_concurrency)
        if body.num_samples > limit:
            raise FieldError("num_samples", f"must be at most {limit}")
        vocab = worker.model.vocab
        text = normalise_newlines(body.start_text)
        missing = vocab.unknown(text)
        if missing and body.unknown == "error":
            shown = ", ".join(describe_char(ch) for ch in missing[:10])
            raise FieldError(
                "start_text",
                f"has characters the model never saw: {shown}; remove "
                'them or send "unknown": "skip" to drop them',
            )
        text = "".join(ch for ch in text if ch in vocab)
        if not text:
            raise FieldError("start_text", "has no character the model knows; give another one")
        if body.top_k is not None and body.top_k > len(vocab):
            raise FieldError(
                "top_k",
                f"must be at most {len(vocab)}, the vocabulary size of model {worker.name}",
            )
        try:
            params = SamplingParams(
                body.temperature, body.top_k, body.top_p, body.repetition_penalty
            )
            rule = StopRule(tuple(body.stop), body.max_lines, body.max_stanzas)
        except UserError as exc:  # the schema should have caught it; keep the 422 promise anyway
            raise FieldError("body", str(exc)) from None
        n = body.num_samples
        if self.used + n > c.max_concurrency:
            wait = min(w.seconds_until_free() for w in self.workers.values())
            raise Busy(max(1, min(60, math.ceil(wait))))
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        prompt = vocab.encode(text)
        requests = [
            EngineRequest(prompt, body.length, params, int(s), rule) for s in stream_seeds(seed, n)
        ]
        self.used += n
        job = Job(
            requests,
            text,
            seed,
            time.perf_counter() + c.time_limit,
            on_close=lambda j: self._release(worker, j),
        )
        worker.submit(job)
        return worker, job

    def _release(self, worker: ModelWorker, job: Job) -> None:
        """The job is done (finished, failed or abandoned): its slots are free, whether or not
        its response has been sent."""
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
            "limits": {
                "max_length": c.max_length,
                "max_start_chars": c.max_start_chars,
                "max_num_samples": min(c.max_num_samples, c.max_concurrency),
                "max_concurrency": c.max_concurrency,
                "time_limit": c.time_limit,
            },
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
                {
                    "detail": f"request body larger than {self.max_bytes} bytes"
                    if too_big
                    else "invalid Content-Length header"
                },
                status_code=413 if too_big else 400,
            )
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


# A client that stops reading: uvicorn's send waits for the socket's buffers to drain, for ever.
# Behind `charlstm serve` its protocol aborts such a connection after security.WRITE_TIMEOUT (15 s);
# this limit, a little longer, holds under any ASGI server.
WRITE_TIMEOUT = 20.0  # seconds one event may wait to be taken by the client; then the response ends
DEADLINE_GRACE = 30.0  # seconds a response may last past its generation's time limit


class SlowClient(Exception):
    """The client did not take the response's events in time (`EventStream`)."""


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends, a vanished client
    included, so that its generation stops at once.

    A client that stops reading cannot hold the response for ever: an event the client has not
    taken within `WRITE_TIMEOUT` seconds ends it, and so does the hard `deadline` (a
    `time.perf_counter()` time: the generation's time limit plus `DEADLINE_GRACE`), however
    steadily the client reads. The response then ends unfinished and the server closes the
    connection. The request's slots do not wait for any of this: they are free as soon as its
    generation ends (`Job`)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], None],
        status_code: int = 200,  # FastAPI's OpenAPI reads status_code's default
        deadline: float = math.inf,
    ) -> None:
        super().__init__(
            content, status_code, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_close = on_close
        self.deadline = deadline

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_in_time(message: dict) -> None:
            left = min(WRITE_TIMEOUT, self.deadline - time.perf_counter())
            try:
                async with asyncio.timeout(max(0.0, left)):
                    await send(message)
            except TimeoutError:
                raise SlowClient from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except SlowClient:
            client = scope.get("client") or ("?", 0)
            log.warning(
                "cut off a response to %s:%s: its client took no event within %g s, or the "
                "response ran past its deadline",
                *client[:2],
                WRITE_TIMEOUT,
            )
        finally:
            self.on_close()


def sse(event: str, data: Any) -> str:
    # json.dumps writes no raw newline, so one `data:` line always holds the whole payload.
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(job: Job, model: str) -> AsyncIterator[str]:
    yield sse(
        "start",
        {
            "model": model,
            "start_text": job.start_text,
            "num_samples": len(job.requests),
            "seed": job.seed,
        },
    )
    # The events of one hand-over go out as one piece (one write to the socket, one pass through
    # the ASGI layers), the last text together with `done`.
    done = None
    try:
        async for texts in job.chunks():
            events = [sse("chunk", {"index": i, "text": t}) for i, t in sorted(texts.items())]
            if job.done and job.error is None:
                done = sse("done", job.response(model).model_dump())
                events.append(done)
            yield "".join(events)
    except GenerationFailed as exc:
        yield sse("error", {"error": exc.kind, "message": exc.message})
        return
    if done is None:
        yield sse("done", job.response(model).model_dump())


def _field_name(loc: Sequence[Any]) -> str:
    parts = (
        [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query") else [str(p) for p in loc]
    )
    name = ".".join(p for p in parts if not p.isdigit())
    index = "".join(f"[{p}]" for p in parts if p.isdigit())
    return (name or "body") + index


def _unprocessable(errors: list[ErrorDetail]) -> JSONResponse:
    return JSONResponse({"detail": [e.model_dump() for e in errors]}, status_code=422)


# ---------------------------------------------------------------------------------------- the app


def _document(app: FastAPIOffline, server: Server) -> None:
    """Complete the OpenAPI document FastAPI builds from the routes: the models that responses
    name by reference (the stream's events among them); what the requests' schemas cannot say by
    themselves: the served models by name and the start texts each one takes (its vocabulary),
    integer bounds exact; and, with API keys, the Bearer scheme the API needs, so that /docs can
    send a key. Every check the server makes on a request is then in the document."""
    config = server.config
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        openai_compat.tidy_document(schema)
        _, defs = models_json_schema(
            [(m, "serialization") for m in [*COMPONENTS, *openai_compat.COMPONENTS]],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            schemas.setdefault(name, definition)
        vocabularies = {n: "".join(w.model.vocab.chars) for n, w in server.workers.items()}
        native = schemas["GenerateRequest"]
        native["properties"]["model"] = {"title": "Model", **model_choice(list(vocabularies))}
        native.setdefault("allOf", []).append(vocabulary_rules(vocabularies, server.default))
        openai_compat.document_vocabularies(schemas["CompletionRequest"], vocabularies)
        # An example of each request (for /docs, and the first requests a fuzzer sends): a text
        # of the default model's characters.
        chars = vocabularies[server.default]
        text = ("".join(c for c in chars if c.isprintable()) or chars)[: config.max_start_chars]
        native["examples"] = [
            {"start_text": text[:12], "length": min(100, config.max_length), "seed": 7}
        ]
        schemas["CompletionRequest"]["examples"] = [
            {
                "model": server.default,
                "prompt": text[:12],
                "max_tokens": min(16, config.max_length),
                "temperature": 0.5,
                "seed": 7,
            }
        ]
        exact_integer_bounds(schema)
        if config.api_keys:
            components["securitySchemes"] = {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key the server was started with (--api-key).",
                }
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        return schema

    app.openapi = openapi


def create_app(models: Sequence[TextModel], config: ServerConfig | None = None) -> FastAPIOffline:
    """The ASGI application serving `models` (the first is the default)."""
    config = config or ServerConfig()
    server = Server(models, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Before the first request (uvicorn listens only once this part is done): load the
        # generation kernels and run them at each model's shapes, so that no request waits for it.
        for w in server.workers.values():
            await asyncio.to_thread(w.warm_up)
        for w in server.workers.values():
            w.start()
        yield
        await server.shutdown()

    app = FastAPIOffline(
        title="charlstm",
        version=_version(),
        lifespan=lifespan,
        static_url="/docs-assets",
        description="Generate text with character-level recurrent models.",
    )
    app.state.server = server
    Body = request_model(config, max(len(w.model.vocab) for w in server.workers.values()))
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    # Added last, so outermost: a request from the wrong host, without its key or of the wrong
    # content type is answered before anything else reads it (docs/security.md).
    app.add_middleware(
        Guard,
        api_keys=config.api_keys,
        allowed_hosts=config.allowed_hosts,
        body_timeout=config.body_timeout,
        routes=app.router.routes,
    )
    openai_compat.install(app)  # outermost: OpenAI's error shape on its paths, the guard's too
    _document(app, server)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path == openai_compat.COMPLETIONS:
            return openai_compat.invalid_request(exc)
        return _unprocessable(
            [
                ErrorDetail(
                    field="body" if e.get("type") == "json_invalid" else _field_name(e["loc"]),
                    reason=e.get("msg", ""),
                )
                for e in exc.errors()
            ]
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        allow = (exc.headers or {}).get("Allow", "")
        reason = f"{request.method} is not a method of {request.url.path}; it takes {allow}"
        return JSONResponse({"detail": reason}, status_code=405, headers=exc.headers)

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError) -> JSONResponse:
        return _unprocessable([ErrorDetail(field=exc.field, reason=exc.reason)])

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse(
            {
                "detail": f"the server is generating its limit of {config.max_concurrency} "
                f"streams; retry in {exc.retry_after} s"
            },
            status_code=429,
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        tags=["generate"],
        responses=responses(config, body=True, extra=GENERATE_FAILURES),
    )
    async def generate(body: Body, request: Request) -> GenerateResponse:
        """Generate `num_samples` texts and return them whole."""
        worker, job = server.admit(body)
        await _finish(job, request)
        return job.response(worker.name)

    @app.post(
        "/v1/generate/stream",
        tags=["generate"],
        response_class=EventStream,
        responses=responses(config, body=True, extra={200: stream_ok()}),
    )
    async def generate_stream(body: Body) -> EventStream:
        """Generate and stream the text as server-sent events while it is produced."""
        worker, job = server.admit(body)
        return EventStream(
            _events(job, worker.name), on_close=job.close, deadline=job.deadline + DEADLINE_GRACE
        )

    CompletionBody = openai_compat.request_model(config)
    cards = openai_compat.model_cards(server.workers)

    @app.post(
        openai_compat.COMPLETIONS,
        tags=["openai"],
        response_model=openai_compat.Completion,
        responses=openai_compat.completions_responses(config),
    )
    async def completions(body: CompletionBody, request: Request) -> Any:
        """OpenAI's completions (tokens are characters), for OpenAI's clients: the same limits,
        keys and batching as POST /v1/generate."""
        worker, job = server.admit(openai_compat.to_native(body, server.workers))
        reply = openai_compat.Reply(job, worker.name, body)
        if body.stream:
            deadline = job.deadline + DEADLINE_GRACE
            return EventStream(reply.events(), on_close=job.close, deadline=deadline)
        await _finish(job, request)
        return reply.completion()

    @app.get(
        "/v1/models",
        tags=["models", "openai"],
        response_model=ModelList,
        responses=openai_compat.document(responses(config), shared=True),
    )
    async def models_info() -> dict[str, Any]:
        """Every served model: configuration, vocabulary, training metrics, validation loss
        (`models`), and for OpenAI's clients their ids (`data`)."""
        return {
            "default": server.default,
            "models": [server.model_info(n) for n in server.workers],
            "data": list(cards.values()),
        }

    @app.get(
        "/v1/models/{model}",
        tags=["openai"],
        response_model=OpenAIModel,
        responses=openai_compat.model_responses(config),
    )
    async def openai_model(model: str) -> OpenAIModel:
        """One model in OpenAI's shape."""
        return openai_compat.find(cards, model)

    @app.get(
        "/v1/model",
        tags=["models"],
        response_model=ModelInfo,
        responses=responses(config, extra={404: json_response("No model of that name.")}),
    )
    async def model_info(model: str | None = None) -> dict[str, Any]:
        """One model (the default unless `model` names another)."""
        name = model or server.default
        if name not in server.workers:
            raise HTTPException(
                404, f"no model named {name!r}; this server has {', '.join(server.workers)}"
            )
        return server.model_info(name)

    @app.get(
        "/healthz", tags=["health"], response_model=Health, responses=responses(config, auth=False)
    )
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": list(server.workers),
            "streams": server.used,
            "max_concurrency": config.max_concurrency,
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _finish(job: Job, request: Request) -> None:
    """Wait until `job` has all its text, closing it if its client leaves first; a generation that
    cannot finish is an HTTP error."""
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


async def _close_on_disconnect(request: Request, job: Job) -> None:
    # The body has been read, so the next message can only be the client leaving.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.close()


def _version() -> str:
    """The installed package's version (read from its metadata: the package root sits above serve/
    in the layers, docs/architecture.md)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("charlstm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def serve(
    runs: Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    threads: int = 1,
    log_level: str = "info",
) -> None:
    """Load `runs` once and serve them until interrupted. Listening beyond loopback without an API
    key warns (docs/security.md says why it is not refused)."""
    import warnings

    import uvicorn

    from charlstm.generate.textmodel import load
    from charlstm.hardware import set_threads

    try:
        from charlstm.generate.kernels import set_threads as kernel_threads
    except ImportError:  # no numba: the reference path only

        def kernel_threads(n: int | None) -> None:
            pass

    config = config or ServerConfig()
    if not config.api_keys and not is_loopback(host):
        warnings.warn(
            f"serving on {host} without an API key: anyone who can reach port {port} can use "
            "the server; set CHARLSTM_API_KEY (or --api-key), or keep it behind a proxy that "
            "checks who calls (docs/security.md)",
            stacklevel=2,
        )
    # PyTorch on `threads` (one by default): the reference path's steps (GRU, RNN) are a few small
    # products, too small to gain from more threads (two made them 5-100x slower). The compiled
    # LSTM kernels take every core: each worker steps its own rows, single-threaded, holding no
    # Python lock, beside the event loop.
    set_threads(threads)
    kernel_threads(available_cores())
    # A thread that has run the model's part waits for Python's lock to hand its result back; the
    # event loop, busy with many responses, would keep it up to the default 5 ms each time.
    sys.setswitchinterval(SWITCH_INTERVAL)
    models = [load(run) for run in runs]
    app = create_app(models, config)
    # Python's full garbage collection walks every object the process holds: with PyTorch, numba,
    # FastAPI and pydantic loaded that is 200,000 objects and 60 ms on an idle core, over 140 ms
    # under load, in which no stream and no response moves (it was the p99 time to the first text
    # at 64 streams). What is alive now lives as long as the server: freezing it leaves the
    # collector only what requests allocate (docs/benchmarks.md, issue 23).
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            # Slow clients (docs/security.md): connections past the limit are answered 503, and a
            # request's headers must arrive in time (uvicorn's own protocol waits for ever).
            limit_concurrency=config.connection_limit,
            http=protocol(config.header_timeout),
            # asyncio's own loop, not uvloop where it happens to be installed: the protocol's
            # deadlines and the load benchmark's figures (docs/benchmarks.md) are measured on it
            loop="asyncio",
        )
    except SystemExit as exc:
        # uvicorn exits with 3 when it cannot listen (its reason is logged just before); that is
        # the user's to fix, so it is a UserError (exit 2), and 3 keeps one meaning (errors.md).
        if exc.code != 3:
            raise
        raise UserError(
            f"could not listen on {host}:{port} (the reason is logged above); choose another "
            "--port, or stop the program that holds it"
        ) from None
