"""`--tensorboard DIR`: a run's curves and samples as TensorBoard event files, read back with
TensorBoard's own reader; the refusals that keep one folder to one run; a resumed run that shows
each evaluation once; and a run without the flag that never imports tensorboard."""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import pytest

import charlstm
from charlstm.training import tensorboard
from charlstm.training.orchestrate import resume_config
from tests.helpers import (
    assert_same_tensors,
    copy_run,
    invoke,
    make_run,
    one_line_error,
    quiet,
    read_metrics,
    train_args,
    weights,
)

SCALAR_TAGS = {*tensorboard.SCALARS.values(), tensorboard.TRAIN_BPC}
TEXT_TAG = tensorboard.SAMPLES_TAG + "/text_summary"  # where torch's add_text puts a text


def read_board(path: Path):
    """TensorBoard's own reader over one run's folder, keeping every event (by default it keeps
    only 10 texts per tag)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    board = EventAccumulator(str(path), size_guidance={SCALARS: 0, TENSORS: 0})
    board.Reload()
    return board


def scalars(board, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in board.Scalars(tag)]


def assert_close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same steps, and the same values to float32's precision (TensorBoard's scalars)."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def texts(board) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in board.Tensors(TEXT_TAG)]


def samples_txt(run: Path) -> list[tuple[int, str]]:
    """The samples of a run's samples.txt, by step (each entry: a header line, the text, a blank
    line)."""
    text = (run / "samples.txt").read_text(encoding="utf-8")
    parts = re.split(r"^--- step (\d+), val \S+\n", text, flags=re.MULTILINE)
    return [(int(step), text.removesuffix("\n\n")) for step, text in zip(parts[1::2], parts[2::2])]


def _block_tensorboard(monkeypatch) -> None:
    """Make `import tensorboard` fail in this process, as on a machine without the package."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.slow
def test_event_files_hold_the_metrics_and_the_samples(tmp_path, corpus) -> None:
    """Every number of metrics.jsonl is a scalar at its step (bits/char of the training loss too),
    and every sample of samples.txt is a text at its step, as TensorBoard's reader sees them."""
    run = make_run(
        tmp_path / "poems",
        corpus,
        max_steps=22,  # 4 evaluations, then a final one at step 22
        sample_every=1,
        sample_length=40,
        tensorboard=str(tmp_path / "tb"),
    )
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["poems"]  # DIR/<run name>
    board = read_board(tmp_path / "tb" / "poems")
    assert set(board.Tags()["scalars"]) == SCALAR_TAGS

    records = read_metrics(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 22]
    for key, tag in tensorboard.SCALARS.items():
        assert_close(scalars(board, tag), [(r["step"], r[key]) for r in records if key in r])
    train_bpc = [(r["step"], r["train_loss"] / math.log(2)) for r in records if "train_loss" in r]
    assert_close(scalars(board, tensorboard.TRAIN_BPC), train_bpc)

    samples = samples_txt(run)
    assert [s for s, _ in samples] == [5, 10, 15, 20]
    assert texts(board) == [(s, tensorboard.as_markdown(text)) for s, text in samples]


def test_slice_figures_are_drawn_apart_from_the_full_pass(tmp_path, corpus, monkeypatch) -> None:
    """Scheduled evaluations that read a slice of the split draw their own curves
    (loss/validation_slice); loss/validation holds full passes only: here the final one, at the
    step of the last scheduled evaluation, which the other curves do not draw twice."""
    from charlstm.model import evaluation

    monkeypatch.setattr(evaluation, "SLICE_STRETCH", 8)
    monkeypatch.setattr(evaluation, "SLICE_WARMUP", 4)
    run = make_run(tmp_path / "poems", corpus, eval_chars=32, tensorboard=str(tmp_path / "tb"))
    board = read_board(tmp_path / "tb" / "poems")
    records = read_metrics(run)
    scheduled, final = records[:-1], records[-1]
    assert {r["val_scope"] for r in scheduled} == {"slice"} and final["val_scope"] == "full"
    slice_tags = {"loss/validation_slice", "bits_per_char/validation_slice"}
    assert set(board.Tags()["scalars"]) == SCALAR_TAGS | slice_tags
    assert_close(
        scalars(board, "loss/validation_slice"), [(r["step"], r["val_loss"]) for r in scheduled]
    )
    assert_close(scalars(board, "loss/validation"), [(20, final["val_loss"])])
    assert_close(scalars(board, "bits_per_char/validation"), [(20, final["val_bpc"])])
    assert [s for s, _ in scalars(board, "optim/learning_rate")] == [5, 10, 15, 20]


