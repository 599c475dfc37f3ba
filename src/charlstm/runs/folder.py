"""One run folder: where each of its files lives, and the only code that writes training's files.

Training writes through a `RunFolder` (config, metrics, samples, checkpoints); report, comparison,
tuning, the benchmarks and the Python API read through it. `charlstm report` writes its own files
(`analysis.report.write_report`: report.html, report.md, report/) into the run folder or another
one. The layout is in the package docstring.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlstm.atomic import atomic_write_text, remove_stale_temps
from charlstm.errors import CheckpointError, UserError
from charlstm.runs import metrics
from charlstm.runs.checkpoint import Checkpoint, read_checkpoint, save_checkpoint

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINTS = ("best", "last")
REPORT_FILES = ("report.html", "report.md", "report")
# What `--force` replaces in a folder that already holds a run.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, *CHECKPOINTS, *REPORT_FILES)


def write_failed(path: Path, exc: OSError) -> UserError:
    return UserError(
        f"could not write {path} ({exc.strerror or exc}); the run's checkpoints are intact; free "
        "some disk space and continue with --resume (or start again if it has no checkpoint yet)"
    )


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / which / CHECKPOINT_FILE


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or any(
        checkpoint_path(path, w).is_file() for w in CHECKPOINTS
    )


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
        run's files from it; anything else in a non-empty folder is refused."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r} is a file; give a folder path")
        if out.is_dir() and any(out.iterdir()):
            if not force:
                what = (
                    "holds a run" if is_run_dir(out) else "is not empty and is not a charlstm run"
                )
                raise UserError(
                    f"--out {str(out)!r} {what}; continue it with --resume, "
                    "choose another --out, or pass --force to replace the run's files"
                )
            for name in RUN_FILES:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
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
        remove_stale_temps(self.path, *(self.path / w for w in CHECKPOINTS))

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
