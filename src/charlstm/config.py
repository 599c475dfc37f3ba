"""Run configuration: frozen, type-checked dataclasses, one per component, from TOML and flags.

A run's whole configuration is a :class:`RunConfig` made of four sections (``data``,
``model``, ``optim``, ``train``). Every field name is unique across sections, so a TOML file may use
sections or flat keys, and a CLI flag ``--hidden-size`` overrides ``model.hidden_size`` by name. An
unknown or mistyped key is an error that suggests the closest real one: a typo must never be
silently ignored.

The sections are pydantic dataclasses in strict mode: an int is accepted where a float is due, but a
bool is never an int and a string is never a number; NaN and infinity are refused; a fixed choice is
a ``Literal``. A validation failure becomes a one-line :class:`UserError` naming the key. Each field
carries a one-line description in its metadata (``metadata["description"]``): what it does and when
to change it, which the CLI shows as the flag's help.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import re
import tomllib
import types
import typing
from dataclasses import field, fields
from functools import cache, wraps
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from charlstm.errors import UserError

Cell = Literal["lstm", "gru", "rnn"]
Batching = Literal["stream", "random"]
Schedule = Literal["plateau", "cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Switch = Literal["on", "off"]

CELLS: tuple[str, ...] = get_args(Cell)
BATCHINGS: tuple[str, ...] = get_args(Batching)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(Device)

# strict: no str → number and no bool → int (an int still becomes a float where one is due);
# allow_inf_nan: a NaN budget or rate is never what the user meant.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


def _field(default: Any, description: str) -> Any:
    """A field with its default and its one-line description (the CLI's help for its flag)."""
    return field(default=default, metadata={"description": description})


def _user_errors(cls: type) -> type:
    """Make a validation failure in `cls(...)` (and `dataclasses.replace`) a one-line UserError."""
    init = cls.__init__

    @wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise _user_error(cls, exc) from None

    cls.__init__ = __init__
    return cls


def _section(cls: type) -> type:
    return _user_errors(dataclass(frozen=True, config=_STRICT)(cls))


@_section
class DataConfig:
    """Where the text comes from and how it is cut into batches."""

    dataset: str | None = _field(
        "byron-ru", "Named corpus to train on (see `charlstm datasets`); --text or --prepared wins."
    )
    text: str | tuple[str, ...] | None = _field(
        None,
        "Text to train on instead of a named dataset (wins over --dataset): a file, a folder "
        "(every file under it) or a quoted glob ('src/**/*.c'); repeatable, each file a document.",
    )
    prepared: str | None = _field(
        None,
        "Folder made by `charlstm prepare` (wins over both): for texts larger than memory.",
    )
    encoding: str = _field(
        "utf-8", "Codec of the --text file (any Python codec); e.g. cp1251 for an old Russian file."
    )
    val_fraction: float = _field(
        0.1, "Share at the end of the text held out for validation; 0.05 leaves more to train on."
    )
    test_fraction: float = _field(
        0.0,
        "Share at the very end held out as a test split, measured once when training ends and by "
        "`charlstm evaluate` (never for early stopping); 0: none.",
    )
    skip_bad_files: bool = _field(
        False,
        "Leave out files of a --text folder or glob that are binary or not valid --encoding "
        "(counted) instead of stopping at the first.",
    )
    batching: Batching = _field(
        "stream",
        "stream: contiguous streams that carry the hidden state; random: the lab's random windows.",
    )
    batch_size: int = _field(
        8, "Sequences per step; raise it on a large text or a GPU, keep it small on a small text."
    )
    seq_len: int = _field(
        32, "Characters per window gradients flow back through; raise it for longer structure."
    )

    @field_validator("text", mode="before")
    @classmethod
    def _text_values(cls, value: Any) -> Any:
        """Many values (a TOML array, a repeated flag) become a tuple, one value stays a string,
        so that a config of one file reads and writes as it always has."""
        if isinstance(value, list | tuple):
            if not value:
                raise UserError("text names no file; give a file, a folder or a glob")
            return value[0] if len(value) == 1 else tuple(value)
        return value


@_section
class ModelConfig:
    """The network's architecture. `vocab_size` is filled from the corpus when training starts."""

    cell: Cell = _field(
        "lstm", "Recurrent cell; gru and rnn are for comparison (`charlstm compare`)."
    )
    embedding_size: int = _field(
        64, "Size of each character's embedding; rarely worth changing (vocabularies are small)."
    )
    hidden_size: int = _field(
        256,
        "Units per recurrent layer (capacity): raise it for a large text, lower it if it overfits.",
    )
    num_layers: int = _field(2, "Stacked recurrent layers; 2 or 3 suit most texts.")
    dropout: float = _field(
        0.5,
        "Dropout between layers and before the output; raise it if validation loss rises early.",
    )
    embedding_dropout: float = _field(
        0.2, "Dropout on the character embeddings; a regulariser for small texts, 0 for large ones."
    )
    weight_drop: float = _field(
        0.6,
        "DropConnect on the recurrent weights (AWD-LSTM), training only; lower it on a large text.",
    )
    locked_dropout: bool = _field(
        False,
        "One mask per sequence for the embedding and output dropouts (variational dropout).",
    )
    vocab_size: int = _field(0, "Filled from the corpus when training starts; not a setting.")


@_section
class OptimConfig:
    """Adam, gradient clipping and the learning-rate schedule."""

    lr: float = _field(
        3e-3, "Adam's learning rate; lower it if the loss jumps or turns non-finite (e.g. 1e-3)."
    )
    weight_decay: float = _field(
        0.0, "Adam's L2 penalty on the weights; 0 leaves regularisation to dropout and ema."
    )
    amsgrad: bool = _field(False, "Adam's AMSGrad variant; try it if training is unstable.")
    grad_clip: float = _field(
        1.0, "Clip the gradients' global norm to this; lower it if the loss spikes."
    )
    schedule: Schedule = _field(
        "plateau",
        "plateau: lower the rate when validation stalls; cosine: decay over a fixed budget.",
    )
    plateau_factor: float = _field(
        0.5, "With --schedule plateau: multiply the rate by this when validation stalls."
    )
    plateau_patience: int = _field(
        5, "With --schedule plateau: evaluations without improvement before the rate drops."
    )
    warmup_steps: int = _field(
        0, "Steps of linear warm-up from 0 to --lr; helps large models and batches start stably."
    )
    min_lr: float = _field(1e-5, "Lowest rate the plateau and cosine schedules go down to.")
    decay_steps: int | None = _field(
        None,
        "With --schedule cosine: steps the rate decays over, so that a run with the same settings "
        "and seed repeats (the clock counts only once a run is a tenth of --max-time behind "
        "them; --resume with another --max-time scales them); unset: over the budget "
        "(--max-steps, or --max-time by the clock).",
    )
    ema: float = _field(
        0.999,
        "Decay of the weights' average used for evaluation; 0 disables it, 0.9998 for small texts.",
    )


@_section
class TrainConfig:
    """Budgets, evaluation cadence, early stopping, reproducibility and hardware."""

    auto: Switch = _field(
        "on",
        "on: choose the model, batch, dropouts, schedule and evaluation from the text, the budget "
        "and this machine's measured speed (settings you give win); off: the fixed defaults.",
    )
    max_steps: int | None = _field(
        None, "Stop after this many steps (summed over resumes); unset means no step limit."
    )
    max_time: float | None = _field(
        300.0,
        "Seconds of training (90, 60s, 10m or 1.5h), summed over resumes: the main budget.",
    )
    eval_interval: int = _field(
        50, "Steps between validation passes and checkpoints; lower it for short runs."
    )
    early_stopping: int = _field(
        10, "Evaluations without a better validation loss before stopping; 0 disables it."
    )
    sample_every: int = _field(
        5, "Print a short sample every N evaluations; 0 disables it (e.g. in scripts)."
    )
    sample_length: int = _field(200, "Characters in each sample printed during training.")
    sample_temperature: float = _field(
        0.5, "Temperature of the samples printed during training (0 is greedy)."
    )
    seed: int = _field(
        1337, "Seed of the weights, batches and dropout; change it to repeat a run with new luck."
    )
    device: Device = _field("auto", "Where to train: auto takes a CUDA GPU when there is one.")
    precision: Precision = _field(
        "auto", "Matrix products in bf16 or fp32; auto takes bf16 where the hardware has it."
    )
    threads: int | None = _field(
        None, "Torch threads; unset uses one per core. Set it when other jobs share the machine."
    )
    skip_nonfinite: int = _field(
        0, "Non-finite steps to skip before stopping; raise it only for rare overflow spikes."
    )
    eval_streams: int = _field(
        8,
        "Streams the validation text is cut into; more is faster, fewer carries more context. "
        "A split longer than this × 50 k characters is read in more, up to 256.",
    )
    eval_chars: int = _field(
        16384,
        "Validation characters a scheduled evaluation scores: stretches of 128 spread over the "
        "split, the same each time; 0 reads it all. The final figures always read the whole split.",
    )
    # A base model (training/bases.py): a network shipped in the package that already knows a
    # language, fine-tuned on the text instead of training from scratch.
    base: str = _field(
        "auto",
        "Start from a shipped base model: auto decides from the text and the budget (see "
        "`charlstm bases`), none trains from scratch, a base's name or a run folder picks one.",
    )
    base_sha256: str | None = _field(
        None,
        "The sha256 of the base's weights, recorded when a run starts from one, so that "
        "--config RUN/config.toml repeats it with the very same base; not a setting.",
    )
    # Transfer (see training/transfer.py): start from another run's weights, or pre-train first.
    init_from: str | None = _field(
        None, "Run folder or checkpoint whose weights the model starts from (fine-tuning)."
    )
    freeze_layers: int = _field(
        0, "With --init-from or --pretrain: freeze the embedding and the lowest K layers."
    )
    pretrain: str | None = _field(
        None,
        "Dataset name, or a file, folder or glob as --text takes, to pre-train on first (into "
        "OUT-pretrain), then fine-tune.",
    )
    pretrain_time: float = _field(
        300.0, "Seconds of the pre-training phase, e.g. 300 or 5m (the run's budget is --max-time)."
    )
    pretrain_config: str | None = _field(
        None, "TOML preset overriding this run's settings for the pre-training phase."
    )
    report: bool = _field(
        False, "Write report.html and report.md (`charlstm report`) when training ends."
    )
    tensorboard: str | None = _field(
        None,
        "Write the curves and samples as TensorBoard event files in DIR/NAME, NAME being the run "
        "folder's name (pip install 'charlstm[tensorboard]').",
    )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@_user_errors
@dataclass(frozen=True, config=_STRICT)
class RunConfig:
    """A whole run's configuration; one that exists has passed `validate`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with fields replaced by name (flat names, as the CLI gives them)."""
        return apply_overrides(self, overrides)


# ---------------------------------------------------------------------------------------- fields


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Map each field name to (section, field)."""
    index = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            index[f.name] = (section, f)
    return index


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What a command line needs to know about one field."""

    name: str
    section: str
    default: Any
    description: str
    kind: type  # int, float, str or bool: what a flag's text is parsed as before validation
    choices: tuple[Any, ...] | None  # the values of a Literal field
    optional: bool  # None is a valid value


def _hint(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None was allowed)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), optional
    return annotation, False


