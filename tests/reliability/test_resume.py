"""Exact resume and graceful signals: an interrupted run ends bit for bit where an uninterrupted one does.

Train N steps, stop (the step budget, an in-process signal, a real SIGINT or SIGTERM from outside,
or a second Ctrl-C in the middle of the final save), resume to 2N: the weights, Adam's moments, the
RNG state and the carried hidden state in ``last/`` must equal those of a run that went straight to
2N, with the same seed and one thread on the CPU. Both batchings are covered, with dropout (so the
torch RNG matters), a plateau schedule that actually changes the rate, and early stopping.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from charlstm.errors import TrainingStopped
from charlstm.runs import checkpoint as ckpt_io
from charlstm.runs.folder import checkpoint_path
from charlstm.training.orchestrate import resume_config, train

from .conftest import (
    TALLY,
    assert_same_tensors,
    charlstm_cmd,
    cli_flags,
    last_tensors,
    subprocess_env,
    tiny_config,
)

pytestmark = pytest.mark.reliability

QUIET = dict(progress=False, log=lambda m: None)
# Two layers so that dropout also acts between them, weight drop and a moving average of the weights
# (each with state to carry over), and a high rate with no plateau patience so that the schedule
# halves the rate during the run. The EMA is short so that the evaluated weights follow training.
SETUP = dict(
    num_layers=2, dropout=0.3, weight_drop=0.3, ema=0.5, lr=0.3, plateau_patience=0, eval_interval=3
)


def _meta(run: Path) -> dict:
    return ckpt_io.read_checkpoint(checkpoint_path(run, "last")).meta


def _compare(run: Path, reference: Path) -> None:
    """Record and assert that `run` ended exactly where `reference` did."""
    same = False
    try:
        assert_same_tensors(last_tensors(run), last_tensors(reference))
        a, b = _meta(run)["resume"], _meta(reference)["resume"]
        for part in (a, b):
            part.pop("optimizer")  # hyperparameters and step scalars; the tensors were compared
            # Wall time differs; and the stop of the interrupted run evaluates once more (a report
            # that may improve best/), so the loss and step of best/ may differ, by design.
            for key in ("elapsed", "best_saved_val", "best_step"):
                part["counters"].pop(key)
        assert a == b
        same = True
    finally:
        TALLY.record("resumes", same)


def _reference(tmp: Path, corpus: Path, steps: int, **overrides) -> Path:
    ref = tmp / "reference"
    train(tiny_config(corpus, max_steps=steps, **overrides), ref, **QUIET)
    return ref


@pytest.mark.parametrize("batching", ["stream", "random"])
def test_exact_resume_after_the_step_budget(tmp_path, corpus, batching) -> None:
    """N = 23 steps (not a multiple of the evaluation interval, so the stop falls between two
    evaluations), then --resume to 46: last/ equals that of an uninterrupted 46-step run."""
    settings = dict(SETUP, batching=batching)
    ref = _reference(tmp_path, corpus, 46, **settings)
    run = tmp_path / "run"
    train(tiny_config(corpus, max_steps=23, **settings), run, **QUIET)
    train(resume_config(run, {"max_steps": 46}), run, resume=True, **QUIET)
    assert _meta(ref)["resume"]["plateau"]["scale"] < 1, "the schedule never changed the rate"
    _compare(run, ref)


def _signal_at(step: int, signum: int):
    """A loss hook that sends this process `signum` once, during step `step`."""

    def hook(current: int, loss):
        if current == step:
            os.kill(os.getpid(), signum)
        return loss

    return hook


@pytest.mark.parametrize(
    "signum,batching,schedule",
    [
        (signal.SIGINT, "stream", "cosine"),
        (signal.SIGTERM, "random", "plateau"),
    ],
)
def test_exact_resume_after_a_signal(tmp_path, corpus, signum, batching, schedule) -> None:
    """A signal at step 17 of 40 stops the run with exit code 130/143 after saving; resuming gives
    an uninterrupted run's weights (cosine without a time budget, which would depend on the clock)."""
    settings = dict(SETUP, batching=batching, schedule=schedule, max_time=None, warmup_steps=3)
    ref = _reference(tmp_path, corpus, 40, **settings)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(
            tiny_config(corpus, max_steps=40, **settings),
            run,
            loss_hook=_signal_at(17, signum),
            **QUIET,
        )
    assert stopped.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert _meta(run)["step"] == 18
    train(resume_config(run, {}), run, resume=True, **QUIET)
    _compare(run, ref)


