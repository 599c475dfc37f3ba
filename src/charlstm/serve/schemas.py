"""The server's configuration and its request, response and error shapes (its OpenAPI contract)."""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from charlstm.errors import UserError
from charlstm.generate.sampling import MAX_PENALTY, MIN_TEMPERATURE
from charlstm.serve.security import check_allowed_hosts, check_api_keys


@dataclass(frozen=True)
class ServerConfig:
    max_length: int = 4000  # characters generated per sample
    max_concurrency: int = 64  # streams (samples) admitted at once, all models together
    max_batch: int | None = None  # rows per engine step; None = max_concurrency (waiting beyond it)
    max_start_chars: int = 2000
    max_num_samples: int = 16
    max_body_bytes: int = 64 * 1024
    time_limit: float = 120.0  # seconds per generation, from admission to its last character
    tick_seconds: float = 0.01  # the engine's time per tick: a new request joins within it
    chunk_seconds: float = (
        0.05  # a stream's text waits this long at most to be sent (after its first)
    )
    # Engines per model, each stepping its share of the streams in a thread of its own (where the
    # compiled kernels run); None: one per core (`worker.ModelWorker`).
    engine_threads: int | None = None
    # Exposing the server (docs/security.md). Bearer tokens the API asks for; none: no key asked.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Host names served besides localhost, *.localhost and IP addresses: name, *.domain, or *.
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int | None = None  # open connections (uvicorn); None: 2 × max_concurrency + 64
    header_timeout: float = 10.0  # seconds for a request's headers to arrive (from connecting)
    body_timeout: float = 10.0  # seconds for its body to arrive (from the end of its headers)

    def __post_init__(self) -> None:
        for name in (
            "max_length",
            "max_concurrency",
            "max_start_chars",
            "max_num_samples",
            "max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.engine_threads is not None and self.engine_threads < 1:
            raise UserError(f"engine_threads must be >= 1, got {self.engine_threads}")
        if self.max_batch is not None and self.max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {self.max_batch}")
        if not (self.time_limit > 0 and self.tick_seconds > 0 and self.chunk_seconds >= 0):
            raise UserError("time_limit and tick_seconds must be > 0, chunk_seconds >= 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise UserError(f"max_connections must be >= 1, got {self.max_connections}")
        if not (self.header_timeout > 0 and self.body_timeout > 0):
            raise UserError("header_timeout and body_timeout must be > 0")
        object.__setattr__(self, "api_keys", check_api_keys(self.api_keys))
        object.__setattr__(self, "allowed_hosts", check_allowed_hosts(self.allowed_hosts))

    @property
    def connection_limit(self) -> int:
        """uvicorn's `limit_concurrency`: the streams, a plain request beside each, and room for the
        page, the docs and health checks."""
        return self.max_connections or 2 * self.max_concurrency + 64


# ---------------------------------------------------------------------------------------- schemas


StopString = Annotated[str, Field(min_length=1, max_length=100)]


def whole(value: Any) -> Any:
    """An integral float as the integer it is (999.0 → 999): JSON Schema counts it as an integer,
    so the document allows it, while strict validation refuses every float. Anything else is
    left to the field's own validation (a bool stays a bool, and is refused)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# No vocabulary of characters is larger than Unicode: a bound for top_k before the models are known.
MAX_TOP_K = 0x110000


class GenerateRequest(BaseModel):
    """What to generate. Limits that depend on the server (length, start text, samples) are checked
    against its configuration, listed under `limits` by GET /v1/model."""

    # strict: "0.5" is not a temperature; forbid: a misspelt field is an error, never ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    start_text: str = Field(" ", min_length=1, description="Text the samples continue.")
    length: int = Field(200, ge=1, description="Characters to generate per sample.")
    temperature: float = Field(
        0.3,
        ge=0,
        allow_inf_nan=False,
        description=f"0 is greedy; otherwise at least {MIN_TEMPERATURE:g}.",
        # the bound SamplingParams enforces: below it logits / temperature overflow
        json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}]},
    )
    top_k: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_K,  # `request_model` narrows it to the largest served vocabulary
        description="Keep the k most likely characters; 0 = off. At most the model's vocabulary "
        "size (`vocab_size` in GET /v1/model).",
    )
    top_p: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling."
    )
    repetition_penalty: float = Field(1.0, ge=1, le=MAX_PENALTY, allow_inf_nan=False)
    num_samples: int = Field(1, ge=1)
    seed: int | None = Field(
        None, ge=0, lt=2**64, description="Same seed, same text; none = random."
    )
    stop: list[StopString] = Field(
        default_factory=list, max_length=8, description="End a sample before any of these strings."
    )
    max_lines: int | None = Field(None, ge=1)
    max_stanzas: int | None = Field(None, ge=1)
    unknown: Literal["error", "skip"] = Field(
        "error", description="Start-text characters the model never saw: reject, or drop them."
    )
    model: str | None = Field(None, description="Which served model; the first one by default.")

    # JSON Schema's integers include 999.0 (see `whole`), for every integer field of the request.
    _whole = field_validator(
        "length", "top_k", "num_samples", "seed", "max_lines", "max_stanzas", mode="before"
    )(whole)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_warm(cls, t: float) -> float:
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return t


def request_model(config: ServerConfig, vocab_size: int = MAX_TOP_K) -> type[GenerateRequest]:
    """`GenerateRequest` with this server's limits in its schema, so that /docs shows them and one
    422 names every bad field at once. `vocab_size` is the largest served vocabulary, top_k's
    bound (the server checks each request against its own model's too)."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        __doc__=GenerateRequest.__doc__,
        top_k=(
            int | None,
            Field(
                None,
                ge=0,
                le=vocab_size,
                description="Keep the k most likely characters; 0 = off. At most the model's "
                "vocabulary size (`vocab_size` in GET /v1/model).",
            ),
        ),
        start_text=(
            str,
            Field(
                " ",
                min_length=1,
                max_length=config.max_start_chars,
                description="Text the samples continue.",
            ),
        ),
        length=(
            int,
            Field(
                min(200, config.max_length),
                ge=1,
                le=config.max_length,
                description="Characters to generate per sample.",
            ),
        ),
        num_samples=(
            int,
            Field(1, ge=1, le=min(config.max_num_samples, config.max_concurrency)),
        ),
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


class StreamStart(BaseModel):
    """The `start` event: what is being generated (the start text after unknown characters were
    dropped), and the seed that makes it again."""

    model: str
    start_text: str
    num_samples: int
    seed: int


class StreamChunk(BaseModel):
    """A `chunk` event: the next piece of one sample's text."""

    index: int = Field(description="Which sample, from 0.")
    text: str


class StreamError(BaseModel):
    """The `error` event, which ends a stream that could not finish."""

    error: str = Field(
        description="What ended it: time_limit (past the server's time limit), shutdown (the "
        "server is stopping), or another word for a failure of the model on this request."
    )
    message: str


# The events of POST /v1/generate/stream, by name, in the order they come: one start, chunks, then
# done or error. The OpenAPI document lists them under the 200 response's `x-sse-events`.
SSE_EVENTS: dict[str, type[BaseModel]] = {
    "start": StreamStart,
    "chunk": StreamChunk,
    "done": GenerateResponse,
    "error": StreamError,
}


class Limits(BaseModel):
    max_length: int
    max_start_chars: int
    max_num_samples: int
    max_concurrency: int
    time_limit: float


class ModelInfo(BaseModel):
    name: str
    model: dict[str, Any] = Field(description="The network's configuration.")
    parameters: int
    vocab_size: int
    vocabulary: str
    dataset: str | None
    step: int | None
    metrics: dict[str, Any]
    val_loss: float | None = Field(description="Validation loss in nats per character.")
    val_bits_per_char: float | None
    device: str
    limits: Limits


class OpenAIModel(BaseModel):
    """A served model in OpenAI's shape (its `id` is the run's name), for OpenAI's clients."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When its checkpoint was written, in Unix seconds.")
    owned_by: Literal["charlstm"] = "charlstm"


class ModelList(BaseModel):
    """Both dialects' listing in one answer: charlstm's (`default`, `models`) and OpenAI's
    (`object`, `data`), so that the page and OpenAI's clients read the same GET /v1/models."""

    default: str
    models: list[ModelInfo]
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    streams: int = Field(description="Streams generating now, all models together.")
    max_concurrency: int


# Models that the responses below name by reference; create_app adds them to the document.
COMPONENTS: list[type[BaseModel]] = [
    ErrorResponse,
    ValidationErrorResponse,
    GenerateResponse,
    StreamStart,
    StreamChunk,
    StreamError,
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_response(description: str, model: type[BaseModel] = ErrorResponse, **headers: str) -> dict:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


def responses(
    config: ServerConfig,
    *,
    body: bool = False,
    auth: bool = True,
    extra: dict[int, dict[str, Any]] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """Every answer an operation can give besides its own (`extra`, by status code): those of the
    transport and security checks, those of a request body's checks with `body`, and 401 when the
    server asks for an API key and the path is not open (`auth`)."""
    out: dict[int | str, dict[str, Any]] = {
        400: json_response(
            "A Content-Length header that is not a number, or a body that is not UTF-8."
        ),
        403: json_response(
            "The Host header (or a browser's Origin) names a host this server does not answer to "
            "(DNS rebinding protection; see --allowed-hosts)."
        ),
        413: json_response(f"Request body over {config.max_body_bytes} bytes."),
        503: {
            "description": "The server is at its limit of open connections (plain text, from the "
            "HTTP server), or is shutting down.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    }
    if config.api_keys and auth:
        out[401] = json_response(
            "No API key, or one the server does not accept: send Authorization: Bearer KEY.",
            **{"WWW-Authenticate": 'Bearer realm="charlstm" (RFC 6750)'},
        )
    if body:
        out |= {
            408: json_response(f"The body did not arrive within {config.body_timeout:g} s."),
            415: json_response("Content-Type is not application/json."),
            422: json_response(
                "The body is not JSON, or a field is invalid: which, and why.",
                ValidationErrorResponse,
            ),
            429: json_response(
                f"The server is generating its limit of {config.max_concurrency} streams.",
                **{"Retry-After": "Seconds to wait before trying again."},
            ),
        }
    for status, response in (extra or {}).items():
        if status in out and "content" in out[status] and "content" in response:
            response = {
                "description": f"{response['description']} Or: {out[status]['description']}",
                "content": {**out[status]["content"], **response["content"]},
            }
        out[status] = response
    return out


# How POST /v1/generate ends when the generation cannot finish (the stream says it in an event).
GENERATE_FAILURES: dict[int, dict[str, Any]] = {
    500: json_response("The model failed on this request (other requests go on)."),
    503: json_response("The server is shutting down."),
    504: json_response("The generation ran past the server's time limit."),
}


def stream_ok() -> dict[str, Any]:
    """The 200 answer of POST /v1/generate/stream: server-sent events, each `event: NAME` then one
    `data:` line of JSON, listed by name under `x-sse-events`."""
    return {
        "description": "Server-sent events, each an `event:` line naming it and one `data:` line "
        "of JSON: `start` (StreamStart), one `chunk` per piece of text (StreamChunk), then `done` "
        "(the same object as POST /v1/generate returns) or `error` (StreamError, e.g. "
        "error=time_limit).",
        "content": {
            "text/event-stream": {
                "schema": sse_event(
                    {name: json_text(_ref(model)) for name, model in SSE_EVENTS.items()},
                    "One event of the stream (start, chunks, then done or error).",
                )
            }
        },
        "x-sse-events": {name: _ref(model) for name, model in SSE_EVENTS.items()},
    }


# ------------------------------------------------------------------------------ the document


def exact_integer_bounds(node: Any) -> None:
    """Every bound of an integer schema in `node` (a document or a part of one, changed in place)
    stated as an inclusive integer: FastAPI writes them as floats, and 2**64 as a float is not the
    bound the server checks to a reader who compares exactly (a fuzzer drew 2**64 + 382 as a valid
    seed). exclusiveMaximum 2**64 becomes maximum 2**64 - 1."""
    if isinstance(node, list):
        for item in node:
            exact_integer_bounds(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "integer":
        for key in ("minimum", "maximum"):
            if isinstance(node.get(key), float) and node[key].is_integer():
                node[key] = int(node[key])
        if isinstance(node.get("exclusiveMinimum"), int | float):
            node["minimum"] = math.floor(node.pop("exclusiveMinimum")) + 1
        if isinstance(node.get("exclusiveMaximum"), int | float):
            node["maximum"] = math.ceil(node.pop("exclusiveMaximum")) - 1
    for value in node.values():
        exact_integer_bounds(value)


def _char_class(chars: str) -> str:
    """A regular-expression class of exactly `chars`, the same in ECMA-262 (JSON Schema's dialect)
    and Python's `re`: special characters escaped, control characters as \\u escapes."""
    out = []
    for ch in sorted(set(chars)):
        if ch in "\\]^-[":
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch in "\x7f\ufeff" or 0xD800 <= ord(ch) < 0xE000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "[" + "".join(out) + "]"


def known_text(chars: str) -> tuple[str, str]:
    """(every, some): patterns of a start text whose characters the model knows, all of them or at
    least one, as `Server.admit` reads a text: a leading byte-order mark is dropped, and CR is a
    newline when the model knows LF (`normalise_newlines`)."""
    known = chars + ("\r" if "\n" in chars else "")
    cls = _char_class(known)
    return f"^\\ufeff?{cls}+$", cls


def vocabulary_rules(vocabularies: dict[str, str], default: str) -> dict[str, Any]:
    """The part of a native request's schema that says which start texts each served model takes
    (`Server.admit` refuses the others with 422): every character known, or with unknown "skip"
    at least one. With several models, one branch per model, chosen by `model` (the first one's
    also when `model` is absent, null or empty)."""
    branches = []
    for name, chars in vocabularies.items():
        every, some = known_text(chars)
        need = ["start_text"] if " " not in chars else []  # its default, " ", is not known
        rule: dict[str, Any] = {
            "anyOf": [
                {"properties": {"start_text": {"pattern": every}}, "required": need},
                {
                    "properties": {"unknown": {"const": "skip"}, "start_text": {"pattern": some}},
                    "required": ["unknown", *need],
                },
            ]
        }
        if len(vocabularies) > 1:
            which: dict[str, Any] = {
                "properties": {"model": {"const": name}},
                "required": ["model"],
            }
            if name == default:
                which = {
                    "anyOf": [
                        which,
                        {"not": {"required": ["model"]}},
                        {"properties": {"model": {"enum": [None, ""]}}},
                    ]
                }
            rule = {"allOf": [which, rule]}
        branches.append(rule)
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def model_choice(names: list[str]) -> dict[str, Any]:
    """A native request's `model`: a served model's name, or null or empty for the first one."""
    return {
        "anyOf": [{"type": "string", "enum": [*names, ""]}, {"type": "null"}],
        "description": "Which served model; the first one when null, empty or left out.",
    }


def json_text(schema: dict[str, Any]) -> dict[str, Any]:
    """A string that is JSON text of `schema` (an event's `data:`)."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def sse_event(events: dict[str, dict[str, Any]], description: str) -> dict[str, Any]:
    """The schema of one server-sent event, as a reader of the stream parses it: `event`, the
    event's name ("message" when the stream names none), and `data`, its text; `events` maps each
    name to the schema of its data (`json_text` for JSON)."""
    return {
        "type": "object",
        "description": description,
        "required": ["event", "data"],
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
        "anyOf": [
            {"properties": {"event": {"const": name}, "data": data}}
            for name, data in events.items()
        ],
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
