"""`metrics.jsonl`: one JSON object per line, appended as training goes.

A scheduled evaluation appends a record with the training loss, the validation loss, the rate and
the speed; the end of a run appends the final record (``"final": true``) with the full-pass figures
of the final and best weights. ``val_scope`` says what a record's ``val_loss`` was measured on:
``"slice"`` (the fixed slice scheduled evaluations read of a split larger than it: its figure reads
above or below the full pass) or ``"full"`` (the whole validation split). Records written before
the key existed have none; their scheduled figures may be either.

Appending a line is not atomic: a run killed in the middle of a write leaves a torn last line. Every
reader goes through `read_records`, which skips a line that is not a JSON object with an integer
``step``, so a torn line (or any other damaged one) never stops a report, a comparison or a resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charlstm.atomic import atomic_write_text


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line; raises OSError as the file system does."""
    append_line(path, json.dumps(record))


def append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
        return record
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (damaged lines skipped); [] when there is no file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [r for r in map(_parse, lines) if r is not None]


def outcome(path: Path) -> dict[str, Any]:
    """How a run ended, from its metrics file: ``best_val_loss``, ``steps`` and ``val_scope``
    (what the loss was measured on, None where an older record does not say). The final record
    (the full-pass figures written at the end) decides; a run without one (stopped before its end)
    gives its best scheduled evaluation. A `ValueError` when the file holds no evaluation."""
    records = read_records(path)
    finals = [r for r in records if r.get("final")]
    if finals:
        last = finals[-1]
        return {
            "best_val_loss": float(last.get("best_val_loss", last["val_loss"])),
            "steps": last["step"],
            "val_scope": "full",
        }
    vals = [r for r in records if isinstance(r.get("val_loss"), int | float)]
    if not vals:
        raise ValueError(f"{path} holds no evaluation")
    best = min(vals, key=lambda r: r["val_loss"])
    return {
        "best_val_loss": float(best["val_loss"]),
        "steps": records[-1]["step"],
        "val_scope": best.get("val_scope"),
    }


def keep_records_up_to(path: Path, step: int) -> None:
    """Keep the records a resumed run stands on: those of steps up to `step`.

    A run killed between two checkpoints leaves records of steps after its last checkpoint, which
    the resumed run is about to redo and log again, and perhaps a torn last line. Both go, and so
    does the final record of a run that ended (or was stopped) before: the resumed run goes on past
    that end and writes its own, so a curve never shows an end in its middle. The file is
    rewritten atomically, and only when something changes.
    """
    if not path.is_file():
        return
    old = path.read_text(encoding="utf-8", errors="replace")
    kept = [
        line + "\n"
        for line in old.splitlines()
        if (r := _parse(line)) is not None and r["step"] <= step and not r.get("final")
    ]
    if "".join(kept) != old:
        atomic_write_text(path, "".join(kept))
