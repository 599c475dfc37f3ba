"""Corpora larger than memory: encode a text once to a flat file of ids, train from a memory map.

`prepare` streams a text (one file, or the many files of folders and globs: `sources.expand`) in
chunks and writes a folder::

    ids.bin      the character ids, one after another (uint8, uint16 or uint32 by vocabulary size)
    docs.bin     where each document (file) starts in ids.bin: int64, little-endian, the first 0
    files.json   the files of the documents, in order
    vocab.json   the vocabulary, in `Vocabulary.from_text` order
    meta.json    length, dtype, the validation split point, the number of documents, sha256 of
                 ids.bin, docs.bin and of the source

The files are concatenated with nothing between them: the boundaries live in docs.bin, and the
batcher keeps every window inside one document (`batching`). Memory stays bounded however many
files there are: one chunk of text, the 1.1 million code-point counters, and 8 bytes a document.
A folder written before docs.bin existed (format version 1) still loads, as one document.

`open_prepared` maps ``ids.bin`` with `numpy.memmap`: training slices it (the split is a view, never
a copy), so a process's memory does not grow with the corpus, and the operating system pages the
file in and out as the batches need it.

Why two passes over the text. The vocabulary's order (most frequent first, ties by code point) is
only known once every character has been counted, and the ids depend on it. Pass 1 decodes and
counts; pass 2 decodes again and writes the final ids. The alternative, writing provisional ids in a
single pass and remapping that file, reads the text once but writes and re-reads an intermediate
file as large as the output (up to 4 bytes a character) — more I/O than re-reading the text, which
is usually in the page cache after pass 1 anyway. Pass 2 also re-hashes the source, so a file that
changed between the passes is an error rather than a silently inconsistent corpus.

Decoding matches `corpus.read_text` exactly: a byte-order mark is dropped, CRLF and lone CR become
LF (a CR that ends one chunk is held back until the next chunk shows whether an LF follows), and the
same checks refuse binary files, lone surrogates and empty or whitespace-only texts. Each file is
decoded on its own (its own BOM, no CR carried into the next file), and checked on its own: a file
found in a folder or by a glob that is empty is left out, and one that is binary or undecodable is
an error naming it, or, with ``skip_bad_files``, left out and counted.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from charlstm.atomic import atomic_file, atomic_write_bytes, atomic_write_text
from charlstm.data.corpus import MAX_NUL_SHARE, check_encoding, split_point
from charlstm.data.sources import expand, no_text_error
from charlstm.data.sources import label as sources_label
from charlstm.data.vocabulary import Vocabulary, describe_char
from charlstm.errors import UserError

FORMAT = "charlstm-prepared"
FORMAT_VERSION = 2  # 2 added docs.bin and files.json; a version-1 folder still loads (one document)
READABLE_VERSIONS = (1, 2)
IDS_FILE, VOCAB_FILE, META_FILE = "ids.bin", "vocab.json", "meta.json"
DOCS_FILE, FILES_FILE = "docs.bin", "files.json"
CHUNK_BYTES = 4 << 20
N_CODE_POINTS = 0x110000


# ---------------------------------------------------------------------------------------- reading


def _code_points(text: str) -> np.ndarray:
    """The code points of `text` as uint32, at C speed (no Python loop over characters)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _decoded_chunks(
    path: Path, encoding: str, digest: Any, on_bytes: Callable[[int], None], source: str
) -> Iterator[str]:
    """Yield the normalised text of `path` chunk by chunk, feeding the raw bytes to `digest`."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    is_utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8")
    consumed, first, held_cr = 0, True, ""
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(CHUNK_BYTES)
            final = not raw
            digest.update(raw)
            on_bytes(len(raw))
            data = raw
            if first and is_utf8:
                # Like `decode_text`: the UTF-8 BOM bytes go before decoding, and byte offsets in
                # error messages count from after them.
                while len(data) < 3 and not final:  # a BOM split by a tiny read: read on
                    more = fh.read(CHUNK_BYTES)
                    digest.update(more)
                    on_bytes(len(more))
                    final = not more
                    data += more
                data = data.removeprefix(codecs.BOM_UTF8)
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                offset = consumed - buffered + exc.start
                bad = exc.object[exc.start] if exc.start < len(exc.object) else 0
                raise UserError(
                    f"{source} is not valid {encoding}: byte {bad:#04x} at byte offset {offset} "
                    "cannot be decoded; pass the file's real encoding, e.g. --encoding cp1251"
                ) from None
            consumed += len(data)
            if first and text:
                text = text.removeprefix("\ufeff")  # as `normalise_newlines`: a BOM the codec kept
                first = False
            text = held_cr + text
            held_cr = ""
            if text.endswith("\r") and not final:  # its LF, if any, is in the next chunk
                text, held_cr = text[:-1], "\r"
            if text:
                yield text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
            if final:
                return


# ---------------------------------------------------------------------------------------- prepare


@dataclass
class PrepareResult:
    out: Path
    length: int
    vocab: Vocabulary
    source_bytes: int
    seconds: float
    documents: int = 1
    skipped: int = 0  # files of a folder or glob skipped as binary or undecodable


def _atomic_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def _add_counts(acc: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`acc + counts` for count arrays of any lengths (a file's counts grow with its code points,
    so that a small ASCII file costs 128 counters, not 1.1 million)."""
    if len(counts) > len(acc):
        acc = np.concatenate([acc, np.zeros(len(counts) - len(acc), dtype=np.int64)])
    acc[: len(counts)] += counts
    return acc


