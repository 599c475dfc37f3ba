"""Base corpora: the large public-domain texts a base model learns its language from, rebuilt
exactly from their sources and kept free of the benchmark texts.

A **collection** is many files of one public repository at one commit. Its manifest
(``manifests/NAME.json``, made by ``tools/make_manifest.py``) pins every file: path, size, sha256
and encoding, so each is downloaded from its raw address and checked like any named dataset
(`datasets`), or found in ``$CHARLSTM_DATA/NAME/`` or the cache.

A **base corpus** joins one or more collections, cleaned and decontaminated:

- *cleaned*: Project Gutenberg's licence header and footer are cut off, every line is stripped of
  its indentation and trailing spaces, and runs of blank lines become one, so that the model learns
  the language rather than one edition's layout;
- *decontaminated*: no base model may have read a text it is benchmarked on. Every line that shares
  a span of `SPAN` characters with an excluded text (byron-ru, onegin-ru, tinyshakespeare) is cut
  out, and a document that would lose more than `DROP_DOCUMENT` of its characters that way is left
  out whole (it is that text in another edition, and its remaining lines would be near-copies).
  Spans are compared twice: as they are, and folded (lower case, "ё" as "е", every run of
  whitespace as one space), so that another edition's line breaks or spelling do not hide a copy.

The documents then take a fixed pseudo-random order (by the sha256 of their names), so that the
validation split, the corpus's tail, samples many authors rather than the last one. The built
corpus is cached with its sha256 beside it; a model card records that sha256, so a rebuild can be
checked to be the very same text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import numpy as np

from charlstm.atomic import atomic_write_bytes
from charlstm.data import datasets
from charlstm.errors import UserError
from charlstm.textutil import normalise_newlines

SPAN = 50  # characters: a shared span this long is a copy (the memorisation analysis's threshold)
DROP_DOCUMENT = 0.02  # a document losing more than this share to copies is left out whole
EXCLUDED = ("byron-ru", "onegin-ru", "tinyshakespeare")  # the benchmark texts
CLEANERS = ("plain", "gutenberg")
FORMAT_VERSION = 1  # of the cached built corpus; bumped when cleaning or decontamination changes


@dataclass(frozen=True)
class Member:
    """One file of a collection."""

    path: str
    size: int
    sha256: str
    encoding: str


@dataclass(frozen=True)
class Collection:
    """Many files of one repository at one commit (a manifest in manifests/)."""

    name: str
    repo: str
    commit: str
    language: str
    cleaner: str
    licence: str
    description: str
    members: tuple[Member, ...]

    def url(self, member: Member) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{quote(member.path)}"

    @property
    def size(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def sha256(self) -> str:
        """One digest for the whole collection: of its members' digests and paths, in order."""
        listing = "".join(f"{m.sha256}  {m.path}\n" for m in self.members)
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BaseCorpus:
    """A base corpus: which collections, in which language, which texts it must not contain.

    A corpus `derived_from` another is a selection of that one's documents, for a second phase of
    training: every document whose name starts with `select` and as many characters again of the
    others, all taken from the part of the parent its base trains on (the tail it holds out,
    `held_out`, stays held out of both phases)."""

    name: str
    language: str
    collections: tuple[str, ...]
    description: str
    excluded: tuple[str, ...] = EXCLUDED
    derived_from: str | None = None
    select: str | None = None
    held_out: float = 0.05


BASE_CORPORA: dict[str, BaseCorpus] = {
    b.name: b
    for b in (
        BaseCorpus(
            "base-ru",
            "ru",
            ("ruslit",),
            "Russian prose and verse, 19th and early 20th centuries, for the Russian base model",
        ),
        BaseCorpus(
            "base-ru-verse",
            "ru",
            ("ruslit",),
            "the verse of base-ru and as much of its prose, for the Russian base's second phase",
            derived_from="base-ru",
            select="ruslit/poems/",
        ),
        BaseCorpus(
            "base-en",
            "en",
            ("gutenberg-en",),
            "English books of authors who died before 1947, for the English base model",
        ),
    )
}


