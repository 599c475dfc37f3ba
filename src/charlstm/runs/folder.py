"""One run folder: where each of its files lives, and the only code that writes training's files.

Training writes through a `RunFolder` (config, metrics, samples, checkpoints); report, comparison,
tuning, the benchmarks and the Python API read through it. `charlstm report` writes its own files
(`analysis.report.write_report`: report.html, report.md, report/) into the run folder or another
one. The layout is in the package docstring.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlstm.atomic import atomic_write_text
from charlstm.errors import CheckpointError, UserError
from charlstm.runs import metrics
from charlstm.runs.checkpoint import (
    Checkpoint,
    is_checkpoint_file,
    read_checkpoint,
    save_checkpoint,
)

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINTS = ("best", "last")
REPORT_DIR = "report"
# What `--force` replaces in a folder that holds a run: these files; in best/ and last/ the
# checkpoint file; in report/ the PNGs and analysis.json that `charlstm report` writes there. Any
# other file, in the folder or in those sub-folders, is the user's and stays.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, "report.html", "report.md")
REPORT_DIR_FILES = ("*.png", "analysis.json")
# The sections of the config.toml that `charlstm train` writes (how a run's config is told from
# another program's config.toml).
CONFIG_SECTIONS = ("data", "model", "optim", "train")


def write_failed(path: Path, exc: OSError) -> UserError:
    return UserError(
        f"could not write {path} ({exc.strerror or exc}); the run's checkpoints are intact; free "
        "some disk space and continue with --resume (or start again if it has no checkpoint yet)"
    )


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / which / CHECKPOINT_FILE


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_run_config(path: Path) -> bool:
    """A config.toml as `charlstm train` writes it: TOML with the four sections as tables."""
    if not _regular_file(path) or path.stat().st_size > 1 << 20:
        return False
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return all(isinstance(doc.get(s), dict) for s in CONFIG_SECTIONS)


def _is_charlstm_checkpoint(path: Path) -> bool:
    return _regular_file(path) and not path.parent.is_symlink() and is_checkpoint_file(path)


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` holds a charlstm run: a config.toml that `charlstm train` wrote, or a best/
    or last/ checkpoint. Symbolic links are not followed: a link is never evidence of a run."""
    path = Path(path)
    return _is_run_config(path / CONFIG_FILE) or any(
        _is_charlstm_checkpoint(checkpoint_path(path, w)) for w in CHECKPOINTS
    )


def _protected(path: Path) -> str | None:
    """Why `--force` must never delete in `path`, or None."""
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        return "the root folder"
    try:
        if resolved == Path.home().resolve():
            return "your home folder"
    except (RuntimeError, KeyError, OSError):  # no home folder known
        pass
    return None


def _temp_of(name: str, folder: Path) -> list[Path]:
    """The temporary files that an interrupted atomic write of `folder/name` left (atomic.py)."""
    return [p for p in folder.glob(f".{name}.*.tmp") if _regular_file(p) or p.is_symlink()]


def _in_the_way(out: Path, path: Path, expected: str) -> UserError:
    kind = "folder" if path.is_dir() else "file" if path.is_file() else "special file"
    return UserError(
        f"--out {str(out)!r} holds {str(path.relative_to(out))!r} as a {kind} where a run keeps "
        f"a {expected}; --force leaves it alone: move it out of the way or choose another --out"
    )


def _run_files(out: Path) -> tuple[list[Path], list[Path]]:
    """What `--force` removes from the run folder `out`: (files and links to unlink, folders to
    remove once they are empty). Symbolic links are unlinked, never followed. Raises a `UserError`
    when something that is not a run's file sits where one belongs, before anything is deleted."""
    unlink: list[Path] = []
    folders: list[Path] = []
    for name in RUN_FILES:
        p = out / name
        if p.is_symlink() or p.is_file():
            unlink.append(p)
        elif p.exists():
            raise _in_the_way(out, p, "file")
        unlink += _temp_of(name, out)
    inside = {w: (CHECKPOINT_FILE,) for w in CHECKPOINTS} | {REPORT_DIR: REPORT_DIR_FILES}
    for sub, patterns in inside.items():
        d = out / sub
        if d.is_symlink():
            unlink.append(d)
            continue
        if not d.exists():
            continue
        if not d.is_dir():
            raise _in_the_way(out, d, "folder")
        for pattern in patterns:
            for p in sorted(d.glob(pattern)):
                if p.is_symlink() or p.is_file():
                    unlink.append(p)
                elif pattern == CHECKPOINT_FILE:
                    raise _in_the_way(out, p, "file")
            unlink += _temp_of(pattern, d)
        folders.append(d)
    return unlink, folders


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint file belongs to, or None for a file outside best/ or last/."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name in CHECKPOINTS else None