def _check_target(out: Path, force: bool) -> None:
    replaceable = force and out.is_dir() and (out / META_FILE).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not replaceable:
        raise UserError(
            f"--out {str(out)!r} exists and is not an empty folder; choose another "
            "folder (or pass --force to replace a prepared corpus)"
        )


def prepare(
    text_path: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    encoding: str = "utf-8",
    val_fraction: float = 0.1,
    source: str | None = None,
    force: bool = False,
    progress: bool = True,
    skip_bad_files: bool = False,
) -> PrepareResult:
    """Encode the text `text_path` names (a file, or files, folders and globs: `sources.expand`)
    into the folder `out` (see the module docstring). Each file is one document; their boundaries
    go to docs.bin."""
    import time

    from tqdm import tqdm

    files = expand(text_path)
    for f in files:
        if f.named and not f.path.is_file():
            what = "is a folder, not a text file" if f.path.is_dir() else "does not exist"
            raise UserError(f"text file {str(f.path)!r} {what}; give the path of a text file")
    label = source or sources_label(text_path)
    check_encoding(encoding)
    out = Path(out)
    _check_target(out, force)
    out.mkdir(parents=True, exist_ok=True)
    try:
        size = sum(f.path.stat().st_size for f in files)
    except OSError as exc:
        raise UserError(f"cannot read {exc.filename!r}: {exc.strerror}; check it") from None
    start = time.monotonic()
    with tqdm(
        total=2 * size,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        # -- pass 1: count every code point (and hash each file) ---------------------------------
        counts = np.zeros(N_CODE_POINTS, dtype=np.int64)
        kept: list[tuple[Path, int, str]] = []  # (file, characters, sha256) of each document
        skipped, kept_bytes = 0, 0
        for f in files:
            quoted = repr(str(f.path))
            digest, file_counts = hashlib.sha256(), np.zeros(0, dtype=np.int64)
            try:
                for text in _decoded_chunks(f.path, encoding, digest, bar.update, quoted):
                    file_counts = _add_counts(file_counts, np.bincount(_code_points(text)))
                n = int(file_counts.sum())
                if n == 0 and not f.named:
                    continue  # an empty file in a folder: nothing to learn, nothing to complain of
                _check_counts(file_counts, n, quoted, whitespace_ok=not f.named)
            except UserError:
                if f.named or not skip_bad_files:
                    raise
                skipped += 1
                continue
            except OSError as exc:
                raise UserError(
                    f"cannot read {quoted}: {exc.strerror}; check its permissions"
                ) from None
            counts[: len(file_counts)] += file_counts
            kept.append((f.path, n, digest.hexdigest()))
            kept_bytes += f.path.stat().st_size
        length = int(counts.sum())
        if not kept:
            raise no_text_error(label, skipped)
        _check_counts(counts, length, repr(label) if len(kept) > 1 else repr(str(kept[0][0])))
        present = np.flatnonzero(counts)
        # Vocabulary.from_text order: most frequent first, ties by code point
        # (lexsort: last key first)
        order = present[np.lexsort((present, -counts[present]))]
        vocab = Vocabulary(tuple(chr(int(c)) for c in order))
        dtype = vocab.index_dtype
        table = np.zeros(N_CODE_POINTS, dtype=dtype)
        table[order] = np.arange(len(order), dtype=dtype)
        bar.total = size + kept_bytes  # pass 2 reads only the files kept
        # -- pass 2: decode again and write the final ids ----------------------------------------
        ids_hash, written = hashlib.sha256(), 0
        starts = np.zeros(len(kept), dtype=np.int64)
        try:
            with atomic_file(out / IDS_FILE) as fh:
                for i, (path, n, sha) in enumerate(kept):
                    quoted, again, chars = repr(str(path)), hashlib.sha256(), 0
                    starts[i] = written
                    for text in _decoded_chunks(path, encoding, again, bar.update, quoted):
                        block = table[_code_points(text)].tobytes()
                        fh.write(block)
                        ids_hash.update(block)
                        chars += len(text)
                    if again.hexdigest() != sha or chars != n:
                        raise UserError(
                            f"{quoted} changed while it was being prepared; prepare it "
                            "again once nothing is writing to it"
                        )
                    written += chars
            docs_bytes = starts.astype("<i8").tobytes()
            atomic_write_bytes(out / DOCS_FILE, docs_bytes)
        except OSError as exc:
            raise UserError(
                f"could not write {out / IDS_FILE} ({exc.strerror or exc}); free some "
                "disk space and prepare again"
            ) from None
    split = split_point(length, val_fraction)
    # One file: its own sha256, as before. Many: the sha256 of their sha256s, one a line, in order.
    source_sha = kept[0][2] if len(files) == 1 else _digest_of(sha for _, _, sha in kept)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "length": length,
        "dtype": np.dtype(dtype).name,
        "vocab_size": len(vocab),
        "val_fraction": val_fraction,
        "split": split,
        "source": label,
        "source_bytes": kept_bytes,
        "encoding": encoding,
        "source_sha256": source_sha,
        "ids_sha256": ids_hash.hexdigest(),
        "documents": len(kept),
        "docs_sha256": hashlib.sha256(docs_bytes).hexdigest(),
        "skipped_files": skipped,
    }
    _atomic_json(out / VOCAB_FILE, vocab.to_list())
    _atomic_json(out / FILES_FILE, [str(path) for path, _, _ in kept])
    _atomic_json(out / META_FILE, meta)  # written last: its presence marks a complete folder
    return PrepareResult(
        out, length, vocab, kept_bytes, time.monotonic() - start, len(kept), skipped
    )


