"""Reading a training text and splitting it into training and validation parts.

Text is decoded (UTF-8 by default, any Python codec on request), a byte-order mark is stripped and
CRLF line ends become LF, so that a corpus saved on Windows and one saved on Linux train the same
model. The validation split is the contiguous tail of the text, as nanoGPT does, so that the
validation loss measures continuation of unseen text rather than interpolation between seen lines.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from charlstm.errors import UserError

# A text whose share of NUL characters exceeds this is treated as binary (or UTF-16 read as UTF-8):
# real prose never has that many, and training on it would silently learn garbage.
MAX_NUL_SHARE = 0.01
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalise_newlines(text: str) -> str:
    """Strip a leading BOM and turn CRLF (and lone CR) line ends into LF."""
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


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


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """Read a corpus file as normalised text.

    A missing, empty, binary or mis-encoded file is a `UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"text file {str(path)!r} does not exist; check the path given to --text")
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder, not a text file; give the path of a .txt file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"cannot read {str(path)!r}: {exc.strerror}; check its permissions"
        ) from None
    if not data.strip():
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
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.1")
    n_val = round(length * val_fraction)
    if val_fraction > 0 and n_val < 2:
        raise UserError(
            f"the text has {length} characters, too few for a validation split of {val_fraction}; "
            "use a longer text or a larger --val-fraction"
        )
    return length - n_val


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split into (train, validation): the last `val_fraction` of the characters is validation."""
    cut = split_point(len(text), val_fraction)
    return text[:cut], text[cut:]


def load_corpus(
    dataset: str | None, text_path: str | None, encoding: str = "utf-8", allow_download: bool = True
) -> tuple[str, str]:
    """The text a run trains on and a label for it: `text_path` if given, else the named dataset."""
    from charlstm.data import datasets

    if text_path:
        return read_text(text_path, encoding), str(text_path)
    if not dataset:
        raise UserError("no training text: give --text FILE or --dataset NAME")
    # The checked bytes themselves, not the file again: it could have changed since its check.
    data, path = datasets.read_dataset(dataset, allow_download=allow_download)
    return decode_text(data, "utf-8", source=repr(str(path))), dataset
