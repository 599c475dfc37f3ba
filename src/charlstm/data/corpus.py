"""Reading a training text (one file, or many as documents) and splitting it into training,
validation and test parts.

Text is decoded (UTF-8 by default, any Python codec on request), a byte-order mark is stripped and
CRLF line ends become LF, so that a corpus saved on Windows and one saved on Linux train the same
model. The validation split is the contiguous tail of the text, as nanoGPT does, so that the
validation loss measures continuation of unseen text rather than interpolation between seen lines;
an optional test split is the tail after it. With many files the cuts still fall at those character
counts, inside a file if need be: each part keeps its own document boundaries (`documents`).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlstm.data.sources import expand, label, no_text_error
from charlstm.errors import UserError
from charlstm.textutil import normalise_newlines

# A text whose share of NUL characters exceeds this is treated as binary (or UTF-16 read as UTF-8):
# real prose never has that many, and training on it would silently learn garbage.
MAX_NUL_SHARE = 0.01
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_encoding(encoding: str) -> None:
    """A `UserError` unless `encoding` names a codec Python knows."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(
            f"unknown encoding {encoding!r}; pass a codec Python knows, "
            "e.g. --encoding utf-8 or cp1251"
        ) from None


def decode_text(data: bytes, encoding: str = "utf-8", source: str = "the text") -> str:
    """Decode bytes to a normalised string, or raise a `UserError` that says how to fix it."""
    check_encoding(encoding)
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8") and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{source} is not valid {encoding}: byte {exc.object[exc.start]:#04x} at byte offset "
            f"{exc.start} cannot be decoded; pass the file's real encoding, e.g. --encoding cp1251"
        ) from None
    # Codecs such as unicode_escape or utf-16 with odd data can yield lone surrogates: no text holds
    # them, and they could not be stored in a checkpoint or printed.
    lone = _SURROGATE.search(text)
    if lone:
        raise UserError(
            f"{source} decodes to a lone surrogate U+{ord(lone.group()):04X} "
            f"at character {lone.start()}, "
            "which is not a real character; fix the file or pass its real --encoding"
        )
    text = normalise_newlines(text)
    if text and text.count("\0") > MAX_NUL_SHARE * len(text):
        raise UserError(
            f"{source} looks binary ({text.count(chr(0))} NUL characters); give a plain text file, "
            "or --encoding utf-16 if it is UTF-16 text"
        )
    return text


