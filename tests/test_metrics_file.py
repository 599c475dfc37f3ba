"""The metrics file's readers: how a run ended, read the same way by every benchmark."""

import json

import pytest

from charlstm.runs.metrics import keep_records_up_to, outcome


def _write(path, *records, torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn, encoding="utf-8")


def test_the_last_final_record_decides(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(
        f,
        {"step": 50, "val_loss": 2.0},
        {"step": 60, "val_loss": 1.9, "best_val_loss": 1.8, "final": True},
        {"step": 90, "val_loss": 1.7},  # a resumed session's evaluation
        {"step": 100, "val_loss": 1.75, "best_val_loss": 1.6, "final": True},
        torn='{"step": 110, "val',
    )
    assert outcome(f) == {"best_val_loss": 1.6, "steps": 100, "val_scope": "full"}


def test_a_final_record_without_a_best_gives_its_own_loss(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(f, {"step": 10, "val_loss": 2.5}, {"step": 20, "val_loss": 2.25, "final": True})
    assert outcome(f) == {"best_val_loss": 2.25, "steps": 20, "val_scope": "full"}


def test_a_run_stopped_before_its_end_gives_its_best_evaluation_and_what_it_read(tmp_path):
    """Before its end a run has only scheduled figures: the best one, and whether it was of a
    slice (unknown for records older than the key)."""
    f = tmp_path / "metrics.jsonl"
    _write(
        f,
        {"step": 25, "val_loss": 3.0, "val_scope": "slice"},
        {"step": 50, "val_loss": 2.5, "val_scope": "slice"},
        {"step": 75, "val_loss": 2.75, "val_scope": "slice"},
    )
    assert outcome(f) == {"best_val_loss": 2.5, "steps": 75, "val_scope": "slice"}
    _write(f, {"step": 25, "val_loss": 3.0}, {"step": 50, "val_loss": 2.5})
    assert outcome(f) == {"best_val_loss": 2.5, "steps": 50, "val_scope": None}


def test_no_evaluation_is_an_error_not_a_figure(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(f, {"step": 1, "train_loss": 4.0})
    with pytest.raises(ValueError, match="holds no evaluation"):
        outcome(f)
    with pytest.raises(ValueError):
        outcome(tmp_path / "missing.jsonl")


def test_a_resumed_run_drops_what_it_redoes_and_the_end_it_goes_past(tmp_path):
    """Records after the checkpoint it resumes from, a torn line and the earlier final record go;
    the evaluations up to the checkpoint stay, and nothing changes when nothing has to."""
    f = tmp_path / "metrics.jsonl"
    _write(
        f,
        {"step": 50, "val_loss": 2.0},
        {"step": 60, "val_loss": 1.9, "best_val_loss": 1.8, "final": True},
        {"step": 70, "val_loss": 1.85},  # after the checkpoint at 60: redone
        torn='{"step": 80, "val',
    )
    keep_records_up_to(f, 60)
    assert [json.loads(line) for line in f.read_text().splitlines()] == [
        {"step": 50, "val_loss": 2.0}
    ]
    stamp = f.stat().st_mtime_ns
    keep_records_up_to(f, 60)
    assert f.stat().st_mtime_ns == stamp
