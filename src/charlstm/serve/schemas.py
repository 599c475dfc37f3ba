"""The server's configuration and its request, response and error shapes (its OpenAPI contract)."""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from charlstm.errors import UserError


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
        for name in (
            "max_length",
            "max_concurrency",
            "max_start_chars",
            "max_num_samples",
            "max_body_bytes",
        ):
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
    top_p: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling."
    )
    repetition_penalty: float = Field(1.0, ge=1, allow_inf_nan=False)
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


def request_model(config: ServerConfig) -> type[GenerateRequest]:
    """`GenerateRequest` with this server's limits in its schema, so that /docs shows them and one
    422 names every bad field at once."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        __doc__=GenerateRequest.__doc__,
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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Request body too large."},
    422: {"model": ValidationErrorResponse, "description": "A field is invalid: which, and why."},
    429: {
        "model": ErrorResponse,
        "description": "Too many concurrent generations; see Retry-After.",
    },
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
