"""Numerical faults and full disks: the run stops, says what happened, and keeps its last good
state.

NaN and infinity are injected through `train`'s `loss_hook` (a NaN loss, a finite loss with an
infinite gradient) and by corrupting a weight after a step; a full disk is simulated by replacing
`checkpoint._write_all` (the single place bytes reach the disk) with one that writes half and then
fails with ENOSPC, and, where the machine allows it, by a real 512 KiB tmpfs that fills up.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from charlstm import atomic
from charlstm.errors import NonFiniteLoss
from charlstm.training import loop, orchestrate
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import (
    TALLY,
    assert_same_tensors,
    checkpoint,
    invoke,
    one_line_error,
    quiet,
    read_metrics,
    tiny_regularised_config,
    tiny_regularised_flags,
)

pytestmark = pytest.mark.reliability

QUIET = {"progress": False, "log": quiet}


def _nan_at(*steps: int):
    """NaN losses, once each, at the given steps (a skipped step is tried again with the same
    step number, and must then succeed)."""
    left = list(steps)

    def hook(step, loss):
        if step in left:
            left.remove(step)
            return loss * float("nan")
        return loss

    return hook


def _inf_grad_at(step_at: int):
    """A finite loss whose gradient is infinite: d/dx sqrt(x) at x = 0."""

    def hook(step, loss):
        if step != step_at:
            return loss
        zero = (loss - loss.detach()).abs()  # value 0, but connected to every weight
        return loss + torch.sqrt(zero)

    return hook


@pytest.mark.parametrize(
    "hook,what", [(_nan_at(12), "NaN loss"), (_inf_grad_at(12), "infinite gradient")]
)
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, corpus, hook, what
) -> None:
    """A NaN loss or an infinite gradient at step 12 (evaluations every 5 steps) raises
    `NonFiniteLoss` naming the step; last/ still holds step 10, loads, has finite weights, and the
    run resumes from it."""
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteLoss, match=r"non-finite at step 12 .*last good checkpoint is kept"
    ):
        train(
            tiny_regularised_config(corpus, max_steps=30, eval_interval=5),
            run,
            loss_hook=hook,
            **QUIET,
        )
    ck = checkpoint(run)
    assert ck.meta["step"] == 10
    assert all(torch.isfinite(t).all() for t in ck.model_state().values())
    checkpoint(run, "best")
    train(resume_config(run, {"max_steps": 15}), run, resume=True, **QUIET)
    assert checkpoint(run).meta["step"] == 15


def test_skip_nonfinite_skips_up_to_n_steps(tmp_path, corpus) -> None:
    """With --skip-nonfinite 2, two NaN steps are skipped (logged, not counted as steps) and the run
    reaches its budget with finite weights; a third NaN stops it."""
    run = tmp_path / "run"
    logged: list[str] = []
    train(
        tiny_regularised_config(corpus, max_steps=30, eval_interval=5, skip_nonfinite=2),
        run,
        loss_hook=_nan_at(7, 13),
        progress=False,
        log=logged.append,
    )
    ck = checkpoint(run)
    assert ck.meta["step"] == 30 and ck.meta["resume"]["counters"]["nonfinite"] == 2
    assert sum("step skipped" in line for line in logged) == 2
    assert all(torch.isfinite(t).all() for t in ck.model_state().values())
    with pytest.raises(NonFiniteLoss, match=r"3 time\(s\), 2 allowed"):
        train(
            tiny_regularised_config(corpus, max_steps=30, eval_interval=5, skip_nonfinite=2),
            tmp_path / "again",
            loss_hook=_nan_at(3, 3, 3),
            **QUIET,
        )


def test_nonfinite_loss_through_the_cli_is_one_line_and_exit_2(
    tmp_path, corpus, monkeypatch
) -> None:
    """`charlstm train` hitting a NaN prints one `charlstm: error:` line and exits with status 2."""
    monkeypatch.setattr(
        orchestrate, "train", functools.partial(orchestrate.train, loss_hook=_nan_at(8))
    )
    result = invoke(
        "train",
        "--text",
        corpus,
        "--out",
        tmp_path / "run",
        "--no-progress",
        *tiny_regularised_flags(max_steps=30, eval_interval=5),
    )
    line = one_line_error(result, alone=False)
    assert line.startswith("charlstm: error: the loss or gradient became non-finite at step 8")
    assert checkpoint(tmp_path / "run").meta["step"] == 5


@pytest.mark.parametrize(
    "corrupt_at,max_steps,message",
    [
        (9, 30, "the validation loss became non-finite at step 10"),  # just before an evaluation
        (11, 12, "the weights became non-finite by step 12"),  # just before the final save
    ],
)
def test_weights_that_overflow_are_never_saved(
    tmp_path, corpus, monkeypatch, corrupt_at, max_steps, message
) -> None:
    """Weights can become infinite with a finite loss and gradient (one huge step). Whether the
    next evaluation or the final save finds them, the run stops with `NonFiniteLoss` and never
    overwrites last/ or best/ with weights that could not be loaded again."""
    step_once = loop.Run.train_step

    def corrupting_step(self, batch):
        loss = step_once(self, batch)
        if self.state.progress.step == corrupt_at:
            with torch.no_grad():
                self.model.fc.weight[0, 0] = math.inf
        return loss

    monkeypatch.setattr(loop.Run, "train_step", corrupting_step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=message):  # no EMA: evaluate the corrupted weights
        train(
            tiny_regularised_config(corpus, max_steps=max_steps, eval_interval=5, ema=0),
            run,
            **QUIET,
        )
    assert checkpoint(run).meta["step"] == 5 if corrupt_at == 9 else 10
    checkpoint(run, "best")


def test_a_learning_rate_that_overflows_adam_is_a_user_error(tmp_path, corpus) -> None:
    """--lr 1e38 makes Adam's first step overflow float32 (a RuntimeError deep in torch): the CLI
    must refuse it in one line with exit status 2 instead."""
    result = invoke(
        "train",
        "--text",
        corpus,
        "--out",
        tmp_path / "run",
        "--no-progress",
        *tiny_regularised_flags(max_steps=5, lr=1e38),
    )
    assert one_line_error(result).startswith("charlstm: error: lr")


# ---------------------------------------------------------------------------------------- disks


def _full_disk_from(call: int):
    """A `_write_all` whose `call`-th and later writes put down half the bytes, then fail as a full
    disk does."""
    calls = {"n": 0}
    original = atomic._write_all

    def write(fh, data):
        calls["n"] += 1
        if calls["n"] < call:
            return original(fh, data)
        fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def _snapshot(run: Path) -> dict[str, bytes]:
    """The bytes of every checkpoint file of `run` (config.toml and metrics.jsonl may change)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.parent.name in ("best", "last")
    }


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tmp_path, corpus, monkeypatch, failing_write
) -> None:
    """The disk fills up during the first, second or third write of a resumed run (config.toml,
    then best/ and last/ at step 15): training stops with one line that says the previous
    checkpoint is intact; last/ is byte-for-byte what it was, no temporary file is left, and once
    space is free the run resumes and ends as if nothing had happened."""
    run = tmp_path / "run"
    settings = {"max_steps": 10, "eval_interval": 5, "batching": "stream"}
    train(tiny_regularised_config(corpus, **settings), run, **QUIET)
    before = _snapshot(run)
    monkeypatch.setattr(atomic, "_write_all", _full_disk_from(failing_write))
    result = invoke("train", "--resume", run, "--max-steps", "20", "--no-progress")
    monkeypatch.undo()
    one_line_error(result, "No space left on device", "intact", "--resume", alone=False)
    after = _snapshot(run)
    # last/ is written after best/: it is always the previous one; best/ is the previous one or,
    # when the disk filled up only after it was replaced, a complete newer one.
    assert after["last/checkpoint.safetensors"] == before["last/checkpoint.safetensors"]
    assert checkpoint(run).meta["step"] == 10
    assert failing_write == 3 or after == before
    checkpoint(run, "best")
    assert not list(run.rglob(".*.tmp"))
    train(resume_config(run, {"max_steps": 20}), run, resume=True, **QUIET)
    steps = [record["step"] for record in read_metrics(run) if not record.get("final")]
    assert steps == [5, 10, 15, 20], "metrics.jsonl lost or repeated a record"
    ref = tmp_path / "reference"
    train(tiny_regularised_config(corpus, **{**settings, "max_steps": 20}), ref, **QUIET)
    same = False
    try:
        assert_same_tensors(checkpoint(run).tensors, checkpoint(ref).tensors)
        same = True
    finally:
        TALLY.record("resumes", same)