@cache
def field_specs() -> dict[str, FieldSpec]:
    """Every field by flat name, its type reduced to what a flag parses (unknown types: str)."""
    specs = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            hint, optional = _hint(hints[f.name])
            choices = get_args(hint) if get_origin(hint) is Literal else None
            if choices:
                kind = type(choices[0])
            else:
                kind = hint if hint in (bool, int, float, str) else str
            specs[f.name] = FieldSpec(
                f.name,
                section,
                f.default,
                f.metadata.get("description", ""),
                kind,
                choices,
                optional,
            )
    return specs


def _type_name(hint: Any) -> str:
    hint, _ = _hint(hint)
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _user_error(cls: type, exc: ValidationError) -> UserError:
    """The first problem pydantic found, as one line naming the key and what it must be."""
    err = exc.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err["loc"] else cls.__name__
    value = err.get("input")
    hints = typing.get_type_hints(cls)
    if name not in hints or err["type"] == "unexpected_keyword_argument":
        return UserError(
            f"unknown config key {name!r}{_suggest(name)}; see `charlstm train --help`"
        )
    hint, _ = _hint(hints[name])
    if value is None:
        return UserError(f"config key {name!r} cannot be empty")
    if err["type"] == "finite_number":
        return UserError(f"config key {name!r} must be a finite number, got {value!r}")
    if get_origin(hint) is Literal:
        return UserError(f"{name} must be one of {', '.join(get_args(hint))}, got {value!r}")
    return UserError(f"config key {name!r} must be {_type_name(hint)}, got {value!r}")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(field_index()), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------- overrides


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Replace fields by flat name; unknown names and wrong types raise `UserError`."""
    index = field_index()
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in overrides.items():
        if name not in index:
            raise UserError(
                f"unknown config key {name!r}{_suggest(name)}; see `charlstm train --help`"
            )
        per_section[index[name][0]][name] = value
    new = {s: dataclasses.replace(getattr(config, s), **vals) for s, vals in per_section.items()}
    return RunConfig(**new)


SOURCES = ("dataset", "text", "prepared")  # where the text comes from; one given replaces the rest


def cli_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The overrides that command-line flags stand for.

    A flag left at None was not given. Giving one of --dataset, --text or --prepared clears the
    others (the default dataset and a preset's included), so that the text named on the command
    line is the one trained on, and the one that names the output folder and the tables.
    """
    overrides = {k: v for k, v in flags.items() if v is not None}
    if any(k in overrides for k in SOURCES):
        for k in SOURCES:
            overrides.setdefault(k, None)
    return overrides