@cache
def collection(name: str) -> Collection:
    """The collection `name`, read from its manifest shipped in the package."""
    try:
        raw = resources.files("charlstm.data").joinpath("manifests", f"{name}.json").read_text()
    except FileNotFoundError:
        raise UserError(
            f"unknown collection {name!r}; choose one of {', '.join(collection_names())}"
        ) from None
    doc = json.loads(raw)
    members = tuple(Member(**m) for m in doc.pop("members"))
    return Collection(members=members, **doc)


def collection_names() -> list[str]:
    folder = resources.files("charlstm.data").joinpath("manifests")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def get_base_corpus(name: str) -> BaseCorpus:
    try:
        return BASE_CORPORA[name]
    except KeyError:
        raise UserError(
            f"unknown base corpus {name!r}; choose one of {', '.join(BASE_CORPORA)}"
        ) from None


# ---------------------------------------------------------------------------------------- files


def _member_dataset(coll: Collection, member: Member) -> datasets.NamedDataset:
    """A member as a named dataset, so that it is found, downloaded and checked as one."""
    return datasets.NamedDataset(
        f"{coll.name}:{member.path}",
        os.path.join(coll.name, member.path),
        coll.url(member),
        member.sha256,
        member.size,
        member.path,
    )


def member_bytes(coll: Collection, member: Member, allow_download: bool = True) -> bytes:
    """The checked bytes of one file of a collection: a local copy, or a download into the
    cache (a copy that does not match its sha256 is an error, as for any dataset)."""
    ds = _member_dataset(coll, member)
    for path in datasets.candidate_paths(ds):
        if path.is_file():
            return datasets.check_copy(path, ds)
    if not allow_download:
        raise UserError(
            f"no local copy of {member.path} of the collection {coll.name}; put the collection "
            f"in {datasets.cache_dir() / coll.name} or allow the download"
        )
    return datasets.download(ds, datasets.cache_dir() / ds.filename, progress=False)


# ---------------------------------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
    re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg",
    re.MULTILINE | re.IGNORECASE,
)
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean(text: str, cleaner: str = "plain") -> str:
    """A document's text without an edition's layout (see the module docstring)."""
    text = normalise_newlines(text)
    if cleaner == "gutenberg":
        start = _GUTENBERG_START.search(text)
        if start:
            text = text[start.end() :]
        end = _GUTENBERG_END.search(text)
        if end:
            text = text[: end.start()]
    elif cleaner != "plain":
        raise ValueError(f"unknown cleaner {cleaner!r}")
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n") + "\n"


# ---------------------------------------------------------------------------------------- copies

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), "<u4").astype(np.uint64)


def span_hashes(codes: np.ndarray, span: int = SPAN) -> np.ndarray:
    """A 64-bit polynomial hash of every window of `span` code points (len(codes) - span + 1 of
    them), all at once: with prefix sums of c[j]·B^-j (arithmetic modulo 2**64 throughout), the
    window at i is B^(i+span-1) · (S[i+span-1] - S[i-1])."""
    n = len(codes)
    if n < span:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.full(n, _BASE, dtype=np.uint64)
        powers[0] = 1
        powers = np.cumprod(powers, dtype=np.uint64)  # B^j
        inverse = np.full(n, _BASE_INV, dtype=np.uint64)
        inverse[0] = 1
        inverse = np.cumprod(inverse, dtype=np.uint64)  # B^-j
        prefix = np.cumsum(codes * inverse, dtype=np.uint64)
        lower = np.concatenate([np.zeros(1, np.uint64), prefix[: n - span]])
        return powers[span - 1 :] * (prefix[span - 1 :] - lower)


_WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c\xa0\u2009\u202f\u3000"], np.uint64)


