"""Run configuration: frozen dataclasses, one per component, loaded from TOML and overridden by flags.

A run's whole configuration is a :class:`RunConfig` made of four sections (``data``, ``model``,
``optim``, ``train``). Every field name is unique across sections, so a TOML file may use sections or
flat keys, and a CLI flag ``--hidden-size`` overrides ``model.hidden_size`` by name. An unknown or
mistyped key is an error that suggests the closest real one: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from charlstm.errors import UserError

CELLS = ("lstm", "gru", "rnn")
BATCHINGS = ("stream", "random")
SCHEDULES = ("plateau", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut into batches."""

    dataset: str | None = "byron-ru"
    text: str | None = None  # a file path; takes precedence over `dataset`
    prepared: str | None = None  # a folder made by `charlstm prepare` (memory-mapped); over both
    encoding: str = "utf-8"
    val_fraction: float = 0.1
    batching: str = "stream"
    batch_size: int = 8
    seq_len: int = 32


@dataclass(frozen=True)
class ModelConfig:
    """The network's architecture. `vocab_size` is filled from the corpus when training starts."""

    cell: str = "lstm"
    embedding_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.5  # between recurrent layers and before the output layer
    embedding_dropout: float = 0.2
    weight_drop: float = (
        0.6  # DropConnect on the hidden-to-hidden weights (AWD-LSTM), training only
    )
    # One dropout mask per sequence of a batch, shared by its time steps (variational dropout), for
    # the embedding and output dropouts; between stacked layers PyTorch's own dropout stays.
    locked_dropout: bool = False
    vocab_size: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """Adam, gradient clipping and the learning-rate schedule."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    amsgrad: bool = False
    grad_clip: float = 1.0
    schedule: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    warmup_steps: int = 0
    min_lr: float = 1e-5
    ema: float = 0.999  # decay of an exponential moving average of the weights; 0 disables it


@dataclass(frozen=True)
class TrainConfig:
    """Budgets, evaluation cadence, early stopping, reproducibility and hardware."""

    max_steps: int | None = None
    max_time: float | None = 300.0  # seconds of training, summed over resumes
    eval_interval: int = 50  # steps between validation passes
    early_stopping: int = 10  # evaluations without improvement before stopping; 0 disables
    sample_every: int = 5  # print a short sample every N evaluations; 0 disables
    sample_length: int = 200
    sample_temperature: float = 0.5
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    skip_nonfinite: int = 0  # non-finite steps to skip before stopping
    eval_streams: int = 8
    # Transfer (see transfer.py): start from another run's weights, or pre-train first.
    init_from: str | None = None  # a run folder or checkpoint whose weights the model starts from
    freeze_layers: int = 0  # with init_from: freeze the embedding and the lowest K recurrent layers
    pretrain: str | None = None  # a dataset name or text file to pre-train on before this run
    pretrain_time: float = 300.0  # seconds of the pre-training phase (the run's own is max_time)
    pretrain_config: str | None = (
        None  # a TOML preset overriding this run's fields for pre-training
    )
    report: bool = False  # write report.html and report.md (`charlstm report`) when training ends


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with fields replaced by name (flat names, as the CLI gives them)."""
        return apply_overrides(self, overrides)


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Map each field name to (section, field)."""
    index = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            index[f.name] = (section, f)
    return index


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation, converting ints to floats where a float is due."""
    options = _type_options(annotation)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"config key {name!r} cannot be empty")
    for opt in options:
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise UserError(f"config key {name!r} must be a finite number, got {value!r}")
            return float(value)
        if opt is str and isinstance(value, str):
            return value
    wanted = " or ".join(o.__name__ for o in options if o is not type(None))
    raise UserError(f"config key {name!r} must be {wanted}, got {value!r}")


_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _type_options(annotation: Any) -> tuple[type, ...]:
    """Turn an annotation (possibly a string under `from __future__ import annotations`) into types."""
    if isinstance(annotation, str):
        return tuple(_NAMES[part.strip()] for part in annotation.split("|"))
    if isinstance(annotation, types.UnionType):
        return tuple(annotation.__args__)
    return (annotation,)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(field_index()), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Replace fields by flat name; unknown names and wrong types raise `UserError`."""
    index = field_index()
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in overrides.items():
        if name not in index:
            raise UserError(
                f"unknown config key {name!r}{_suggest(name)}; see `charlstm train --help`"
            )
        section, f = index[name]
        per_section[section][name] = _coerce(name, value, f.type)
    new = {s: dataclasses.replace(getattr(config, s), **vals) for s, vals in per_section.items()}
    result = RunConfig(**new)
    validate(result)
    return result


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UserError(f"{name} must be positive, got {value!r}")


def validate(config: RunConfig) -> None:
    """Range checks that a type check cannot express."""
    d, m, o, t = config.data, config.model, config.optim, config.train
    _check_choice("batching", d.batching, BATCHINGS)
    _check_choice("cell", m.cell, CELLS)
    _check_choice("schedule", o.schedule, SCHEDULES)
    _check_choice("precision", t.precision, PRECISIONS)
    _check_choice("device", t.device, DEVICES)
    for name in ("batch_size", "seq_len"):
        _check_positive(name, getattr(d, name))
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
    _check_positive("max_steps", t.max_steps, allow_none=True)
    _check_positive("max_time", t.max_time, allow_none=True)
    _check_positive("eval_interval", t.eval_interval)
    _check_positive("eval_streams", t.eval_streams)
    _check_positive("threads", t.threads, allow_none=True)
    if t.early_stopping < 0 or t.skip_nonfinite < 0 or t.sample_every < 0:
        raise UserError("early_stopping, skip_nonfinite and sample_every must be >= 0")
    if not 0 <= t.freeze_layers <= m.num_layers:
        raise UserError(
            f"freeze_layers must be in [0, num_layers={m.num_layers}], got {t.freeze_layers}"
        )
    if t.freeze_layers and not (t.init_from or t.pretrain):
        raise UserError(
            "freeze_layers only makes sense with init_from or pretrain (frozen random "
            "weights learn nothing)"
        )
    if t.init_from and t.pretrain:
        raise UserError(
            "give init_from or pretrain, not both: pretrain makes the run to start from"
        )
    _check_positive("pretrain_time", t.pretrain_time)
    if t.pretrain_config and not t.pretrain:
        raise UserError("pretrain_config needs pretrain (the text to pre-train on)")


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