def apply_cli_overrides(config: RunConfig, flags: dict[str, Any]) -> RunConfig:
    """`config` with command-line flags applied (see `cli_overrides`)."""
    return config.replace(**cli_overrides(flags))


def dataset_label(config: RunConfig) -> str:
    """The name of a run's text: the prepared folder's name, the text file's stem or the dataset."""
    d = config.data
    if d.prepared:
        return Path(d.prepared).name
    if d.text:
        return _text_stem(d.text)
    return d.dataset or "untitled"


def _text_stem(text: str | tuple[str, ...]) -> str:
    """A file's stem, a folder's name, a glob's fixed leading folders' name (``linux/**/*.c`` →
    ``linux``), and ``+N`` when N more values follow."""
    values = [text] if isinstance(text, str) else list(text)
    path = Path(values[0])
    if set("*?[") & set(values[0]) and not path.exists():
        fixed = path.parts[: _first_glob_part(path.parts)]
        name = Path(*fixed).name if fixed else "glob"
    else:
        name = path.name if path.is_dir() else path.stem
    return (name or "text") + (f"+{len(values) - 1}" if len(values) > 1 else "")


def _first_glob_part(parts: tuple[str, ...]) -> int:
    return next((i for i, part in enumerate(parts) if set("*?[") & set(part)), len(parts))