def fold(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(code points of the folded text, the index in `text` of each): lower case where that keeps
    the length, "ё" as "е", every run of whitespace as one space."""
    lower = text.lower()
    codes = _codes(lower if len(lower) == len(text) else text)
    codes[codes == ord("ё")] = ord("е")
    space = np.isin(codes, _WHITESPACE)
    codes[space] = ord(" ")
    keep = ~(space & np.concatenate([[False], space[:-1]]))
    return codes[keep], np.flatnonzero(keep)


@dataclass(frozen=True)
class Forbidden:
    """The spans of the excluded texts, hashed as they are and folded (sorted, for `np.isin`)."""

    exact: np.ndarray
    folded: np.ndarray

    @classmethod
    def of(cls, texts: Sequence[str], span: int = SPAN) -> Forbidden:
        exact = [span_hashes(_codes(t), span) for t in texts]
        folded = [span_hashes(fold(t)[0], span) for t in texts]
        return cls(np.unique(np.concatenate(exact)), np.unique(np.concatenate(folded)))


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """A bool per value: whether it is in `sorted_set` (a binary search each; `np.isin` would sort
    the large set again at every call)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def copied(text: str, forbidden: Forbidden, span: int = SPAN) -> np.ndarray:
    """A bool per character of `text`: inside a span shared with an excluded text."""
    n = len(text)
    marks = np.zeros(n + 1, dtype=np.int64)  # +1 at a copy's start, -1 past its end
    hits = np.flatnonzero(_member(span_hashes(_codes(text), span), forbidden.exact))
    np.add.at(marks, hits, 1)
    np.add.at(marks, hits + span, -1)
    codes, where = fold(text)
    hits = np.flatnonzero(_member(span_hashes(codes, span), forbidden.folded))
    np.add.at(marks, where[hits], 1)
    np.add.at(marks, where[hits + span - 1] + 1, -1)
    return np.cumsum(marks[:n]) > 0


def cut_copies(text: str, forbidden: Forbidden, span: int = SPAN) -> tuple[str, int]:
    """`text` without the lines that hold a copied character, and how many characters went. Cut
    until nothing is found (lines that close up could form a new shared span)."""
    removed = 0
    while True:
        mask = copied(text, forbidden, span)
        if not mask.any():
            return text, removed
        line_of = np.cumsum(np.concatenate([[0], _codes(text)[:-1] == ord("\n")]))
        bad = set(np.unique(line_of[mask]).tolist())
        lines = text.split("\n")
        kept = [line for i, line in enumerate(lines) if i not in bad]
        new = "\n".join(kept)
        removed += len(text) - len(new)
        text = new


# ---------------------------------------------------------------------------------------- building


@dataclass
class BuiltCorpus:
    """A base corpus once built: its documents in training order, their names, and what
    decontamination removed."""

    name: str
    documents: list[str]
    names: list[str]
    cut_lines_chars: int  # characters of lines cut from documents that were kept
    dropped: list[str]  # documents left out whole as copies

    @property
    def text(self) -> str:
        return "".join(self.documents)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def excluded_texts(base: BaseCorpus, allow_download: bool = True) -> list[str]:
    texts = []
    for name in base.excluded:
        data, _ = datasets.read_dataset(name, allow_download=allow_download, progress=False)
        texts.append(normalise_newlines(data.decode("utf-8")))
    return texts


def build(
    name: str,
    allow_download: bool = True,
    log: Callable[[str], None] | None = None,
    forbidden: Forbidden | None = None,
) -> BuiltCorpus:
    """Build the base corpus `name` from its collections (see the module docstring)."""
    base = get_base_corpus(name)
    if base.derived_from:
        return _derive(base, allow_download, log)
    if forbidden is None:
        forbidden = Forbidden.of(excluded_texts(base, allow_download))
    docs: list[tuple[str, str]] = []
    dropped: list[str] = []
    cut_total = 0
    for cname in base.collections:
        coll = collection(cname)
        for i, member in enumerate(coll.members):
            data = member_bytes(coll, member, allow_download)
            label = f"{coll.name}/{member.path}"
            text = clean(data.decode(member.encoding), coll.cleaner)
            kept, cut = cut_copies(text, forbidden)
            if cut > DROP_DOCUMENT * len(text):
                dropped.append(label)
            elif kept.strip():
                docs.append((label, clean(kept)))
                cut_total += cut
            if log and (i + 1) % 50 == 0:
                log(f"charlstm: {coll.name}: {i + 1}/{len(coll.members)} files")
    docs.sort(key=lambda d: hashlib.sha256(d[0].encode("utf-8")).hexdigest())
    return BuiltCorpus(name, [d for _, d in docs], [n for n, _ in docs], cut_total, dropped)


def _derive(
    base: BaseCorpus, allow_download: bool, log: Callable[[str], None] | None
) -> BuiltCorpus:
    """The selection `base` makes of its parent's documents (see `BaseCorpus`)."""
    text, starts = load(base.derived_from, allow_download, log)
    names = built_meta(base.derived_from)["documents"]
    ends = [*starts[1:].tolist(), len(text)]
    trained = len(text) - round(len(text) * base.held_out)  # the parent's held-out tail starts here
    docs = [
        (name, text[a:b])
        for name, a, b in zip(names, starts.tolist(), ends, strict=True)
        if b <= trained
    ]
    chosen = [d for d in docs if d[0].startswith(base.select)]
    wanted = sum(len(d) for _, d in chosen)
    for name, doc in docs:
        if wanted <= 0:
            break
        if not name.startswith(base.select):
            chosen.append((name, doc))
            wanted -= len(doc)
    chosen.sort(key=lambda d: hashlib.sha256(d[0].encode("utf-8")).hexdigest())
    return BuiltCorpus(base.name, [d for _, d in chosen], [n for n, _ in chosen], 0, [])


def corpus_dir() -> Path:
    return datasets.cache_dir().parent / "corpora"


def _cached_paths(name: str) -> tuple[Path, Path]:
    return corpus_dir() / f"{name}.txt", corpus_dir() / f"{name}.json"


def load(
    name: str, allow_download: bool = True, log: Callable[[str], None] | None = None
) -> tuple[str, np.ndarray]:
    """The text of the base corpus `name` and where its documents start, built on first use and
    then read from the cache (its sha256 checked against the one recorded when it was built)."""
    get_base_corpus(name)
    text_path, meta_path = _cached_paths(name)
    if text_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        data = text_path.read_bytes()
        if (
            meta.get("format_version") == FORMAT_VERSION
            and hashlib.sha256(data).hexdigest() == meta["sha256"]
        ):
            return data.decode("utf-8"), np.asarray(meta["starts"], np.int64)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"charlstm: building the base corpus {name} (once; cached in {corpus_dir()})")
    built = build(name, allow_download, log)
    text = built.text
    starts = np.cumsum([0] + [len(d) for d in built.documents[:-1]], dtype=np.int64)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "sha256": built.sha256,
        "characters": len(text),
        "documents": built.names,
        "starts": starts.tolist(),
        "cut_lines_chars": built.cut_lines_chars,
        "dropped": built.dropped,
    }
    atomic_write_bytes(text_path, text.encode("utf-8"))
    atomic_write_bytes(meta_path, json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    log(
        f"charlstm: {name}: {len(text):,} characters in {len(built.documents)} documents "
        f"(sha256 {built.sha256[:12]}…); {built.cut_lines_chars:,} characters of lines shared with "
        f"{', '.join(get_base_corpus(name).excluded)} cut, {len(built.dropped)} documents left out"
    )
    return text, starts


def built_meta(name: str) -> dict | None:
    """What the cached build of `name` recorded (sha256, documents, what was cut), if any."""
    path = _cached_paths(name)[1]
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def status() -> list[dict[str, object]]:
    """One row per collection and per base corpus, as `datasets.status` has one per dataset."""
    rows: list[dict[str, object]] = []
    for name in collection_names():
        coll = collection(name)
        first = coll.members[0]  # where it lies; every file is checked when a corpus is built
        local = [
            str(path)[: -len(first.path) - 1]
            for path in datasets.candidate_paths(_member_dataset(coll, first))
            if path.is_file()
        ]
        rows.append(
            {
                "name": coll.name,
                "kind": "collection",
                "description": f"{coll.description} ({len(coll.members)} files)",
                "local": local[0] if local else None,
                "url": f"https://github.com/{coll.repo}/tree/{coll.commit}",
                "sha256": coll.sha256,
                "size": coll.size,
                "licence": coll.licence,
            }
        )
    for base in BASE_CORPORA.values():
        meta = built_meta(base.name)
        rows.append(
            {
                "name": base.name,
                "kind": "base corpus",
                "description": f"{base.description}: {' + '.join(base.collections)}, cleaned, "
                f"without {', '.join(base.excluded)}",
                "local": f"{_cached_paths(base.name)[0]} ({meta['characters']:,} characters, "
                f"sha256 {meta['sha256'][:12]}…)"
                if meta
                else None,
            }
        )
    return rows