def _digest_of(hexdigests: Iterable[str]) -> str:
    h = hashlib.sha256()
    for d in hexdigests:
        h.update(f"{d}\n".encode("ascii"))
    return h.hexdigest()


def _check_counts(
    counts: np.ndarray, length: int, source: str, *, whitespace_ok: bool = False
) -> None:
    """The checks `corpus.read_text` and `decode_text` make, on the counts instead of the text.
    (`counts` may stop at the largest code point present.)"""
    if length == 0:
        raise UserError(f"text file {source} is empty; give a file with some text in it")
    surrogates = np.flatnonzero(counts[0xD800:0xE000])
    if len(surrogates):
        raise UserError(
            f"{source} decodes to a lone surrogate U+{0xD800 + int(surrogates[0]):04X}, "
            "which is not a real character; fix the file or pass its real --encoding"
        )
    if counts[0] > MAX_NUL_SHARE * length:
        raise UserError(
            f"{source} looks binary ({int(counts[0])} NUL characters); give a plain text file, "
            "or --encoding utf-16 if it is UTF-16 text"
        )
    if not whitespace_ok and all(chr(int(c)).isspace() for c in np.flatnonzero(counts)):
        raise UserError(f"text file {source} holds only whitespace; give a file with text in it")


# ------------------------------------------------------------------------------------- reading back