@pytest.mark.slow
def test_a_resumed_run_shows_each_evaluation_once_and_trains_as_if_uninterrupted(
    tmp_path, corpus
) -> None:
    """A run killed after its events of step 15 were written but before that step's checkpoint,
    then resumed from step 10, shows the curves of an uninterrupted run, each step once, and ends
    with its weights."""
    straight = make_run(tmp_path / "a" / "run", corpus, tensorboard=str(tmp_path / "tb-a"))

    run = make_run(tmp_path / "b" / "run", corpus, max_steps=10, tensorboard=str(tmp_path / "tb-b"))
    at_10 = copy_run(run, tmp_path / "at-10")
    for steps in (15, 20):
        if steps == 20:  # the kill: the folder is back at step 10, the events went on to 15
            shutil.rmtree(run)
            copy_run(at_10, run)
        config = resume_config(run, {"max_steps": steps})
        charlstm.train(config, run, resume=True, progress=False, log=quiet)

    assert_same_tensors(weights(straight), weights(run))
    want, got = read_board(tmp_path / "tb-a" / "run"), read_board(tmp_path / "tb-b" / "run")
    for tag in SCALAR_TAGS - {"speed/chars_per_second"}:  # the speed is the clock's
        assert [s for s, _ in scalars(got, tag)] == [5, 10, 15, 20], tag
        assert scalars(got, tag) == scalars(want, tag), tag


def test_a_new_run_refuses_a_folder_with_another_runs_events_and_force_replaces_them(
    tmp_path, corpus
) -> None:
    """Two runs' events in one folder would draw one tangled curve: a new run refuses the folder
    before writing anything, and --force deletes the old events."""
    folder = tmp_path / "tb" / "out"
    folder.mkdir(parents=True)
    old = folder / "events.out.tfevents.1700000000.host.1.0"
    old.write_bytes(b"another run's events")
    args = train_args(corpus, tmp_path / "out", "--tensorboard", tmp_path / "tb", max_steps=5)

    one_line_error(invoke(*args), "already holds another run's event files", "--force")
    assert not (tmp_path / "out").exists() and old.read_bytes() == b"another run's events"

    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert not old.exists()
    assert [s for s, _ in scalars(read_board(folder), "loss/validation")] == [5]


def test_without_the_package_the_flag_is_a_one_line_error_that_writes_nothing(
    tmp_path, corpus, monkeypatch
) -> None:
    """No tensorboard installed: exit 2 with the command that installs it, before any file."""
    _block_tensorboard(monkeypatch)
    args = train_args(corpus, tmp_path / "out", "--tensorboard", tmp_path / "tb", max_steps=5)
    one_line_error(invoke(*args), "needs the tensorboard package", "pip install 'charlstm[")
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_the_flag_never_imports_tensorboard(tmp_path, corpus, monkeypatch) -> None:
    """Start-up stays cheap: with every import of tensorboard failing, a run trains and saves."""
    _block_tensorboard(monkeypatch)
    run = make_run(tmp_path / "run", corpus, max_steps=5, sample_every=1, sample_length=5)
    assert [r["step"] for r in read_metrics(run) if not r.get("final")] == [5]
