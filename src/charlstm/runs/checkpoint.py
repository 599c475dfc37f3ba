"""Self-describing, crash-safe checkpoints that load without running any code.

A checkpoint is ONE safetensors file. Its tensors are the model weights (``model.*``) and, for the
``last/`` checkpoint, everything needed to resume exactly (``optim.*``, ``rng.*``, ``hidden.*``).
Its header metadata holds a JSON document: format and version, the model configuration, the
vocabulary, the whole run configuration, the step, the metrics and the resumable counters. One file
means one atomic ``os.replace``: a crash or a full disk at any moment leaves either the old file or
the new one, never a mixture.

Loading never unpickles, and reads only the header before deciding: the first bytes (a pickle or a
``torch.save`` zip is refused by name), the header length (a hostile header cannot make us allocate
gigabytes), the file length (a truncated file is named as such) and each tensor's dtype (float32,
float16 or bfloat16, and the few integer counters of a last/ checkpoint by name). Only then are the
tensors mapped from the file (copy-on-write: not read whole, not copied), the JSON validated against
the schema and the tensor shapes against the configuration.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as st_save

from charlstm.atomic import atomic_write_bytes
from charlstm.config import ModelConfig, RunConfig, apply_overrides, from_dict
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import CheckpointError, UserError
from charlstm.model import parameter_shapes

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


# The dtypes a tensor may have, by its name. Weights, Adam's moments, the weight average and the
# carried hidden state are floats of the three widths charlstm trains in; the few tensors of a
# last/ checkpoint that are not (a generator's state is bytes, the weight average's counter and a
# distributed run's world size are int64, Adam's step count is a float32 or float64 scalar) are
# named. A tensor of any other dtype is refused before it is mapped.
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BYTES = {"U8": torch.uint8}
COUNTER = {"I64": torch.int64}
STEP = {"F32": torch.float32, "F64": torch.float64}
# Every dtype name of the safetensors format: one outside these is not a safetensors file at all.
# fmt: off
SAFETENSORS_DTYPES = frozenset((
    "BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64",
    "F16", "BF16", "F32", "F64", "C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3", "F8_E5M2", "F8_E8M0",
))
# fmt: on


def allowed_dtypes(name: str) -> dict[str, torch.dtype]:
    """The dtypes the tensor `name` may have in a charlstm checkpoint (see above)."""
    if name.startswith("rng."):
        return BYTES
    if name in ("ema.n_averaged", "dist.world_size"):
        return COUNTER
    if name.startswith("optim.") and name.endswith(".step"):
        return STEP
    return FLOATS


def _read_header(path: Path, fh: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """The safetensors header of the open file `fh` (of `size` bytes) and where its tensor data
    starts. Only the header is read, and only once its length is known to be sane."""
    head = fh.read(16)
    if size < 8 or len(head) < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes); use an intact copy")
    (n,) = struct.unpack("<Q", head[:8])
    # A safetensors header is JSON, so byte 8 is "{". Only when it is not do we look for a pickle's
    # magic bytes: the low byte of a real header's length may well be 0x80, pickle's first byte.
    if head[8:9] != b"{" and size > 8:
        if _looks_like_pickle(head):
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
    fh.seek(8)
    raw = fh.read(n)
    if 8 + n > size or len(raw) < n:
        raise CheckpointError(f"{path} is truncated (header cut short); use an intact copy")
    try:
        header = json.loads(raw)
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
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated ({size:,} of {8 + n + end:,} bytes); use an intact copy"
        )
    return header, 8 + n


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data, after the header
    end: int


def _entries(path: Path, header: dict[str, Any], data_bytes: int) -> list[_Entry]:
    """The tensors the header describes, checked as safetensors checks them (known dtype, a shape
    that fills its bytes exactly, the data covered without gaps or overlaps) and against the
    dtypes charlstm allows for each name."""

    def invalid(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file ({why})")

    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info.get("dtype"), info.get("shape")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise invalid(f"tensor {name!r} has an unknown dtype {dtype!r}")
        allowed = allowed_dtypes(name)
        if dtype not in allowed:
            names = [str(t).removeprefix("torch.") for t in allowed.values()]
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}; a charlstm checkpoint holds "
                f"{', '.join(names[:-1])}{' or ' if len(names) > 1 else ''}{names[-1]} there; "
                "the file is damaged or not charlstm's"
            )
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise invalid(f"tensor {name!r} has a malformed shape {shape!r}")
        begin, end = info["data_offsets"]
        numel = math.prod(shape)
        if end < begin or (end - begin) != numel * allowed[dtype].itemsize:
            raise invalid(f"tensor {name!r}: shape {shape} does not fill bytes {begin}..{end}")
        entries.append(_Entry(name, allowed[dtype], tuple(shape), begin, end))
    covered = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != covered:
            raise invalid(f"tensor {e.name!r} does not start where the one before it ends")
        covered = e.end
    if covered != data_bytes:
        raise invalid(f"{data_bytes - covered:,} bytes after the last tensor")
    return entries


def _map_tensors(path: Path, fh: BinaryIO, start: int, entries: list[_Entry]) -> dict:
    """The tensors, backed by a private (copy-on-write) memory map of the file: nothing is read
    until a tensor is used, and nothing is copied (a tensor whose bytes are not aligned for its
    dtype, which charlstm never writes, is copied once)."""
    if not any(e.end > e.begin for e in entries):
        return {e.name: torch.empty(e.shape, dtype=e.dtype) for e in entries}
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    need = start + max(e.end for e in entries)
    if len(mm) < need:  # it shrank since its header was read
        raise CheckpointError(
            f"{path} is truncated ({len(mm):,} of {need:,} bytes); use an intact copy"
        )
    tensors = {}
    for e in entries:
        if e.end == e.begin:
            tensors[e.name] = torch.empty(e.shape, dtype=e.dtype)
            continue
        flat = torch.frombuffer(
            mm, dtype=e.dtype, count=(e.end - e.begin) // e.dtype.itemsize, offset=start + e.begin
        )
        if (start + e.begin) % e.dtype.itemsize:
            flat = flat.clone()
        tensors[e.name] = flat.reshape(e.shape)
    return tensors


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether `path` is a charlstm checkpoint by its header (only the header is read)."""
    try:
        with open(path, "rb") as fh:
            header, _ = _read_header(Path(path), fh, os.fstat(fh.fileno()).st_size)
        meta = json.loads((header.get("__metadata__") or {}).get("charlstm") or "null")
    except (CheckpointError, OSError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint file; every failure is a one-line `CheckpointError`.

    The header is read first (its length checked before it is read); the tensors are then mapped
    from the file, never read whole into memory."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint file at {path}; give a run folder made by `charlstm train`"
        )
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise CheckpointError(f"{path} is {size:,} bytes, larger than any charlstm checkpoint")
        header, start = _read_header(path, fh, size)
        raw_meta = (header.get("__metadata__") or {}).get("charlstm")
        if raw_meta is None:
            raise CheckpointError(f"{path} is a safetensors file but not a charlstm checkpoint")
        try:
            meta = json.loads(raw_meta)
        except (json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{path} has unreadable charlstm metadata") from None
        entries = _entries(path, header, size - start)
        tensors = _map_tensors(path, fh, start, entries)
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
        expected = parameter_shapes(mc)  # by arithmetic: nothing is built or allocated
        size = sum(math.prod(shape) for shape in expected.values())
        if min(min(shape) for shape in expected.values()) < 1:
            raise ValueError("a size below 1")
        if size > MAX_FILE_BYTES // 2:  # fp16, the smallest a checkpoint stores
            raise ValueError(f"{size:,} parameters, more than a file this reader opens can hold")
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} describes a model that cannot be built ({exc})") from None
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise CheckpointError(
            f"{path} weights do not match the model (missing {missing}, extra {extra})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the configuration says "
                f"{expected[name]}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} holds non-finite or non-float values")
    if not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"{path} has an invalid step count")
    for key, value in (meta.get("metrics") or {}).items():
        if isinstance(value, float) and not math.isfinite(value) and key != "best_val_loss":
            raise CheckpointError(f"{path} metric {key} is not finite")