def read_file_bytes(path: str | Path, what: str = "text file", flag: str = "--text") -> bytes:
    """The bytes of a file the user named with `flag`; `what` names it in the errors ("text
    file", "start file"). Missing, a folder, unreadable or empty (no bytes) is a `UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{what} {str(path)!r} is a folder, not a file; give the path of one file to {flag}"
        )
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist; check the path given to {flag}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"cannot read {what} {str(path)!r}: {exc.strerror}; check its permissions"
        ) from None
    if not data:
        raise UserError(f"{what} {str(path)!r} is empty; give a file with some text in it")
    return data


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """Read a corpus file as normalised text.

    A missing, empty, binary or mis-encoded file is a `UserError`."""
    data = read_file_bytes(path)
    if not data.strip():  # only spaces and line ends: as good as empty for a corpus
        raise UserError(f"text file {str(path)!r} is empty; give a file with some text in it")
    text = decode_text(data, encoding, source=repr(str(path)))
    if not text.strip():
        raise UserError(
            f"text file {str(path)!r} holds only whitespace; give a file with text in it"
        )
    return text


def split_point(length: int, val_fraction: float) -> int:
    """Where a text of `length` characters is cut: the last `val_fraction` of it is validation.

    (`prepared` cuts its memory-mapped ids at the same point, so both paths train on the same
    split.)"""
    return split_points(length, val_fraction)[0]


def split_points(length: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int]:
    """(end of training, end of validation) for a text of `length` characters: the last
    `test_fraction` of it is the test split and the `val_fraction` before it validation (both
    shares of the whole), so that adding a test split leaves the validation split as long."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.1")
    if not 0.0 <= test_fraction < 1.0 or (test_fraction and val_fraction + test_fraction >= 1):
        raise UserError(
            f"test_fraction must be in [0, 1) and leave text to train on, got {test_fraction} "
            f"with val_fraction {val_fraction}; use e.g. 0.1"
        )
    n_val = round(length * val_fraction)
    if val_fraction > 0 and n_val < 2:
        raise UserError(
            f"the text has {length} characters, too few for a validation split of {val_fraction}; "
            "use a longer text or a larger --val-fraction"
        )
    n_test = round(length * test_fraction)
    if test_fraction > 0 and n_test < 2:
        raise UserError(
            f"the text has {length} characters, too few for a test split of {test_fraction}; "
            "use a longer text or a larger --test-fraction"
        )
    return length - n_test - n_val, length - n_test


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split into (train, validation): the last `val_fraction` of the characters is validation."""
    cut = split_point(len(text), val_fraction)
    return text[:cut], text[cut:]


@dataclass
class Corpus:
    """A whole text and where its documents start in it: one document per file (`sources`), so
    that batches and evaluations never carry context from one file into the next."""

    text: str
    starts: np.ndarray  # int64 character offsets, the first 0; [0] for a single text
    source: str  # a label for logs: the file, the dataset, or the --text values
    skipped: int = 0  # files of a folder or glob left out as binary or undecodable


def one_document() -> np.ndarray:
    return np.zeros(1, dtype=np.int64)


def read_documents(
    text: str | Sequence[str], encoding: str = "utf-8", skip_bad_files: bool = False
) -> Corpus:
    """The files `text` names (`sources.expand`), decoded one by one as `read_text` decodes a
    file and joined, each a document. A file named on its own is held to `read_text`'s checks;
    one found in a folder or by a glob is left out when empty and, with `skip_bad_files`, when
    binary or undecodable (`charlstm prepare` makes the same choices, so both give the same ids)."""
    files = expand(text)
    if len(files) == 1 and files[0].named:
        path = files[0].path
        return Corpus(read_text(path, encoding), one_document(), str(path))
    check_encoding(encoding)
    texts: list[str] = []
    skipped = 0
    for f in files:
        if f.named:
            texts.append(read_text(f.path, encoding))
            continue
        try:
            data = f.path.read_bytes()
        except OSError as exc:
            raise UserError(
                f"cannot read {str(f.path)!r}: {exc.strerror}; check its permissions"
            ) from None
        try:
            doc = decode_text(data, encoding, source=repr(str(f.path)))
        except UserError:
            if not skip_bad_files:
                raise
            skipped += 1
            continue
        if doc:  # an empty file of a folder: nothing to learn from
            texts.append(doc)
    name = label(text)
    if not texts:
        raise no_text_error(name, skipped)
    whole = "".join(texts)
    if not whole.strip():
        raise UserError(f"the text {name!r} holds only whitespace; give files with text in them")
    starts = np.cumsum([0] + [len(t) for t in texts[:-1]], dtype=np.int64)
    return Corpus(whole, starts, name, skipped)


def load_documents(
    dataset: str | None,
    text: str | Sequence[str] | None,
    encoding: str = "utf-8",
    allow_download: bool = True,
    skip_bad_files: bool = False,
) -> Corpus:
    """The text a run trains on, with its documents: `text` if given, else the named dataset (one
    document)."""
    from charlstm.data import datasets

    if text:
        return read_documents(text, encoding, skip_bad_files)
    if not dataset:
        raise UserError("no training text: give --text FILE or --dataset NAME")
    from charlstm.data import basecorpus

    if dataset in basecorpus.BASE_CORPORA:
        text, starts = basecorpus.load(dataset, allow_download=allow_download)
        return Corpus(text, starts, dataset)
    # The checked bytes themselves, not the file again: it could have changed since its check.
    data, path = datasets.read_dataset(dataset, allow_download=allow_download)
    return Corpus(decode_text(data, "utf-8", source=repr(str(path))), one_document(), dataset)


def load_corpus(
    dataset: str | None,
    text_path: str | Sequence[str] | None,
    encoding: str = "utf-8",
    allow_download: bool = True,
) -> tuple[str, str]:
    """The text a run trains on and a label for it: `text_path` if given, else the named dataset
    (many files are joined: see `load_documents` for where each starts)."""
    corpus = load_documents(dataset, text_path, encoding, allow_download)
    return corpus.text, corpus.source


def part_starts(starts: np.ndarray, begin: int, end: int) -> np.ndarray:
    """Where documents start inside the part [begin, end) of a text whose documents start at
    `starts`, counted from `begin`. The first is always 0: a part that a split cut inside a
    document begins with that document's rest."""
    lo = int(np.searchsorted(starts, begin, side="right"))
    hi = int(np.searchsorted(starts, end, side="left"))
    return np.concatenate([one_document(), np.asarray(starts[lo:hi], dtype=np.int64) - begin])
