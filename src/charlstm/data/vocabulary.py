"""Vocabulary: the lab's forward and reverse dictionaries between characters and indices.

Characters are Unicode code points, never bytes, so "ё" or an emoji is one symbol. The order is
deterministic (most frequent first, as the lab sorts them, ties broken by code point) and the
vocabulary is stored in every checkpoint, so generation never re-reads the corpus to rebuild it.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from charlstm.errors import UserError

UNKNOWN_POLICIES = ("error", "skip")


def describe_char(ch: str) -> str:
    """A readable name for a character in error messages.

    E.g. '\\n' or 'U+0301 COMBINING ACUTE ACCENT'."""
    if ch.isprintable() and not ch.isspace():
        return repr(ch)
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}{' ' + name if name else ''}"


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of characters with `encode`/`decode` and a policy for unknown characters."""

    chars: tuple[str, ...]
    char_to_idx: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be distinct")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("vocabulary entries must be single code points")
        object.__setattr__(self, "char_to_idx", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        counts = Counter(text)
        ordered = sorted(counts, key=lambda c: (-counts[c], ord(c)))
        return cls(tuple(ordered))

    @property
    def idx_to_char(self) -> dict[int, str]:
        """The lab's reverse dictionary."""
        return dict(enumerate(self.chars))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self.char_to_idx

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` that the vocabulary lacks, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.char_to_idx))

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Map text to indices. Unknown characters raise `UserError`, or are dropped with a warning
        under ``unknown="skip"``."""
        if unknown not in UNKNOWN_POLICIES:
            raise UserError(
                f"unknown-character policy {unknown!r} is not one of {UNKNOWN_POLICIES}"
            )
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(describe_char(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            if unknown == "error":
                raise UserError(
                    f"the text has characters the model never saw: {shown}{more}; "
                    "remove them or pass --unknown skip to drop them"
                )
            warnings.warn(f"dropping characters the model never saw: {shown}{more}", stacklevel=2)
            text = "".join(c for c in text if c in self.char_to_idx)
        lookup = self.char_to_idx
        return [lookup[c] for c in text]

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        """Like `encode`, as the smallest unsigned integer array that holds every index."""
        return np.asarray(self.encode(text, unknown), dtype=self.index_dtype)

    def encode_documents(
        self, documents: Sequence[str], unknown: str = "error"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, where each document starts in them) of texts read as one corpus whose documents
        stay apart: under ``unknown="skip"`` each document shrinks on its own, so that its start
        stays true."""
        whole = "".join(documents)  # joined once: a split can be millions of characters
        if unknown == "error" or not self.unknown(whole):
            ids = self.encode_array(whole, unknown=unknown)
            lengths = [len(d) for d in documents]
        else:
            pieces = [self.encode_array(d, unknown=unknown) for d in documents]
            ids = np.concatenate(pieces) if pieces else np.zeros(0, self.index_dtype)
            lengths = [len(p) for p in pieces]
        return ids, np.cumsum([0, *lengths[:-1]], dtype=np.int64)

    @property
    def index_dtype(self) -> np.dtype:
        n = len(self.chars)
        return np.dtype(np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def to_list(self) -> list[str]:
        return list(self.chars)

    @classmethod
    def from_list(cls, chars: Sequence[str]) -> Vocabulary:
        return cls(tuple(chars))

    def union(self, other: Vocabulary) -> Vocabulary:
        """This vocabulary, then the characters only `other` has (self's indices are kept)."""
        extra = tuple(c for c in other.chars if c not in self.char_to_idx)
        return Vocabulary(self.chars + extra)
