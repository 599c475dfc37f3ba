"""OpenAI's completions dialect of the server: POST /v1/completions and GET /v1/models in the
shapes of OpenAI's API, so that the `openai` client, and the tools built on it, drive a served run.

The dialect is a translation, not a second server. A completions request becomes the native
`GenerateRequest` (prompt → start_text, max_tokens → length, n → num_samples, ...), which the same
`Server.admit` checks against the same limits and concurrency slots and hands to the same worker,
so that its streams share each batched step with every other request's; its answer is that `Job`
read into OpenAI's shapes. A token is a character: max_tokens counts characters, and so does usage.

Errors on these paths come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
whoever answers them: `OpenAIErrors` rewrites the `{"detail": ...}` answers of the guard, the body
limit and the native handlers, and a 422 becomes 400, as OpenAI's API answers a bad request.
GET /v1/models is shared with the native API: its answer holds both dialects' fields and its
errors both shapes.

OpenAI's parameters that a character model cannot honour (logprobs, penalties, logit_bias, suffix,
best_of) are accepted at their neutral value only; any other value is a 400 naming it.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)

from charlstm.data.corpus import normalise_newlines
from charlstm.data.vocabulary import describe_char
from charlstm.generate.sampling import MIN_TEMPERATURE
from charlstm.serve.schemas import (
    GENERATE_FAILURES,
    GenerateRequest,
    GenerationFailed,
    OpenAIModel,
    ServerConfig,
    StopString,
    json_response,
    json_text,
    known_text,
    responses,
    sse_event,
    whole,
)
from charlstm.serve.worker import Job, ModelWorker

COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"  # shared with the native API
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{model}
DEFAULT_MAX_TOKENS = 16  # OpenAI's defaults, which its clients expect
DEFAULT_TEMPERATURE = 1.0
MAX_STOPS = 4
# Native fields that `Server.admit` may name, by their name in this dialect.
PARAMS = {"start_text": "prompt", "length": "max_tokens", "num_samples": "n"}
# The codes of errors whose status alone tells their cause (OpenAI's own where it has one); the
# others are null, as most of OpenAI's are. A stream that ends past its time limit says time_limit.
CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded", 504: "time_limit"}


def speaks(path: str) -> bool:
    """Whether the answers on `path` are in this dialect (wholly, or beside the native one)."""
    return path in (COMPLETIONS, MODELS) or path.startswith(MODEL_PREFIX)


# ------------------------------------------------------------------------------------------ errors


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(description="The request parameter at fault, if one is.")
    code: str | None = Field(
        description="model_not_found, invalid_api_key, rate_limit_exceeded, ...; often null."
    )


class OpenAIErrorResponse(BaseModel):
    """An error in OpenAI's shape, which its clients raise as their own exceptions."""

    error: OpenAIErrorBody


class ModelsErrorResponse(BaseModel):
    """An error of GET /v1/models, which both dialects read: charlstm's `detail` and OpenAI's
    `error`."""

    detail: str
    error: OpenAIErrorBody


class OpenAIError(Exception):
    """A request this dialect refuses; answered in OpenAI's shape with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: its clients raise their exception by the status, and show
    `message`."""
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": code if code is not None else CODES.get(status),
        }
    }


async def _refused(request: Any, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status)


def invalid_request(exc: RequestValidationError) -> JSONResponse:
    """A completions body that fails its schema: 400, every problem in the message, the first
    one's parameter as `param`."""
    problems, params = [], []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"] if p != "body"]
        param = loc[0] if loc and e["type"] != "json_invalid" else None
        where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
        reason = str(e.get("msg", "")).removeprefix("Value error, ")
        if e["type"] == "json_invalid":
            text = f"the body is not valid JSON ({e.get('ctx', {}).get('error', reason)})"
        elif e["type"] == "extra_forbidden":
            text = f"{where} is not a parameter of OpenAI's completions API; remove it"
        elif e["type"] == "missing":
            text = f"{where} is required"
        else:
            text = f"{where or 'the body'}: {reason}"
        problems.append(text)
        params.append(param)
    param = next((p for p in params if p), None)
    return JSONResponse(error_body(400, "; ".join(problems), param), 400)