_TMPFS_CHECK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from click.testing import CliRunner
    from charlstm.cli import main
    from charlstm.runs import checkpoint as ckpt_io
    from charlstm import atomic
    from charlstm.runs.folder import checkpoint_path

    mnt, text, flags = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    run, report = mnt / "run", {}
    cli = CliRunner()

    def files():
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
                if p.is_file() and p.parent.name in ("best", "last")}

    first = cli.invoke(main, ["train", "--text", text, "--out", str(run), *flags,
                              "--max-steps", "10", "--eval-interval", "5"])
    report["first"] = [first.exit_code, first.stderr[-2000:]]
    before = files()
    with open(mnt / "filler", "wb", buffering=0) as fh:  # fill the tmpfs to its last block
        try:
            while True:
                fh.write(b"\\0" * 4096)
        except OSError:
            pass
    full = cli.invoke(main, ["train", "--resume", str(run), "--max-steps", "20", "--no-progress"])
    report["full"] = [full.exit_code, full.stderr[-2000:]]
    report["untouched"] = files() == before
    report["step_after_full"] = ckpt_io.read_checkpoint(checkpoint_path(run, "last")).meta["step"]
    os.unlink(mnt / "filler")
    freed = cli.invoke(main, ["train", "--resume", str(run), "--max-steps", "20", "--no-progress"])
    report["freed"] = [freed.exit_code, freed.stderr[-2000:]]
    report["final_step"] = ckpt_io.read_checkpoint(checkpoint_path(run, "last")).meta["step"]
    report["metrics"] = (run / "metrics.jsonl").read_text()
    print(json.dumps(report))
""")


def test_a_real_full_tmpfs(tmp_path, corpus) -> None:
    """On a real 512 KiB tmpfs filled to the last block (in a private mount namespace; skipped where
    that needs privileges we lack): resuming fails with exit 2 and one line, the checkpoints are
    untouched, and after freeing space the run resumes to its end."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        pytest.skip("needs unshare(1) on Linux")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size=512k tmpfs "$0" || exit 77; exec "$@"'
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(mnt),
            sys.executable,
            "-c",
            _TMPFS_CHECK,
            str(mnt),
            str(corpus),
            "--no-progress",
            *tiny_regularised_flags(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        check=False,
    )
    if proc.returncode == 77 or (proc.returncode != 0 and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["first"][0] == 0, report["first"][1]
    code, err = report["full"]
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("charlstm: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "No space left" in lines[0], err
    assert report["untouched"] and report["step_after_full"] == 10
    assert report["freed"][0] == 0, report["freed"][1]
    assert report["final_step"] == 20
    records = [json.loads(x) for x in report["metrics"].splitlines()]
    assert [r["step"] for r in records if not r.get("final")] == [5, 10, 15, 20]
