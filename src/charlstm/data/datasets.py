"""Named corpora: where each one comes from, and how a local copy is found or fetched.

Each dataset has a pinned address and a sha256. A copy is looked for in ``$CHARLSTM_DATA`` (tests
and CI point it at the read-only shared folder), then in the user cache, and only then downloaded.
Every copy is checked against the sha256 before use: a mismatch is an error, never a silent
substitute. The bytes that are checked are the bytes used: a copy is read once (`read_dataset`),
hashed, and decoded from that same buffer, so a file that changes after its check cannot slip in.
A download stops at the pinned size (a server cannot fill the disk), is hashed as it arrives and
lands in the cache only whole and verified (written, fsynced, then renamed).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from charlstm.atomic import atomic_write_bytes
from charlstm.errors import UserError

DATA_ENV = "CHARLSTM_DATA"


@dataclass(frozen=True)
class NamedDataset:
    name: str
    filename: str
    url: str
    sha256: str
    size: int  # bytes; a download or copy larger than this is refused unread
    description: str


DATASETS: dict[str, NamedDataset] = {
    d.name: d
    for d in (
        NamedDataset(
            "byron-ru",
            "byron_ru.txt",
            "https://raw.githubusercontent.com/Rapptarr/Laba2/"
            "4fc6526fe6db928aeec03a8bbeaf3520e59a1f28/train_text.txt",
            "06d921a6b5dc1ea38dc94b8c33c05fcf16b15f8101d713df96bafab20b3fa11d",
            22_521,
            "Byron's poems in Russian translation, the lab's corpus (12,285 characters)",
        ),
        NamedDataset(
            "onegin-ru",
            "onegin_ru.txt",
            "https://raw.githubusercontent.com/attatrol/data_sources/"
            "c7958eb325e371b4e31792815fcf5f80d85d2878/onegin.txt",
            "2990bb79495c017175794596e9b5f98e9e10cf569197e4c561bdd9a2853fb948",
            262_521,
            "Pushkin, 'Eugene Onegin', Russian verse (152,374 characters)",
        ),
        NamedDataset(
            "tinyshakespeare",
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/"
            "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            1_115_394,
            "40,000 lines of Shakespeare, the standard char-level benchmark (1,115,394 characters)",
        ),
    )
}

DEFAULT_DATASET = "byron-ru"


def cache_dir() -> Path:
    """The per-user cache folder for downloaded corpora."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charlstm" / "datasets"


def get_dataset(name: str) -> NamedDataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
            "(see `charlstm datasets`) or give your own file with --text"
        ) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def candidate_paths(ds: NamedDataset) -> list[Path]:
    """Where a local copy may lie, in the order they are tried."""
    paths = []
    if os.environ.get(DATA_ENV):
        paths.append(Path(os.environ[DATA_ENV]) / ds.filename)
    paths.append(cache_dir() / ds.filename)
    return paths


def _read_capped(path: Path, ds: NamedDataset) -> bytes:
    """The bytes of a local copy, read once; one byte past the pinned size is enough to refuse."""
    with open(path, "rb") as fh:
        return fh.read(ds.size + 1)


def _check(data: bytes, path: Path, ds: NamedDataset) -> bytes:
    """`data` itself if it is the pinned dataset, else a `UserError` naming the copy."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) > ds.size or digest != ds.sha256:
        got = (
            f"more than the pinned {ds.size:,} bytes" if len(data) > ds.size else digest[:12] + "…"
        )
        raise UserError(
            f"{path} does not match the pinned sha256 of {ds.name} (got {got}, expected "
            f"{ds.sha256[:12]}…); delete it so a fresh copy is downloaded, or fix {DATA_ENV}"
        )
    return data


def check_copy(path: Path, ds: NamedDataset) -> bytes:
    """The bytes of the local copy `path` of `ds`, read once and checked (a `UserError` if it is
    not the pinned file)."""
    return _check(_read_capped(path, ds), path, ds)


def _verified(path: Path, ds: NamedDataset) -> Path:
    _check(_read_capped(path, ds), path, ds)
    return path


def _local_copy(ds: NamedDataset) -> Path | None:
    return next((p for p in candidate_paths(ds) if p.is_file()), None)


def find_local(name: str) -> Path | None:
    """A verified local copy of the dataset, or None if there is none (a bad copy is an error)."""
    ds = get_dataset(name)
    path = _local_copy(ds)
    return _verified(path, ds) if path is not None else None


def download(ds: NamedDataset, dest: Path, progress: bool = True) -> bytes:
    """Download at most the pinned size, check the sha256 of exactly those bytes, then write them
    to `dest` (temporary file, fsync, rename); returns the bytes."""
    from tqdm import tqdm

    def too_large() -> UserError:
        return UserError(
            f"the download of {ds.name} from {ds.url} is larger than its pinned size "
            f"({ds.size:,} bytes); nothing was kept; try again later or place a verified copy "
            f"in {dest.parent}"
        )

    data = bytearray()
    try:
        with urllib.request.urlopen(ds.url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            if total is not None and total > ds.size:
                raise too_large()
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=ds.name, disable=not progress
            ) as bar:
                while len(data) <= ds.size:
                    block = resp.read(min(1 << 16, ds.size + 1 - len(data)))
                    if not block:
                        break
                    data += block
                    bar.update(len(block))
        if len(data) > ds.size:
            raise too_large()
        if hashlib.sha256(data).hexdigest() != ds.sha256:  # a bad download never lands
            raise UserError(
                f"the download of {ds.name} from {ds.url} does not match its pinned sha256; "
                "try again later or place a verified copy in " + str(dest.parent)
            )
        atomic_write_bytes(dest, bytes(data))
        return bytes(data)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        places = " or ".join(str(p.parent) for p in candidate_paths(ds))
        raise UserError(
            f"cannot download {ds.name} from {ds.url} ({reason}); put {ds.filename} in {places} "
            f"(or point {DATA_ENV} at a folder holding it)"
        ) from None


def read_dataset(
    name: str, allow_download: bool = True, progress: bool = True
) -> tuple[bytes, Path]:
    """The verified bytes of the named dataset and where they came from: a local copy read once,
    or a download (kept in the cache for next time). The caller uses these bytes, not the file."""
    ds = get_dataset(name)
    path = _local_copy(ds)
    if path is not None:
        return _check(_read_capped(path, ds), path, ds), path
    if not allow_download:
        places = " or ".join(str(p.parent) for p in candidate_paths(ds))
        raise UserError(f"no local copy of {ds.name}; put {ds.filename} in {places}")
    dest = cache_dir() / ds.filename
    return download(ds, dest, progress=progress), dest


def resolve(name: str, allow_download: bool = True, progress: bool = True) -> Path:
    """The path of a verified copy of the named dataset, downloading it into the cache if needed.

    (For readers that stream the file themselves, such as `charlstm prepare`; the file is checked
    here and read again there. `read_dataset` gives the checked bytes themselves.)"""
    return read_dataset(name, allow_download=allow_download, progress=progress)[1]


def status() -> list[dict[str, str | None]]:
    """One row per dataset: its name, description and the verified local copy, if any."""
    rows = []
    for ds in DATASETS.values():
        try:
            where = find_local(ds.name)
            state = str(where) if where else None
        except UserError:
            state = "corrupt copy (sha256 mismatch)"
        rows.append({"name": ds.name, "description": ds.description, "local": state, "url": ds.url})
    return rows
