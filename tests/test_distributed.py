"""Training on 2 processes (gloo on loopback, started by torchrun) against training on 1.

Equivalence tolerance: with dropout off, 1 and 2 processes see the same global batches, the same
initial weights and the same mean gradient, so their losses agree to a relative 1e-4 (observed:
about 1e-7) and their weights to 1e-4. They are not bitwise equal because the gradient is summed in
a different order: one process sums the B rows inside one matrix product; two processes each sum B/2
rows and gloo's all-reduce adds the halves, which rounds differently in float32; Adam's division by
sqrt(v) then carries those last-bit differences into the weights. The validation loss is likewise a
sum over evaluation streams split between the processes.

Each torchrun start costs a few seconds (two Python processes importing torch), so these tests
share their runs where they can.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlstm.config import RunConfig
from charlstm.runs.folder import checkpoint_path
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import (
    PLAIN,
    charlstm_cmd,
    checkpoint,
    read_metrics,
    subprocess_env,
    tiny_flags,
    weights,
)

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("dist_worker.py"))
REL = 1e-4
ENV = subprocess_env(CHARLSTM_DIST_TIMEOUT="60")


def torchrun(nproc: int, overrides: dict, out: Path, *extra: str) -> dict:
    """Train through tests/dist_worker.py on `nproc` processes; its JSON verdict."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        WORKER,
        json.dumps(overrides),
        str(out),
        *extra,
    ]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _config(corpus: Path, **overrides) -> dict:
    """The plain tiny model with two layers and a weight average, as JSON for the worker."""
    return {**PLAIN, "text": str(corpus), "dataset": None, "num_layers": 2, "ema": 0.9, **overrides}


def _assert_follows(run: Path, reference: Path) -> None:
    """The scheduled records and the last final one (a resumed run also keeps the final record its
    first session ended with) agree with the reference's, and so do the weights."""
    got, want = read_metrics(run), read_metrics(reference)
    assert got[-1]["final"] and want[-1]["final"]
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=REL)
    got, want = [m for m in got if not m.get("final")], [m for m in want if not m.get("final")]
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in ("train_loss", "val_loss"):
            assert g[key] == pytest.approx(w[key], rel=REL), (run.name, g["step"], key)
    for which in ("last", "best"):
        a, b = weights(run, which), weights(reference, which)
        for k in b:
            torch.testing.assert_close(
                a[k], b[k], rtol=REL, atol=REL, msg=f"{run.name} {which} {k}"
            )


def test_two_processes_follow_one_process_and_resume_on_either(corpus, tmp_path):
    """1 process for 20 steps is the reference. Two processes for 20 steps (stopped at 10 and
    resumed on 2), a 2-process run continued on 1, and a 1-process run continued on 2 all give its
    losses and weights within the tolerance; the processes' weights, weight averages and Adam
    states are bitwise identical at every save."""
    cfg = _config(corpus)
    half = {**cfg, "max_steps": 10}
    one = train(RunConfig().replace(**cfg), tmp_path / "one", progress=False)

    two = tmp_path / "two"
    assert torchrun(2, half, two)["same_everywhere"]
    shutil.copytree(two, tmp_path / "two_then_one")
    assert torchrun(2, {"max_steps": 20}, two, "--resume")["same_everywhere"]
    two_then_one = tmp_path / "two_then_one"
    train(resume_config(two_then_one, {"max_steps": 20}), two_then_one, resume=True, progress=False)

    one_then_two = tmp_path / "one_then_two"
    train(RunConfig().replace(**half), one_then_two, progress=False)
    assert torchrun(2, {"max_steps": 20}, one_then_two, "--resume")["same_everywhere"]

    for run in (two, two_then_one, one_then_two):
        _assert_follows(run, one)
    hidden = checkpoint(two).group("hidden")
    assert hidden["0"].shape == (2, 4, 16)  # the whole batch's carried state, gathered to rank 0


def test_two_process_resume_is_exact_with_dropout(corpus, tmp_path):
    """Dropout, weight drop and the weight average on: a 2-process run stopped at 8 and resumed
    (through `charlstm train --resume --nproc 2`) ends bitwise where a straight one does, since each
    process's random generator is saved with the run."""
    cfg = _config(
        corpus, dropout=0.2, embedding_dropout=0.1, weight_drop=0.5, max_steps=16, eval_interval=4
    )
    assert torchrun(2, cfg, tmp_path / "straight")["same_everywhere"]
    half = tmp_path / "half"
    assert torchrun(2, {**cfg, "max_steps": 8}, half)["same_everywhere"]
    cmd = charlstm_cmd("train", "--resume", half, "--max-steps", 16, "--nproc", 2, "--no-progress")
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("2 processes (gloo)") == 1  # rank 0 alone logs
    for which in ("last", "best"):
        a, b = weights(tmp_path / "straight", which), weights(half, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which


def _long_job(corpus: Path, out: Path) -> subprocess.Popen:
    cmd = charlstm_cmd(
        *["train", "--nproc", 2, "--text", corpus, "--out", out, "--no-progress"],
        *tiny_flags(max_steps=1_000_000, max_time=600),
    )
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = checkpoint_path(out, "last")
    deadline = time.monotonic() + 180
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.is_file(), proc.communicate(timeout=60)
    time.sleep(1.0)  # a few more saves
    return proc


def _rank_pid(job: subprocess.Popen, rank: int) -> int:
    """The pid of the worker with RANK=`rank` among the job's processes (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
        if ppid == job.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank}")


def _resumes(run: Path) -> None:
    step = checkpoint(run).meta["step"]
    train(resume_config(run, {"max_steps": step + 5}), run, resume=True, progress=False)
    assert checkpoint(run).meta["step"] == step + 5


def test_killed_rank_ends_the_job_with_a_clear_message(corpus, tmp_path):
    """SIGKILL one worker: the other says that a process of the job stopped, the job exits
    non-zero within seconds, and the last checkpoint loads and resumes (on 1 process)."""
    run = tmp_path / "run"
    job = _long_job(corpus, run)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    _, err = job.communicate(timeout=90)
    assert job.returncode == 128 + signal.SIGKILL, err
    assert "another process of this job stopped" in err and "is intact" in err, err
    assert "the process of rank 1 was killed by signal 9" in err, err
    _resumes(run)


def test_ctrl_c_stops_every_process_at_the_same_step(corpus, tmp_path):
    """SIGINT to `charlstm train --nproc 2`: every worker stops after the same step, rank 0 saves
    it, the job exits 130, and the run resumes."""
    run = tmp_path / "run"
    job = _long_job(corpus, run)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=90)
    assert job.returncode == 130, err
    assert err.count("saved at step") == 1, err
    step = int(err.split("saved at step ")[1].split(";")[0])
    assert checkpoint(run).meta["step"] == step
    _resumes(run)