@dataclass
class PreparedCorpus:
    """A prepared folder, its ids memory-mapped (read-only)."""

    path: Path
    meta: dict[str, Any]
    vocab: Vocabulary
    ids: np.ndarray  # a numpy.memmap over ids.bin
    starts: np.ndarray  # int64: where each document (file) starts in `ids`; [0] for one

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) views of the ids, cut where `corpus.split_text` cuts the text."""
        cut = split_point(len(self.ids), val_fraction)
        return self.ids[:cut], self.ids[cut:]


def decode_ids(vocab: Vocabulary, ids: np.ndarray) -> str:
    """`vocab.decode` at C speed, for whole corpora (no Python loop over characters)."""
    table = np.array([ord(c) for c in vocab.chars], dtype=np.uint32)
    return table[np.asarray(ids)].tobytes().decode("utf-32-le", "surrogatepass")


def _fail(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a usable prepared corpus ({why}); prepare it again with "
        f"`charlstm prepare --text FILE --out {path}`"
    )


def sha256_file(path: Path) -> str:
    from charlstm.data.datasets import sha256_file as sha

    return sha(path)


def open_prepared(folder: str | Path, *, verify: bool = True) -> PreparedCorpus:
    """Open a folder written by `prepare`; with `verify`, check ids.bin against its sha256 (a
    streaming read: it costs time, about a second per GB, not memory)."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        if not folder.is_dir():
            raise UserError(
                f"prepared corpus {str(folder)!r} does not exist; make it with "
                f"`charlstm prepare --text FILE --out {folder}`"
            )
        raise _fail(folder, f"no {META_FILE}: not prepared, or preparing was interrupted")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        chars = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        vocab = Vocabulary.from_list(chars)
        length, dtype = meta["length"], np.dtype(meta["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(folder, f"unreadable {META_FILE} or {VOCAB_FILE}: {exc}") from None
    version = meta.get("format_version")
    if meta.get("format") != FORMAT or version not in READABLE_VERSIONS:
        raise _fail(folder, f"format {meta.get('format')!r} version {version!r}")
    if not (isinstance(length, int) and length > 0) or dtype != vocab.index_dtype:
        raise _fail(folder, "its length or dtype does not fit its vocabulary")
    ids_path = folder / IDS_FILE
    actual = ids_path.stat().st_size if ids_path.is_file() else -1
    if actual != length * dtype.itemsize:
        raise _fail(
            folder, f"{IDS_FILE} has {actual:,} bytes, expected {length * dtype.itemsize:,}"
        )
    if verify and sha256_file(ids_path) != meta.get("ids_sha256"):
        raise _fail(folder, f"{IDS_FILE} does not match its sha256: the file is damaged")
    ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(length,))
    starts = _read_starts(folder, meta, length) if version >= 2 else np.zeros(1, dtype=np.int64)
    return PreparedCorpus(folder, meta, vocab, ids, starts)


def _read_starts(folder: Path, meta: dict[str, Any], length: int) -> np.ndarray:
    """docs.bin, checked always (it is small: 8 bytes a document): its sha256, a first document
    at 0, and every start after the previous one and inside the ids."""
    try:
        data = (folder / DOCS_FILE).read_bytes()
    except OSError as exc:
        raise _fail(folder, f"unreadable {DOCS_FILE}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != meta.get("docs_sha256"):
        raise _fail(folder, f"{DOCS_FILE} does not match its sha256: the file is damaged")
    starts = np.frombuffer(data, dtype="<i8").astype(np.int64)
    if not (
        len(starts) == meta.get("documents")
        and len(starts) >= 1
        and starts[0] == 0
        and bool(np.all(np.diff(starts) > 0))
        and starts[-1] < length
    ):
        raise _fail(folder, f"{DOCS_FILE} does not hold the starts of its documents")
    return starts


def load_split(
    folder: str | Path, val_fraction: float, vocab: Vocabulary | None = None
) -> tuple[Vocabulary, np.ndarray, np.ndarray, str]:
    """(vocab, train ids, validation ids, source label) of a prepared corpus, for training.

    `vocab` is the run's own vocabulary when it resumes: the ids were written with the prepared
    vocabulary, so the two must be the same (remapping would copy the whole corpus)."""
    corpus = open_prepared(folder)
    if vocab is not None and vocab != corpus.vocab:
        raise UserError(
            f"the prepared corpus {str(folder)!r} was encoded with a different vocabulary than the "
            "run's; a run continues on the corpus it was trained on: train a new run from it"
        )
    train_ids, val_ids = corpus.split(val_fraction)
    return corpus.vocab, train_ids, val_ids, f"{corpus.meta['source']} (prepared in {folder})"


def describe(result: PrepareResult) -> str:
    rate = result.source_bytes / 1e6 / max(result.seconds, 1e-9)
    top = ", ".join(describe_char(c) for c in result.vocab.chars[:8])
    files = ""
    if result.documents > 1 or result.skipped:
        files = f" from {result.documents:,} files" + (
            f" ({result.skipped:,} skipped as binary or undecodable)" if result.skipped else ""
        )
    return (
        f"prepared {result.length:,} characters{files} ({result.source_bytes / 1e6:.1f} MB, "
        f"vocabulary {len(result.vocab)}: {top}, …) into {result.out} in {result.seconds:.1f} s "
        f"({rate:.1f} MB/s)"
    )