def default_run_folder(config: RunConfig, parent: str | Path = "runs") -> Path:
    """Where a run goes when no --out is given: ``runs/<dataset label>`` (or under `parent`)."""
    return Path(parent) / dataset_label(config)


# ---------------------------------------------------------------------------------------- TOML


def flatten_toml(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept both sectioned (`[model] hidden_size = 256`) and flat (`hidden_size = 256`) TOML."""
    flat: dict[str, Any] = {}
    index = field_index()
    for key, value in doc.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, subval in value.items():
                if sub not in index or index[sub][0] != key:
                    raise UserError(f"unknown key {key}.{sub} in {source}{_suggest(sub)}")
                flat[sub] = subval
        elif key in index:
            flat[key] = value
        else:
            raise UserError(f"unknown key {key!r} in {source}{_suggest(key)}")
    return flat


def load_toml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"config file {str(path)!r} does not exist; check the path given to --config"
        )
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid TOML ({exc}); fix the file") from None
    return apply_overrides(base or RunConfig(), flatten_toml(doc, str(path)))


def toml_keys(path: str | Path | None) -> set[str]:
    """The field names a TOML preset sets (none without a path)."""
    if not path:
        return set()
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the preset {path} ({exc})") from None
    return set(flatten_toml(doc, str(path)))


def from_dict(doc: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (e.g. a checkpoint's or run folder's config)."""
    return apply_overrides(RunConfig(), flatten_toml(doc, "the stored config"))


def to_toml(config: RunConfig) -> str:
    import tomli_w

    doc = {
        s: {k: v for k, v in vals.items() if v is not None} for s, vals in config.to_dict().items()
    }
    return tomli_w.dumps(doc)


# ---------------------------------------------------------------------------------------- ranges


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UserError(f"{name} must be positive, got {value!r}")


def validate(config: RunConfig) -> None:
    """Range checks that a type cannot express (types and choices are checked on construction)."""
    d, m, o, t = config.data, config.model, config.optim, config.train
    for name in ("batch_size", "seq_len"):
        _check_positive(name, getattr(d, name))
    if not 0 <= d.test_fraction < 1 or (d.test_fraction and d.val_fraction + d.test_fraction >= 1):
        raise UserError(
            f"test_fraction must be in [0, 1) and leave text to train on, got {d.test_fraction} "
            f"with val_fraction {d.val_fraction}; use e.g. 0.1"
        )
    for name in ("embedding_size", "hidden_size", "num_layers"):
        _check_positive(name, getattr(m, name))
    for name in ("dropout", "embedding_dropout", "weight_drop"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {getattr(m, name)}")
    _check_positive("lr", o.lr)
    if not 0 <= o.ema < 1:
        raise UserError(f"ema must be in [0, 1), got {o.ema}; e.g. 0.99, or 0 to disable")
    if o.weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0, got {o.weight_decay}")
    if not 0 < o.plateau_factor < 1:
        raise UserError(f"plateau_factor must be in (0, 1), got {o.plateau_factor}")
    _check_positive("decay_steps", o.decay_steps, allow_none=True)
    _check_positive("max_steps", t.max_steps, allow_none=True)
    _check_positive("max_time", t.max_time, allow_none=True)
    _check_positive("eval_interval", t.eval_interval)
    _check_positive("eval_streams", t.eval_streams)
    if t.eval_chars < 0:
        raise UserError(f"eval_chars must be >= 0, got {t.eval_chars}; 0 reads the whole split")
    _check_positive("threads", t.threads, allow_none=True)
    if t.early_stopping < 0 or t.skip_nonfinite < 0 or t.sample_every < 0:
        raise UserError("early_stopping, skip_nonfinite and sample_every must be >= 0")
    if not 0 <= t.freeze_layers <= m.num_layers:
        raise UserError(
            f"freeze_layers must be in [0, num_layers={m.num_layers}], got {t.freeze_layers}"
        )
    if t.freeze_layers and not (t.init_from or t.pretrain or t.base != "none"):
        raise UserError(
            "freeze_layers only makes sense with init_from, pretrain or a base (frozen random "
            "weights learn nothing)"
        )
    if t.base not in ("auto", "none") and (t.init_from or t.pretrain):
        raise UserError(
            "give --base or --init-from/--pretrain, not both: each names what the run starts from"
        )
    if t.init_from and t.pretrain:
        raise UserError(
            "give init_from or pretrain, not both: pretrain makes the run to start from"
        )
    _check_positive("pretrain_time", t.pretrain_time)
    if t.pretrain_config and not t.pretrain:
        raise UserError("pretrain_config needs pretrain (the text to pre-train on)")


# ---------------------------------------------------------------------------------------- durations

_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(h|min|m|sec|s)?")


def parse_duration(value: str | float) -> float:
    """Seconds from a budget such as ``90``, ``"60s"``, ``"2m"``, ``"1.5h"`` or ``"1m30s"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text, seconds, pos = str(value).strip().lower(), 0.0, 0
        while pos < len(text):
            match = _DURATION_PART.match(text, pos)
            if match is None:
                break
            seconds += float(match[1]) * _UNITS[match[2]]
            pos = match.end()
        if not text or pos < len(text):
            raise UserError(f"a duration looks like 90, 60s, 2m or 1h, got {value!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"a duration must be a positive number of seconds, got {value!r}")
    return seconds
