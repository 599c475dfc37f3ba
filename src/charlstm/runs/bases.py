"""The base models shipped inside the package: what each is, where its file lies, and reading it.

A base model is a network that has already learnt a language from a large public-domain corpus
(`data.basecorpus`); a run on a small text starts from it instead of from random weights
(training/bases.py decides when). Each lives in ``charlstm/bases/NAME/``: ``base.safetensors`` (a
charlstm checkpoint with fp16 weights and no optimizer state, written by `charlstm export --format
base`) and ``card.md`` (its corpus, characters seen, steps, validation loss, the recipe, licence).

The sha256 and size of every shipped file are pinned here, in code, and checked before the file
is opened: a damaged or altered base is a one-line error naming the file and saying to reinstall,
never a traceback. Only then does it go through the header-first checks of any checkpoint
(`checkpoint.read_checkpoint`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from charlstm.errors import CheckpointError, UserError
from charlstm.runs.checkpoint import Checkpoint, read_checkpoint

WEIGHTS_FILE = "base.safetensors"
CARD_FILE = "card.md"


@dataclass(frozen=True)
class ShippedBase:
    """One base model in the package."""

    name: str
    language: str  # ISO 639-1 code
    corpus: str  # the base corpus it was trained on (data.basecorpus)
    sha256: str  # of base.safetensors
    size: int  # bytes of base.safetensors
    description: str
    location: Path | None = None  # a folder instead of the package's bases/NAME (tests use it)

    @property
    def folder(self) -> Path:
        if self.location is not None:
            return self.location
        return Path(str(resources.files("charlstm").joinpath("bases", self.name)))

    @property
    def path(self) -> Path:
        return self.folder / WEIGHTS_FILE

    @property
    def card(self) -> Path:
        return self.folder / CARD_FILE


BASES: dict[str, ShippedBase] = {}


def register(base: ShippedBase) -> None:
    BASES[base.name] = base


register(
    ShippedBase(
        "ru",
        "ru",
        "base-ru",
        "9ad588275bc6d2ffe9211cae85db46c8a82534ec7e3838919d47344fb0cccce7",
        6_900_658,
        "Russian: 19th- and early 20th-century prose and verse (RusLit), 2 × 512 LSTM",
    )
)
register(
    ShippedBase(
        "en",
        "en",
        "base-en",
        "dec17298d6fa72fe66f304f4ce5d396085712d46978c174ce489397b7feaf58d",
        6_864_044,
        "English: Project Gutenberg books of 40 authors who died before 1947, 2 × 512 LSTM",
    )
)


def get_base(name: str) -> ShippedBase:
    """The shipped base `name`, or a `UserError` listing the bases."""
    try:
        return BASES[name]
    except KeyError:
        raise UserError(
            f"unknown base {name!r}; the bases are {', '.join(BASES)} (see `charlstm bases`), "
            "or give auto, none or a run folder"
        ) from None


def verify(base: ShippedBase) -> Path:
    """The path of `base`'s weights, checked against the pinned size and sha256 first."""
    path = base.path
    reinstall = "reinstall charlstm (pip install --force-reinstall charlstm)"
    if not path.is_file():
        raise CheckpointError(f"the base model file {path} is missing; {reinstall}")
    size = path.stat().st_size
    if size != base.size:
        raise CheckpointError(
            f"the base model file {path} has {size:,} bytes, not the {base.size:,} shipped "
            f"(damaged or altered); {reinstall}"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != base.sha256:
        raise CheckpointError(
            f"the base model file {path} does not match its pinned sha256 (got {digest[:12]}…, "
            f"expected {base.sha256[:12]}…: damaged or altered); {reinstall}"
        )
    return path


def read_base(name: str) -> Checkpoint:
    """The checkpoint of the shipped base `name`, verified (`verify`), then read and checked as any
    checkpoint is. A file that passes the digest yet fails those checks is reported the same way."""
    base = get_base(name)
    path = verify(base)
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; reinstall charlstm") from None


def available() -> list[ShippedBase]:
    """The bases whose files are in the package (a source checkout may lack some)."""
    return [b for b in BASES.values() if b.path.is_file()]


def status() -> list[dict[str, str]]:
    """One row per shipped base: its name, description and whether its file is intact."""
    rows = []
    for base in BASES.values():
        try:
            verify(base)
            state = f"{base.path} ({base.size:,} bytes, intact); card: {base.card}"
        except CheckpointError as exc:
            state = str(exc)
        rows.append(
            {
                "name": base.name,
                "language": base.language,
                "corpus": base.corpus,
                "description": base.description,
                "state": state,
            }
        )
    return rows