class OpenAIErrors:
    """ASGI middleware, outermost: an error answered on this dialect's paths in charlstm's shape
    (`{"detail": ...}`, by the guard, the body limit, a handler) is rewritten into OpenAI's, a 422
    becoming 400; on GET /v1/models the OpenAI error goes beside `detail`. Its headers stay
    (Retry-After, WWW-Authenticate) and its Content-Length is made right. Answers already in
    OpenAI's shape pass as they are."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not speaks(path):
            return await self.app(scope, receive, send)
        start: dict | None = None
        body: list[bytes] = []

        async def sending(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    start = message  # sent with its rewritten body, below
                    return
            elif message["type"] == "http.response.body" and start is not None:
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status, content = _rewrite(start["status"], b"".join(body), shared=path == MODELS)
                headers = [(n, v) for n, v in start["headers"] if n.lower() != b"content-length"]
                headers.append((b"content-length", str(len(content)).encode()))
                await send({**start, "status": status, "headers": headers})
                return await send({"type": "http.response.body", "body": content})
            await send(message)

        await self.app(scope, receive, sending)


def _rewrite(status: int, raw: bytes, shared: bool) -> tuple[int, bytes]:
    try:
        answer = json.loads(raw)
    except ValueError:
        return status, raw
    if not isinstance(answer, dict) or "error" in answer or "detail" not in answer:
        return status, raw
    detail, param = answer["detail"], None
    if isinstance(detail, list):  # a native 422: [{"field", "reason"}] (`Server.admit`'s checks)
        named = []
        for d in detail:
            field, _, index = str(d.get("field", "")).partition("[")
            field = PARAMS.get(field, field)
            param = param or field
            named.append(f"{field}{'[' + index if index else ''}: {d.get('reason', '')}")
        message = "; ".join(named)
    else:
        message = str(detail)
    if status == 422:
        status = 400
    answer = (
        {"detail": message, **error_body(status, message, param)}
        if shared
        else error_body(status, message, param)
    )
    return status, json.dumps(answer).encode()


def install(app: Any) -> None:
    """Answer this dialect's errors in its shape. Call after every other middleware is added, so
    that `OpenAIErrors` is outermost and sees the guard's answers too."""
    app.add_exception_handler(OpenAIError, _refused)
    app.add_middleware(OpenAIErrors)


# ----------------------------------------------------------------------------------------- request