def test_exact_resume_keeps_early_stopping_counters(tmp_path, corpus) -> None:
    """A run that stops early (no improvement in 2 evaluations) stops at the same step with the
    same weights when it was interrupted half-way and resumed."""
    settings = dict(
        batching="stream", lr=0.3, eval_interval=3, early_stopping=2, plateau_patience=50, ema=0.5
    )
    ref = _reference(tmp_path, corpus, 400, **settings)
    stop = _meta(ref)["step"]
    assert 8 < stop < 400, f"the reference run should stop early, stopped at {stop}"
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        train(
            tiny_config(corpus, max_steps=400, **settings),
            run,
            loss_hook=_signal_at(stop // 2 | 1, signal.SIGINT),
            **QUIET,
        )
    train(resume_config(run, {}), run, resume=True, **QUIET)
    assert _meta(run)["step"] == stop
    _compare(run, ref)


def test_time_budget_is_summed_over_resumes(tmp_path, corpus) -> None:
    """--max-time counts training seconds across resumes: a run resumed with its budget spent
    stops at once, and a larger budget continues from the time already spent."""
    run = tmp_path / "run"
    train(tiny_config(corpus, max_steps=None, max_time=0.4, eval_interval=20), run, **QUIET)
    first = _meta(run)["resume"]["counters"]
    assert first["elapsed"] >= 0.4 and first["step"] > 0
    train(resume_config(run, {}), run, resume=True, **QUIET)
    assert _meta(run)["resume"]["counters"]["step"] == first["step"]
    train(resume_config(run, {"max_time": 0.8}), run, resume=True, **QUIET)
    second = _meta(run)["resume"]["counters"]
    assert second["step"] > first["step"] and 0.8 <= second["elapsed"] < 0.8 + 5


# ---------------------------------------------------------------------------------------- real signals


def _metrics_lines(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


STEPS = 200
REAL = dict(eval_interval=20)  # few saves: each one fsyncs, and these runs are real processes


def test_sigterm_from_outside_saves_exits_143_and_resumes_exactly(tmp_path, corpus) -> None:
    """A real `python -m charlstm train`, sent SIGTERM at a random evaluation: it exits 143, says
    how to continue, leaves a loadable last/ at the step it reached, and `--resume` ends equal to an
    uninterrupted run. (SIGINT from outside: the next test.)"""
    settings = dict(REAL, batching="random")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        charlstm_cmd(
            "train", "--text", corpus, "--out", run, *cli_flags(max_steps=STEPS, **settings)
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    wanted = random.randint(1, 5)
    _wait_for(lambda: _metrics_lines(run) >= wanted or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"charlstm train --resume {run}" in err
    assert 20 * wanted <= _meta(run)["step"] < STEPS
    done = subprocess.run(
        charlstm_cmd("train", "--resume", run, "--no-progress"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _compare(run, _reference(tmp_path, corpus, STEPS, **settings))


def test_second_ctrl_c_during_the_final_save_does_not_corrupt_it(tmp_path, corpus) -> None:
    """A real Ctrl-C (SIGINT) at a random evaluation, then a second one while the final checkpoint
    is half-written: the old checkpoint still loads during the save, the save completes, the exit
    status is 130, the log says how to continue, and the run resumes exactly."""
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    env = subprocess_env()
    env.update(CHARLSTM_TEST_PAUSE="stopping", CHARLSTM_TEST_MARKER=str(marker))
    log = tmp_path / "stderr.txt"
    settings = dict(REAL, batching="stream")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            charlstm_cmd(
                "train",
                "--text",
                corpus,
                "--out",
                run,
                *cli_flags(max_steps=STEPS, **settings),
                helper=True,
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    wanted = random.randint(1, 5)
    last = checkpoint_path(run, "last")  # there must be an old checkpoint to keep
    _wait_for(lambda: (_metrics_lines(run) >= wanted and last.is_file()) or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: marker.exists() or proc.poll() is not None)
    assert marker.exists(), log.read_text()
    before = _meta(run)[
        "step"
    ]  # the previous checkpoint is intact while the new one is half-written
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: "already saving" in log.read_text())
    marker.with_name(marker.name + ".go").touch()
    assert proc.wait(60) == 130, log.read_text()
    assert f"charlstm train --resume {run}" in log.read_text()
    after = _meta(run)["step"]
    assert after > before or (after == before and after % 20 == 0)
    done = subprocess.run(
        charlstm_cmd("train", "--resume", run, "--no-progress"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _compare(run, _reference(tmp_path, corpus, STEPS, **settings))
