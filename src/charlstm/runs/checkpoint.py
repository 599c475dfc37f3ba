"""Self-describing, crash-safe checkpoints that load without running any code.

A checkpoint is ONE safetensors file. Its tensors are the model weights (``model.*``) and, for the
``last/`` checkpoint, everything needed to resume exactly (``optim.*``, ``rng.*``, ``hidden.*``).
Its header metadata holds a JSON document: format and version, the model configuration, the
vocabulary, the whole run configuration, the step, the metrics and the resumable counters. One file
means one atomic ``os.replace``: a crash or a full disk at any moment leaves either the old file or
the new one, never a mixture.

Loading never unpickles. Before safetensors parses anything we check the first bytes (a pickle or a
``torch.save`` zip is refused by name), the header length (a hostile header cannot make us allocate
gigabytes) and the file length (a truncated file is named as such); then the JSON is validated
against the schema and the tensor shapes against the configuration.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from charlstm.atomic import atomic_write_bytes
from charlstm.config import ModelConfig, RunConfig, apply_overrides, from_dict
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import CheckpointError, UserError
from charlstm.model import CharRNN

FORMAT = "charlstm-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 8 * 1024**3


@dataclass
class Checkpoint:
    """What a checkpoint file holds once validated."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def model_config(self) -> ModelConfig:
        return model_config_from_meta(self.meta)

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary.from_list(self.meta["vocab"])

    @property
    def run_config(self) -> RunConfig:
        return from_dict(self.meta["config"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            k[len(prefix) + 1 :]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")
        }


# ---------------------------------------------------------------------------------------- writing


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Serialise and atomically write one checkpoint file; a failed write keeps the previous one."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(cpu, metadata={"charlstm": json.dumps(meta, ensure_ascii=False)})
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); "
            "the previous checkpoint is intact; free some disk space and resume with --resume"
        ) from None


# ---------------------------------------------------------------------------------------- reading


def _looks_like_pickle(data: bytes) -> bool:
    """A zip (what `torch.save` writes) or a protocol 2-5 pickle, by their first bytes."""
    return data.startswith(b"PK\x03\x04") or (data[:1] == b"\x80" and 2 <= data[1] <= 5)


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated ({len(data)} bytes); use an intact copy")
    (n,) = struct.unpack("<Q", data[:8])
    # A safetensors header is JSON, so byte 8 is "{". Only when it is not do we look for a pickle's
    # magic bytes: the low byte of a real header's length may well be 0x80, pickle's first byte.
    if data[8:9] != b"{" and len(data) > 8:
        if _looks_like_pickle(data):
            raise CheckpointError(
                f"{path} is a pickle (torch.save) file; charlstm never unpickles, since loading a "
                "pickle can run code; use a charlstm safetensors checkpoint"
            )
        raise CheckpointError(f"{path} is not a charlstm checkpoint (not a safetensors file)")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path} claims a {n:,}-byte header (limit {MAX_HEADER_BYTES:,}); "
            "it is corrupt or hostile"
        )
    if 8 + n > len(data):
        raise CheckpointError(f"{path} is truncated (header cut short); use an intact copy")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    # (byte 8 is "{", so a header that parses is an object)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{path} has malformed safetensors metadata")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise CheckpointError(f"{path} has a malformed entry for tensor {name!r}")
        end = max(end, offsets[1])
    if 8 + n + end > len(data):
        raise CheckpointError(
            f"{path} is truncated ({len(data):,} of {8 + n + end:,} bytes); use an intact copy"
        )
    return header


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint file; every failure is a one-line `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint file at {path}; give a run folder made by `charlstm train`"
        )
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"{path} is {size:,} bytes, larger than any charlstm checkpoint")
    data = path.read_bytes()
    header = _read_header(path, data)
    raw_meta = (header.get("__metadata__") or {}).get("charlstm")
    if raw_meta is None:
        raise CheckpointError(f"{path} is a safetensors file but not a charlstm checkpoint")
    try:
        meta = json.loads(raw_meta)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path} has unreadable charlstm metadata") from None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    ckpt = Checkpoint(path, meta, tensors)
    validate_checkpoint(ckpt)
    return ckpt


def model_config_from_meta(meta: dict[str, Any]) -> ModelConfig:
    return apply_overrides(RunConfig(), dict(meta["model"])).model


def validate_checkpoint(ckpt: Checkpoint) -> None:
    """The schema: format, version, model config, vocabulary, and tensors that fit them."""
    meta, path = ckpt.meta, ckpt.path
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charlstm checkpoint (wrong format tag)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this charlstm reads version "
            f"{FORMAT_VERSION}; use the charlstm release that wrote it"
        )
    for key in ("model", "vocab", "config", "step"):
        if key not in meta:
            raise CheckpointError(f"{path} metadata lacks {key!r}; the file is damaged")
    if not all(isinstance(meta[k], dict) for k in ("model", "config")) or not isinstance(
        meta.get("metrics") or {}, dict
    ):
        raise CheckpointError(
            f"{path} has malformed metadata (model, config or metrics is not a table)"
        )
    try:
        mc = model_config_from_meta(meta)
        from_dict(meta["config"])
    except (UserError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} has an invalid configuration ({exc})") from None
    vocab = meta["vocab"]
    # A lone surrogate is not a character any text can hold; printing one would crash the CLI.
    if not (
        isinstance(vocab, list)
        and vocab
        and all(
            isinstance(c, str) and len(c) == 1 and not 0xD800 <= ord(c) <= 0xDFFF for c in vocab
        )
    ):
        raise CheckpointError(f"{path} has a malformed vocabulary")
    if len(set(vocab)) != len(vocab):
        raise CheckpointError(f"{path} has a vocabulary with repeated characters")
    if len(vocab) != mc.vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary has {len(vocab)} characters but the model expects {mc.vocab_size}"
        )
    state = ckpt.model_state()
    # Each recurrent layer stores several tensors; a config declaring more layers than the file
    # holds tensors is refused before building it (a hostile num_layers could take minutes).
    if mc.num_layers > len(state):
        raise CheckpointError(
            f"{path} declares {mc.num_layers} layers but holds only {len(state)} model tensors"
        )
    try:
        with torch.device("meta"):  # shapes only: no memory is allocated
            expected = CharRNN(mc).state_dict()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path} describes a model that cannot be built ({exc})") from None
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise CheckpointError(
            f"{path} weights do not match the model (missing {missing}, extra {extra})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the configuration says "
                f"{tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} holds non-finite or non-float values")
    if not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"{path} has an invalid step count")
    for key, value in (meta.get("metrics") or {}).items():
        if isinstance(value, float) and not math.isfinite(value) and key != "best_val_loss":
            raise CheckpointError(f"{path} metric {key} is not finite")