def _nullable(*branches: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A `json_schema_extra` that states a field's values exactly: these branches, or null."""

    def extra(schema: dict[str, Any]) -> None:
        schema.pop("type", None)
        schema["anyOf"] = [*branches, {"type": "null"}]

    return extra


def _one_prompt(value: Any) -> Any:
    """OpenAI takes a list of prompts, or token ids; a character model continues one text."""
    if isinstance(value, list):
        if value and all(isinstance(v, int | list) and not isinstance(v, bool) for v in value):
            raise ValueError("token ids are not text: send the prompt as a string")
        if len(value) != 1:
            raise ValueError(
                f"holds {len(value)} prompts; this server completes one prompt a request: send "
                "it as a string (and the others as requests of their own)"
            )
        return value[0]
    return value


def _prompt_schema(schema: dict[str, Any]) -> None:
    text = {k: schema.pop(k) for k in ("type", "minLength", "maxLength") if k in schema}
    schema["anyOf"] = [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _stop_schema(schema: dict[str, Any]) -> None:
    array = {k: schema.pop(k) for k in ("type", "items", "maxItems")}
    schema["anyOf"] = [array["items"], array, {"type": "null"}]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="A last chunk with the usage, before [DONE].")
    include_obfuscation: bool = Field(True, description="Accepted; no padding is ever added.")


class CompletionRequest(BaseModel):
    """OpenAI's completions request. Tokens are characters. Limits that depend on the server are
    those of POST /v1/generate (`limits` in GET /v1/model)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="The served run's name (GET /v1/models lists them).")
    prompt: Annotated[str, BeforeValidator(_one_prompt)] = Field(
        min_length=1,
        description="The text to continue: a string, or a list of one string.",
        json_schema_extra=_prompt_schema,
    )
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS, ge=1, description="Characters to generate per choice."
    )
    temperature: float | None = Field(
        DEFAULT_TEMPERATURE,
        ge=0,
        le=2,
        allow_inf_nan=False,
        description=f"0 is greedy; otherwise at least {MIN_TEMPERATURE:g}.",
        json_schema_extra=_nullable(
            {"type": "number", "const": 0},
            {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2},
        ),
    )
    top_p: float | None = Field(
        1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling; 1 is off."
    )
    n: int | None = Field(1, ge=1, description="Choices, generated as streams of one batch.")
    stop: Annotated[list[StopString], BeforeValidator(_stop_list)] = Field(
        default_factory=list,
        max_length=MAX_STOPS,
        description="A string, or up to 4: a choice ends before the first one it generates.",
        json_schema_extra=_stop_schema,
    )
    seed: int | None = Field(None, ge=0, lt=2**64, description="Same seed, same text.")
    stream: bool | None = Field(False, description="Server-sent events, then data: [DONE].")
    stream_options: StreamOptions | None = None
    echo: bool | None = Field(False, description="Begin each choice with the prompt.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # OpenAI's parameters that a character model cannot honour: their neutral value only.
    best_of: int | None = Field(
        None,
        description="1 or null only (it ranks by log-probability, which is not computed).",
        json_schema_extra=_nullable({"type": "integer", "const": 1}),
    )
    logprobs: int | None = Field(
        None,
        description="null only: log-probabilities are not computed.",
        json_schema_extra=_nullable(),
    )
    presence_penalty: float | None = Field(
        0.0,
        description="0 or null only.",
        json_schema_extra=_nullable({"type": "number", "const": 0}),
    )
    frequency_penalty: float | None = Field(
        0.0,
        description="0 or null only.",
        json_schema_extra=_nullable({"type": "number", "const": 0}),
    )
    logit_bias: dict[str, int] | None = Field(
        None,
        description="{} or null only.",
        json_schema_extra=_nullable({"type": "object", "additionalProperties": False}),
    )
    suffix: str | None = Field(
        None,
        description='"" or null only.',
        json_schema_extra=_nullable({"type": "string", "maxLength": 0}),
    )

    @field_validator("temperature")
    @classmethod
    def _greedy_or_warm(cls, t: float | None) -> float | None:
        if t is not None and 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return t

    # JSON Schema's integers include 999.0 (`schemas.whole`), for every integer parameter.
    _whole = field_validator("max_tokens", "n", "seed", "best_of", mode="before")(whole)

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(
                "best_of ranks candidates by log-probability, which this server does not "
                "compute; leave it out or send 1 (n asks for several choices)"
            )
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("this server does not compute log-probabilities; leave it out")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0):
            raise ValueError(
                "OpenAI's token penalties are not implemented; leave it out or send 0 "
                "(charlstm's own repetition_penalty is on POST /v1/generate)"
            )
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v:
            raise ValueError("logit_bias names GPT token ids, which a character model has none of")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("inserting text before a suffix is not supported; leave it out")
        return v


def request_model(config: ServerConfig) -> type[CompletionRequest]:
    """`CompletionRequest` with this server's limits in its schema (as the native request's)."""
    n_max = min(config.max_num_samples, config.max_concurrency)
    base = CompletionRequest.model_fields
    return create_model(
        "CompletionRequest",
        __base__=CompletionRequest,
        __doc__=CompletionRequest.__doc__,
        prompt=(
            Annotated[str, BeforeValidator(_one_prompt)],
            Field(
                min_length=1,
                max_length=config.max_start_chars,
                description=base["prompt"].description,
                json_schema_extra=_prompt_schema,
            ),
        ),
        max_tokens=(
            int | None,
            Field(
                min(DEFAULT_MAX_TOKENS, config.max_length),
                ge=1,
                le=config.max_length,
                description=base["max_tokens"].description,
            ),
        ),
        n=(int | None, Field(1, ge=1, le=n_max, description=base["n"].description)),
    )


def to_native(body: CompletionRequest, workers: Mapping[str, ModelWorker]) -> GenerateRequest:
    """The native request that generates what `body` asks for. Raises `OpenAIError`: 404 for a
    model the server does not have, 400 for prompt characters its model never saw."""
    worker = workers.get(body.model)
    if worker is None:
        raise _no_model(body.model, workers)
    prompt = normalise_newlines(body.prompt)
    missing = worker.model.vocab.unknown(prompt)
    if missing:
        shown = ", ".join(describe_char(ch) for ch in missing[:10])
        raise OpenAIError(
            400,
            f"prompt has characters model {body.model} never saw: {shown}; remove them "
            "(GET /v1/model lists its vocabulary)",
            "prompt",
        )
    top_p = body.top_p if body.top_p is not None and body.top_p < 1 else None
    try:
        return GenerateRequest(
            model=body.model,
            start_text=prompt,
            length=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=top_p,
            num_samples=1 if body.n is None else body.n,
            seed=body.seed,
            stop=body.stop,
        )
    except ValidationError as exc:  # the schema above is the narrower one; keep the 400 anyway
        raise OpenAIError(400, str(exc.errors()[0]["msg"])) from None


# ---------------------------------------------------------------------------------------- answers


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["length", "stop"] = Field(
        description="length: max_tokens characters; stop: a stop string (not in the text)."
    )


class CompletionUsage(BaseModel):
    """Counted in characters: the prompt once, the choices' texts all together."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["length", "stop"] | None = Field(
        description="null until the choice's last chunk."
    )


