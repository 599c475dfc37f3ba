"""TensorBoard event files of a run, for ``--tensorboard DIR``: its curves and samples, live.

The loop hands each metrics record (the one appended to ``metrics.jsonl``) and each training sample
to a `BoardWriter`, which writes them as scalars and text into ``DIR/NAME``, NAME being the run
folder's name, so that ``tensorboard --logdir DIR`` shows every run written there side by side (a
pre-training phase is ``NAME-pretrain``). ``loss/validation`` is always a full pass over the split;
the figures of a slice of it read above or below that, and are drawn apart. What is written:

    loss/train, loss/validation                 nats/char (as in metrics.jsonl)
    bits_per_char/train, bits_per_char/validation
    loss/validation_slice,                      the scheduled evaluations' figures where they read
      bits_per_char/validation_slice              a slice of the split (``val_scope`` "slice")
    optim/learning_rate                         the rate of the step evaluated
    speed/chars_per_second                      training characters per second since the last one
    samples                                     the samples of samples.txt, as text

The folder belongs to one run. A new run refuses a folder that already holds event files (another
run's, or this one's before a ``--force``), and ``--force`` deletes them. A resumed run at step N
appends a new event file that starts with TensorBoard's purge marker at N + 1, so what a killed run
wrote after its last checkpoint is hidden, as `runs.metrics.keep_records_up_to` drops those lines:
every step shows once. Event files grow as the run goes (like ``metrics.jsonl``, not through
`charlstm.atomic`); TensorBoard skips a torn last record.

The `tensorboard` package is an optional extra (``charlstm[tensorboard]``) and is imported only
here, only when a run asks for it, so a run without ``--tensorboard`` starts as fast as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from charlstm.errors import UserError

EVENT_FILES = "events.out.tfevents.*"  # the names TensorBoard's writers give their files
SAMPLES_TAG = "samples"
# metrics.jsonl key → TensorBoard tag
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/validation",
    "val_bpc": "bits_per_char/validation",
    "lr": "optim/learning_rate",
    "chars_per_s": "speed/chars_per_second",
}
TRAIN_BPC = "bits_per_char/train"
SLICE_SUFFIX = "_slice"  # on the validation tags of a record whose ``val_scope`` is "slice"


def board_dir(tensorboard: str | Path, out: str | Path) -> Path:
    """Where the run in `out` writes its event files: ``tensorboard/<the run folder's name>`` (the
    name as written, `..` resolved but not symbolic links)."""
    return Path(tensorboard) / Path(os.path.abspath(out)).name


def event_files(path: Path) -> list[Path]:
    """The event files in `path` (files or symbolic links; a link is never followed)."""
    return [p for p in path.glob(EVENT_FILES) if p.is_symlink() or p.is_file()]


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package, which is not installed; install it "
            "with: pip install 'charlstm[tensorboard]' (or train without --tensorboard)"
        ) from None
    return SummaryWriter


def _write_failed(path: Path, reason: object) -> UserError:
    return UserError(
        f"could not write TensorBoard events to {str(path)!r} ({reason}); give --tensorboard "
        "a folder you can write to (a run that has a checkpoint continues with --resume)"
    )


def check(tensorboard: str | Path, out: str | Path, *, resume: bool, force: bool) -> None:
    """Before a run touches anything: the package imports, and the run's folder can be its own
    (not a file; for a new run, no event files unless `force` will replace them)."""
    _summary_writer()
    path = board_dir(tensorboard, out)
    for p in (Path(tensorboard), path):
        if p.exists() and not p.is_dir():
            raise _write_failed(path, f"{p} is a file")
    if not resume and not force and path.is_dir() and event_files(path):
        raise UserError(
            f"TensorBoard folder {str(path)!r} already holds another run's event files; give "
            "another --tensorboard folder, or pass --force to replace them"
        )


class BoardWriter:
    """The event files of one run (see the module's docstring); `check` first, then open it."""

    def __init__(self, tensorboard: str | Path, out: str | Path, *, resume_step: int | None):
        """`resume_step`: the step a resumed run restarts from, None for a new run (whose folder
        `check` has allowed: its old event files, if any, are deleted)."""
        SummaryWriter = _summary_writer()
        self.path = board_dir(tensorboard, out)
        try:
            if resume_step is None:
                for old in event_files(self.path):
                    old.unlink()  # a link itself, never what it points to
            purge = None if resume_step is None else resume_step + 1
            # flush_secs: a record is flushed when written (`record`); this only bounds the rest
            self._writer = SummaryWriter(str(self.path), purge_step=purge, flush_secs=30)
        except OSError as exc:
            raise _write_failed(self.path, exc.strerror or exc) from None

    def record(self, record: dict[str, Any]) -> None:
        """Write a metrics record's numbers at its step, and flush so that TensorBoard shows them
        now (one record per evaluation: cheap)."""
        step = record["step"]
        part = SLICE_SUFFIX if record.get("val_scope") == "slice" else ""
        values = {
            tag + part * key.startswith("val_"): record[key]
            for key, tag in SCALARS.items()
            if key in record
        }
        if "train_loss" in record:
            values[TRAIN_BPC] = record["train_loss"] / math.log(2)
        with self._writing():
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def sample(self, step: int, text: str) -> None:
        """A training sample as text (TensorBoard shows markdown: a code block keeps the lines)."""
        with self._writing():
            self._writer.add_text(SAMPLES_TAG, as_markdown(text), step)

    def close(self) -> None:
        with self._writing():
            self._writer.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _write_failed(self.path, exc.strerror or exc) from None


def as_markdown(text: str) -> str:
    """`text` as a markdown code block (four spaces before each line), shown as written."""
    return "\n".join("    " + line for line in text.split("\n"))
