"""Crash-safe file writes: a file written through here appears whole or not at all.

A write goes to a temporary file in the same folder, is flushed to the disk (fsync), and is then
renamed over the destination; the rename is atomic on POSIX file systems, so a crash, a full disk or
a Ctrl-C at any moment leaves either the previous file or the new one, never a mixture. Checkpoints,
`metrics.jsonl` repairs, config files, reports, comparison and tuning results, prepared corpora and
downloads all go through here; files that grow as a run goes (`metrics.jsonl`, `samples.txt`, logs)
and the plots of `compare` and `tune` are written directly.

Temporary files are named ``.<name>.<random>.tmp``; `remove_stale_temps` deletes those a crash left.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """The single place whole-file bytes reach the disk.

    Tests replace it to simulate a full disk."""
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: it replaces `path` only when the block ends without
    an exception, after an fsync; on any failure the temporary file goes and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions any other new file would get.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    with atomic_file(path) as fh:
        _write_all(fh, data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(*folders: Path) -> None:
    """Delete the temporary files of writes that a crash interrupted, in `folders` (only one
    process writes a given folder at a time, so none of them is in use)."""
    for folder in folders:
        if Path(folder).is_dir():
            for tmp in Path(folder).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