class CompletionChunk(BaseModel):
    """One event of a streamed completion: a piece of one choice's text, or, with
    stream_options.include_usage, the last one: no choices and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: CompletionUsage | None = None


# Models the OpenAPI document names by reference (create_app adds them to its components).
COMPONENTS: list[type[BaseModel]] = [
    OpenAIErrorResponse,
    ModelsErrorResponse,
    Completion,
    CompletionChunk,
]


class Reply:
    """A completion's answer read from its `Job`: whole (`completion`) or as OpenAI's
    server-sent events (`events`)."""

    def __init__(self, job: Job, model: str, body: CompletionRequest) -> None:
        self.job, self.model = job, model
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.echo = bool(body.echo)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage(self) -> CompletionUsage:
        prompt = len(self.job.start_text)
        generated = sum(len(g) for g in self.job.generated)
        return CompletionUsage(
            prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated
        )

    def completion(self) -> Completion:
        """The whole answer, once the job is done."""
        job, before = self.job, self.job.start_text if self.echo else ""
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(text=before + text, index=i, finish_reason=reason or "length")
                for i, (text, reason) in enumerate(zip(job.generated, job.finish_reasons))
            ],
            usage=self.usage(),
        )

    def _event(self, choices: list[CompletionChunkChoice], usage: bool = False) -> str:
        chunk = CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage() if usage else None,
        )
        exclude = None if self.include_usage else {"usage"}
        return _data(chunk.model_dump(exclude=exclude))

    def _piece(self, index: int, text: str, reason: str | None) -> str:
        choice = CompletionChunkChoice(text=text, index=index, finish_reason=reason)
        return self._event([choice])

    async def events(self) -> AsyncIterator[str]:
        """One event per piece of one choice's text, the choice's finish_reason on its last one,
        then (with include_usage) the usage, then `data: [DONE]`. A generation that cannot finish
        ends the stream with an error event, in OpenAI's shape, instead."""
        job = self.job
        if self.echo:
            for i in range(len(job.requests)):
                yield self._piece(i, job.start_text, None)
        told: set[int] | None = set()  # choices told their finish_reason; None once all were
        try:
            async for texts in job.chunks():
                # Read before any await: a choice that has finished has all its text in `texts`
                # or before (the worker feeds the text, then marks it finished).
                ended = {
                    i: r
                    for i, r in enumerate(job.finish_reasons)
                    if r is not None and i not in told
                }
                pieces = []  # one hand-over's events, sent as one piece (as the native route)
                for i, text in sorted(texts.items()):
                    reason = ended.pop(i, None)
                    pieces.append(self._piece(i, text, reason))
                    if reason is not None:
                        told.add(i)
                for i, reason in sorted(ended.items()):  # finished with no new text
                    pieces.append(self._piece(i, "", reason))
                    told.add(i)
                if job.done and job.error is None:  # the end goes with the last text
                    pieces += self._end(told)
                    told = None
                yield "".join(pieces)
        except GenerationFailed as exc:
            yield _data(error_body(500, exc.message, code=exc.kind))
            return
        if told is not None:
            yield "".join(self._end(told))

    def _end(self, told: set[int]) -> list[str]:
        """The last events: each choice not yet told its finish_reason, the usage (with
        include_usage), then [DONE]."""
        job = self.job
        end = [
            self._piece(i, "", reason or "length")
            for i, reason in enumerate(job.finish_reasons)
            if i not in told
        ]
        if self.include_usage:
            end.append(self._event([], usage=True))
        return [*end, "data: [DONE]\n\n"]