def find_checkpoint(run: str | Path, prefer: str = "best") -> Path:
    """The checkpoint file of a run folder (best by default), or a checkpoint file given as is."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise CheckpointError(
            f"run folder {str(run)!r} does not exist; give a folder made by `charlstm train`"
        )
    for which in [prefer] + [w for w in CHECKPOINTS if w != prefer]:
        p = checkpoint_path(run, which)
        if p.is_file():
            return p
    raise CheckpointError(
        f"{str(run)!r} is not a charlstm run folder (no best/ or last/ checkpoint); "
        "give a folder made by `charlstm train`"
    )


@dataclass(frozen=True)
class RunFolder:
    """The files of the run in `path`."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    def checkpoint_file(self, which: str) -> Path:
        return checkpoint_path(self.path, which)

    # -- starting and resuming -------------------------------------------------------------------

    def start_new(self, force: bool) -> None:
        """Make the folder ready for a new run: create it, or with `force` remove a previous
        run's files from it (only a run's own files, only in a folder that holds a run, never in
        the home or root folder; links are unlinked, not followed); anything else in a non-empty
        folder is refused, and a refusal deletes nothing."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r} is a file; give a folder path")
        # (the temporary files of an interrupted first write do not make a folder a user's)
        temps = {p for name in RUN_FILES for p in _temp_of(name, out)} if out.is_dir() else set()
        if out.is_dir() and any(p not in temps for p in out.iterdir()):
            run = is_run_dir(out)
            if not force:
                what = "holds a run" if run else "is not empty and is not a charlstm run"
                raise UserError(
                    f"--out {str(out)!r} {what}; continue it with --resume, "
                    "choose another --out, or pass --force to replace the run's files"
                )
            protected = _protected(out)
            if protected:
                raise UserError(
                    f"--out {str(out)!r} is {protected}; --force never deletes anything there; "
                    "give the run a folder of its own, e.g. --out runs/NAME"
                )
            if not run:
                raise UserError(
                    f"--out {str(out)!r} is not a charlstm run (no config.toml or checkpoint "
                    "that charlstm wrote), so --force replaces nothing in it; choose another "
                    "--out or an empty folder"
                )
            unlink, folders = _run_files(out)
            for p in unlink:
                p.unlink(missing_ok=True)
            for d in folders:
                if not any(d.iterdir()):
                    d.rmdir()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create --out {str(out)!r} ({exc.strerror or exc}); choose a "
                "folder you can write to"
            ) from None

    def resume_checkpoint(self) -> Checkpoint:
        """The last/ checkpoint to resume from, or a one-line error saying why there is none."""
        last = self.checkpoint_file("last")
        if not last.is_file():
            if not self.path.is_dir():
                raise CheckpointError(
                    f"run folder {str(self.path)!r} does not exist; give a folder "
                    "made by `charlstm train`"
                )
            if self.config_file.is_file():  # stopped (or killed) before its first checkpoint
                raise UserError(
                    f"{str(self.path)!r} stopped before its first checkpoint, "
                    "so there is nothing to resume; start it again with: "
                    f"charlstm train --config {self.config_file} --out {self.path} --force"
                )
            raise CheckpointError(
                f"{str(self.path)!r} is not a charlstm run folder (no last/ "
                "checkpoint); give a folder made by `charlstm train`"
            )
        return read_checkpoint(last)

    def remove_stale_temps(self) -> None:
        """Delete the temporary files that interrupted writes of the run's files left (only
        those: another `.*.tmp` file in the folder is not ours; a linked best/ is not entered)."""
        for name in RUN_FILES:
            for p in _temp_of(name, self.path):
                p.unlink(missing_ok=True)
        for which in CHECKPOINTS:
            d = self.path / which
            if d.is_dir() and not d.is_symlink():
                for p in _temp_of(CHECKPOINT_FILE, d):
                    p.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------------

    def write_config(self, toml_text: str) -> None:
        try:
            atomic_write_text(self.config_file, toml_text)
        except OSError as exc:
            raise write_failed(self.config_file, exc) from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            metrics.append_record(self.metrics_file, record)
        except OSError as exc:
            raise write_failed(self.metrics_file, exc) from None

    def append_sample(self, text: str) -> None:
        try:
            metrics.append_line(self.samples_file, text)
        except OSError as exc:
            raise write_failed(self.samples_file, exc) from None

    def keep_metrics_up_to(self, step: int) -> None:
        try:
            metrics.keep_records_up_to(self.metrics_file, step)
        except OSError as exc:
            raise write_failed(self.metrics_file, exc) from None

    def save_checkpoint(
        self, which: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        save_checkpoint(self.checkpoint_file(which), tensors, meta)

    # -- reading ---------------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        return metrics.read_records(self.metrics_file)

    def read_checkpoint(self, which: str) -> Checkpoint:
        return read_checkpoint(self.checkpoint_file(which))
