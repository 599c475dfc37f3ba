"""Exact resume and graceful signals: an interrupted run ends bit for bit where an uninterrupted one
does.

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
from charlstm.runs.folder import checkpoint_path
from charlstm.training import loop
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import (
    TALLY,
    assert_same_tensors,
    charlstm_cmd,
    checkpoint,
    quiet,
    subprocess_env,
    tiny_regularised_config,
    tiny_regularised_flags,
)

pytestmark = pytest.mark.reliability

QUIET = {"progress": False, "log": quiet}
# Two layers so that dropout also acts between them, weight drop and a moving average of the weights
# (each with state to carry over), and a high rate with no plateau patience so that the schedule
# halves the rate during the run. The EMA is short so that the evaluated weights follow training.
SETUP = {
    "num_layers": 2,
    "dropout": 0.3,
    "weight_drop": 0.3,
    "ema": 0.5,
    "lr": 0.3,
    "plateau_patience": 0,
    "eval_interval": 3,
}


def _meta(run: Path) -> dict:
    return checkpoint(run, "last").meta


def _compare(run: Path, reference: Path) -> None:
    """Record and assert that `run` ended exactly where `reference` did."""
    same = False
    try:
        assert_same_tensors(checkpoint(run).tensors, checkpoint(reference).tensors)
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
    train(tiny_regularised_config(corpus, max_steps=steps, **overrides), ref, **QUIET)
    return ref


@pytest.mark.parametrize("batching", ["stream", "random"])
def test_exact_resume_after_the_step_budget(tmp_path, corpus, batching) -> None:
    """N = 23 steps (not a multiple of the evaluation interval, so the stop falls between two
    evaluations), then --resume to 46: last/ equals that of an uninterrupted 46-step run."""
    settings = dict(SETUP, batching=batching)
    ref = _reference(tmp_path, corpus, 46, **settings)
    run = tmp_path / "run"
    train(tiny_regularised_config(corpus, max_steps=23, **settings), run, **QUIET)
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
    an uninterrupted run's weights (cosine without a time budget, which depends on the clock)."""
    settings = dict(SETUP, batching=batching, schedule=schedule, max_time=None, warmup_steps=3)
    ref = _reference(tmp_path, corpus, 40, **settings)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(
            tiny_regularised_config(corpus, max_steps=40, **settings),
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
    settings = {
        "batching": "stream",
        "lr": 0.3,
        "eval_interval": 3,
        "early_stopping": 2,
        "plateau_patience": 50,
        "ema": 0.5,
    }
    ref = _reference(tmp_path, corpus, 400, **settings)
    stop = _meta(ref)["step"]
    assert 8 < stop < 400, f"the reference run should stop early, stopped at {stop}"
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        train(
            tiny_regularised_config(corpus, max_steps=400, **settings),
            run,
            loss_hook=_signal_at(stop // 2 | 1, signal.SIGINT),
            **QUIET,
        )
    train(resume_config(run, {}), run, resume=True, **QUIET)
    assert _meta(run)["step"] == stop
    _compare(run, ref)


class _StepClock:
    """The training loop's clock, replaced by one that moves only when a step runs: 1/8 s per
    step (exact in binary), so that a time budget is a number of steps and no check depends on
    how fast this machine is."""

    TICK = 0.125

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(loop, "time", self)

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):  # everything else of the `time` module, unchanged
        return getattr(time, name)

    def hook(self, step: int, loss):
        """A `loss_hook`: the step being taken costs one tick."""
        self.now += self.TICK
        return loss


def test_time_budget_is_summed_over_resumes(tmp_path, corpus, monkeypatch) -> None:
    """--max-time counts training seconds across resumes: a run resumed with its budget spent
    stops at once, and a larger budget continues from the time already spent. With a step taking
    1/8 s of the clock, 0.5 s is 4 steps, and raising the budget to 1 s adds 4 more (not 8, as a
    budget restarted by the resume would)."""
    clock = _StepClock(monkeypatch)
    quiet_with_clock = {**QUIET, "loss_hook": clock.hook}
    run = tmp_path / "run"
    config = tiny_regularised_config(corpus, max_steps=None, max_time=0.5, eval_interval=20)
    train(config, run, **quiet_with_clock)
    first = _meta(run)["resume"]["counters"]
    assert (first["step"], first["elapsed"]) == (4, 0.5)
    train(resume_config(run, {}), run, resume=True, **quiet_with_clock)
    assert _meta(run)["resume"]["counters"]["step"] == 4
    train(resume_config(run, {"max_time": 1.0}), run, resume=True, **quiet_with_clock)
    second = _meta(run)["resume"]["counters"]
    assert (second["step"], second["elapsed"]) == (8, 1.0)


# ------------------------------------------------------------------------------------- real signals


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
REAL = {"eval_interval": 20}  # few saves: each one fsyncs, and these runs are real processes


def test_sigterm_from_outside_saves_exits_143_and_resumes_exactly(tmp_path, corpus) -> None:
    """A real `python -m charlstm train`, sent SIGTERM at a random evaluation: it exits 143, says
    how to continue, leaves a loadable last/ at the step it reached, and `--resume` ends equal to an
    uninterrupted run. (SIGINT from outside: the next test.)"""
    settings = dict(REAL, batching="random")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        charlstm_cmd(
            "train",
            "--text",
            corpus,
            "--out",
            run,
            "--no-progress",
            *tiny_regularised_flags(max_steps=STEPS, **settings),
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
        check=False,
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
                "--no-progress",
                *tiny_regularised_flags(max_steps=STEPS, **settings),
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
        check=False,
    )
    assert done.returncode == 0, done.stderr
    _compare(run, _reference(tmp_path, corpus, STEPS, **settings))
