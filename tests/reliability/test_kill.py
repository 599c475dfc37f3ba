"""Atomic checkpoints: SIGKILL a real training process again and again, and lose nothing.

Two runs (stream and random batching) are trained by real ``python -m charlstm train`` processes
that evaluate and save after every step, so a kill at a random moment often lands inside a save.
Each process is killed (SIGKILL: no handler, no cleanup) at one of three kinds of moment:

* any time at all, counted from the process start (often during start-up or the restore);
* a random moment after training began (saves happen every few milliseconds);
* exactly half-way through a write (the pausing-writer helper signals when it is there).

After every kill the ``last/`` and ``best/`` checkpoints must load and ``last/`` must not have gone
back a single step; the next process resumes from it (a kill counts as survived once a later process
has restored from what it left). At the end the run is resumed to completion: its metrics log must
hold every step exactly once, and its weights must equal, bit for bit, those of a run never killed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from charlstm.config import load_toml
from charlstm.runs.folder import checkpoint_path
from charlstm.training.orchestrate import train
from tests.helpers import (
    TALLY,
    assert_same_tensors,
    charlstm_cmd,
    checkpoint,
    quiet,
    read_metrics,
    subprocess_env,
    tiny_regularised_config,
    tiny_regularised_flags,
)

pytestmark = pytest.mark.reliability

KILLS_PER_RUN = 11
STARTED = "parameters;"  # in the log line printed once the run has been built (and restored)
BIG = 1_000_000


def _temp_files(run: Path) -> list[Path]:
    return [p for d in (run, run / "best", run / "last") if d.is_dir() for p in d.glob(".*.tmp")]


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _kill_chain(tmp: Path, corpus: Path, batching: str, seed: int) -> tuple[Path, int]:
    """Kill KILLS_PER_RUN processes training one run; returns the run folder and its final step."""
    rng = random.Random(seed)
    run = tmp / f"run-{batching}"
    flags = [
        "--no-progress",
        *tiny_regularised_flags(batching=batching, eval_interval=1, max_steps=BIG),
    ]
    last_step = 0
    pending: list[int] = []  # kills whose checkpoint no later process has resumed from yet
    for i in range(KILLS_PER_RUN):
        log = tmp / f"{batching}-{i}.log"
        marker = tmp / f"{batching}-{i}.marker"
        env = subprocess_env()
        kind = "first" if i == 0 else ("anytime", "training", "mid-write", "training")[i % 4]
        if kind == "mid-write":
            # Writes: config.toml, then best/ and last/ at every step; pick one of the first few.
            env.update(
                CHARLSTM_TEST_PAUSE=f"write:{rng.randint(1, 6)}", CHARLSTM_TEST_MARKER=str(marker)
            )
        args = (
            ["train", "--text", corpus, "--out", run, *flags]
            if i == 0
            else ["train", "--resume", run, "--no-progress"]
        )
        temps_before = set(_temp_files(run))
        with open(log, "w") as err:
            proc = subprocess.Popen(
                charlstm_cmd(*args, helper=kind == "mid-write"),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        started = lambda log=log: STARTED in log.read_text(errors="replace")
        if kind == "first":  # the very first process must have saved something to resume from
            _wait_for(lambda: checkpoint_path(run, "last").is_file(), 60)
            time.sleep(rng.uniform(0, 0.3))
        elif kind == "anytime":
            time.sleep(rng.uniform(0, 2.0))
        elif kind == "training":
            _wait_for(started, 60)
            time.sleep(rng.uniform(0, 0.4))
        else:
            _wait_for(marker.exists, 60)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(30)
        text = log.read_text(errors="replace")
        assert rc == -signal.SIGKILL, (
            f"the process ended by itself (rc {rc}) before the kill:\n{text}"
        )
        if STARTED in text:  # this process restored from the previous kills' checkpoints
            for _ in pending:
                TALLY.record("kills", True)
            pending = []

        # -- what the kill left behind must load, and nothing saved may be lost ----------------
        ck = checkpoint(run, "last")
        if checkpoint_path(run, "best").is_file():
            checkpoint(run, "best")
        load_toml(run / "config.toml")
        lost = max(0, last_step - ck.meta["step"])
        TALLY.note("steps_lost", lost)
        assert lost == 0, f"last/ went back from step {last_step} to {ck.meta['step']}"
        last_step = ck.meta["step"]
        if (
            set(_temp_files(run)) - temps_before
        ):  # a write was cut short: its temporary file is left
            TALLY.note("kills_mid_write")
        if kind == "mid-write":
            assert marker.exists(), text
        pending.append(i)

    # -- resume to the end: the last kill is survived once this run restores from it ------------
    final = last_step + 5
    done = subprocess.run(
        charlstm_cmd("train", "--resume", run, "--max-steps", final, "--no-progress"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    for _ in pending:
        TALLY.record("kills", done.returncode == 0)
    assert done.returncode == 0, done.stderr
    assert not _temp_files(run), "temporary files of killed saves were left in the run folder"
    steps = [record["step"] for record in read_metrics(run) if not record.get("final")]
    assert steps == list(range(1, final + 1)), "metrics.jsonl lost or repeated steps"
    return run, final


def test_sigkill_at_random_moments_loses_nothing(tmp_path, corpus) -> None:
    """22 SIGKILLs, some during start-up, some mid-training, some half-way through a write: every
    one leaves loadable checkpoints that never go back a step, every run resumes, and the resumed
    runs end bitwise equal to runs that were never killed."""
    seed = int(os.environ.get("CHARLSTM_KILL_SEED", "20240601"))
    with ThreadPoolExecutor(2) as pool:  # the two runs share the two cores
        futures = [
            pool.submit(_kill_chain, tmp_path, corpus, b, seed + j)
            for j, b in enumerate(("stream", "random"))
        ]
        results = [(f.result(), b) for f, b in zip(futures, ("stream", "random"), strict=True)]
    for (run, final), batching in results:
        ref = tmp_path / f"reference-{batching}"
        train(
            tiny_regularised_config(corpus, batching=batching, eval_interval=1, max_steps=final),
            ref,
            progress=False,
            log=quiet,
        )
        same = True
        try:
            assert_same_tensors(checkpoint(run).tensors, checkpoint(ref).tensors)
        except AssertionError:
            same = False
            raise
        finally:
            TALLY.record("resumes", same)