def _data(payload: Any) -> str:
    # json.dumps writes no raw newline, so one `data:` line always holds the whole payload.
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def model_cards(workers: Mapping[str, ModelWorker]) -> dict[str, OpenAIModel]:
    """Each served model in OpenAI's shape, by name; `created` is when its checkpoint was written
    (read once, at start: a run trained again while it is served is not what it serves)."""
    cards = {}
    for name, worker in workers.items():
        try:
            created = int(os.stat(worker.model.path).st_mtime)
        except OSError:  # a model built in memory, or a checkpoint removed since it was loaded
            created = int(time.time())
        cards[name] = OpenAIModel(id=name, created=created)
    return cards


def find(cards: Mapping[str, OpenAIModel], model: str) -> OpenAIModel:
    if model not in cards:
        raise _no_model(model, cards)
    return cards[model]


def _no_model(model: str, served: Mapping[str, Any]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model {model!r} does not exist on this server; it serves {', '.join(served)} "
        "(GET /v1/models)",
        "model",
        "model_not_found",
    )


# ---------------------------------------------------------------------------- the OpenAPI document


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document(native: dict[int | str, dict[str, Any]], shared: bool = False) -> dict:
    """An operation's answers (`schemas.responses`) in this dialect: each JSON error in OpenAI's
    shape (both shapes on the `shared` GET /v1/models), and a 422 folded into the 400."""
    error = _ref(ModelsErrorResponse if shared else OpenAIErrorResponse)
    out: dict[int | str, dict[str, Any]] = {}
    for status, answer in native.items():
        answer = dict(answer)
        if status == 422:
            status, answer = (
                400,
                {
                    **answer,
                    "description": f"{out[400]['description']} Or: {answer['description']} "
                    "Or: a parameter this server does not support, at a value other than its "
                    "neutral one.",
                },
            )
        if "application/json" in answer.get("content", {}) and (
            not isinstance(status, int) or status >= 400
        ):
            answer["content"] = {**answer["content"], "application/json": {"schema": error}}
        out[status] = answer
    return out


def tidy_document(schema: dict[str, Any]) -> None:
    """FastAPI documents a 422 for every operation with a body or a parameter; on this dialect's
    paths a bad request is a 400 (documented by `document`), never a 422."""
    for path, operations in schema.get("paths", {}).items():
        if speaks(path):
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)


def completions_responses(config: ServerConfig) -> dict:
    """Every answer of POST /v1/completions besides the plain 200."""
    extra = {
        200: _completions_ok(),
        404: json_response("No model of that name (code model_not_found)."),
        **GENERATE_FAILURES,
    }
    return document(responses(config, body=True, extra=extra))


def model_responses(config: ServerConfig) -> dict:
    """Every answer of GET /v1/models/{model} besides the 200."""
    return document(responses(config, extra={404: json_response("No model of that name.")}))


def _sse_data() -> dict[str, Any]:
    return {"anyOf": [_ref(CompletionChunk), _ref(OpenAIErrorResponse)]}


def document_vocabularies(request: dict[str, Any], vocabularies: dict[str, str]) -> None:
    """State in the completions request's schema (`request`, changed in place) which prompts each
    served model takes: every character known to it (`to_native` refuses the others with 400). A
    model the server does not have is a 404, whatever the prompt."""
    branches: list[dict[str, Any]] = [
        {"properties": {"model": {"not": {"enum": list(vocabularies)}}}}
    ]
    for name, chars in vocabularies.items():
        every, _ = known_text(chars)
        prompt = {
            "anyOf": [
                {"type": "string", "pattern": every},
                {"type": "array", "items": {"pattern": every}},
            ]
        }
        branches.append({"properties": {"model": {"const": name}, "prompt": prompt}})
    request.setdefault("allOf", []).append({"anyOf": branches})


def _completions_ok() -> dict[str, Any]:
    """The 200 answer of POST /v1/completions: the completion, or with `stream` its events."""
    return {
        "description": "A Completion; with stream: true, server-sent events, each one `data:` "
        "line: a CompletionChunk per piece of a choice's text (finish_reason on the choice's "
        "last), then `data: [DONE]`, or, if the generation cannot finish, an OpenAIErrorResponse "
        "instead of [DONE].",
        "content": {
            "application/json": {"schema": _ref(Completion)},
            "text/event-stream": {
                "schema": sse_event(
                    {"message": {"anyOf": [json_text(_sse_data()), {"const": "[DONE]"}]}},
                    "One event of the stream: a `data:` line (a CompletionChunk, an "
                    "OpenAIErrorResponse, or the last one, [DONE]).",
                )
            },
        },
        "x-sse-data": _sse_data(),
        "x-sse-end": "[DONE]",
    }
