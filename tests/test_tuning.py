"""Hyperparameter search: budgets, a SQLite study that survives a killed tuner, the preset."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from charlstm.config import load_toml, parse_duration
from charlstm.errors import UserError
from charlstm.experiments import tuning
from tests.helpers import ROOT, invoke, tiny_flags

# A tiny search space so that trials take a fraction of a second.
TINY_SPACE = {"hidden_size": [8, 16], "lr": (3e-3, 3e-2), "dropout": (0.0, 0.2)}

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from charlstm.experiments import tuning
    from tests.helpers import tiny_config

    text, storage, out, kill = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "kill"
    if kill:
        # Die like `kill -9` in the middle of the second trial, after its first evaluation.
        train_run = tuning.train_run

        def dying(config, run_dir, log, on_eval):
            def report(step, val):
                on_eval(step, val)
                if run_dir.name == "trial-001":
                    os.kill(os.getpid(), signal.SIGKILL)
            train_run(config, run_dir, log, report)

        tuning.train_run = dying
    tuning.tune(tiny_config(text, max_steps=10), study_name="s", trials=2, budget=60,
                storage=storage, out_dir=out, space=tuning_space, pruner="none", plots=False,
                progress=False, grace_period=1)
""")


def _trials(storage):
    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{storage}")
    return [(t.number, t.state.name, t.params, t.value) for t in study.get_trials()]


@pytest.mark.parametrize(
    "text, seconds", [("60s", 60), ("2m", 120), ("1m30s", 90), ("90", 90), (45, 45), ("1.5h", 5400)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "-5", "0", "2 weeks", "1m x"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError):
        parse_duration(text)


@pytest.mark.slow
def test_killed_tuner_resumes_without_losing_trials(corpus, tmp_path):
    """A tuner killed (SIGKILL) in its second trial keeps the first; run again, it retries the
    killed trial's parameters and stops once the study holds the asked number of finished trials."""
    storage, out = tmp_path / "s.db", tmp_path / "runs"
    script = tmp_path / "run_tune.py"
    script.write_text(SCRIPT.replace("tuning_space", repr(TINY_SPACE)))
    # the repository on the path, for `from tests.helpers import tiny_config`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    args = [sys.executable, str(script), str(corpus), str(storage), str(out)]

    killed = subprocess.run(
        args + ["kill"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = _trials(storage)
    assert [(n, s) for n, s, *_ in before] == [(0, "COMPLETE"), (1, "RUNNING")]

    time.sleep(2)  # past the grace period: the killed trial's heartbeat is now stale
    resumed = subprocess.run(
        args + ["go"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    after = _trials(storage)
    assert after[0] == before[0]  # the finished trial is untouched
    assert after[1][1] == "FAIL"  # the killed one is marked failed ...
    assert after[2][1] == "COMPLETE" and after[2][2] == before[1][2]  # ... and run again as it was
    assert sum(s == "COMPLETE" for _, s, *_ in after) == 2


# The tiny model's flags for `charlstm tune`, leaving out the fields TINY_SPACE searches.
TUNE_TINY = {"hidden_size": None, "lr": None, "dropout": None}


@pytest.mark.slow
def test_tune_cli_writes_table_preset_and_plots(corpus, tmp_path, monkeypatch):
    """`charlstm tune` prints the results table and writes a loadable preset, JSON and plots."""
    monkeypatch.setattr(tuning, "SPACE", TINY_SPACE)
    result = invoke(
        *["tune", "--study", "cli", "--trials", 3, "--budget-per-trial", "30s", "--text", corpus],
        *["--storage", tmp_path / "cli.db", "--out", tmp_path / "out"],
        *["--preset", tmp_path / "best.toml", "--no-progress"],
        *tiny_flags(**TUNE_TINY, max_steps=8, eval_interval=4),
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("| complete |") == 3
    preset = load_toml(tmp_path / "best.toml")
    assert preset.model.hidden_size in (8, 16) and preset.train.max_time == 30
    for name in ("results.md", "results.json", "history.png", "parallel.png"):
        assert (tmp_path / "out" / name).is_file(), name


@pytest.mark.slow
def test_flags_fix_searched_fields(corpus, tmp_path, monkeypatch):
    """A flag for a searched field takes it out of the search: every trial uses the given value."""
    monkeypatch.setattr(tuning, "SPACE", TINY_SPACE)
    result = invoke(
        *["tune", "--study", "fix", "--trials", 2, "--budget-per-trial", "30s", "--text", corpus],
        *["--storage", tmp_path / "fix.db", "--out", tmp_path / "out", "--no-progress"],
        "--no-plots",
        *tiny_flags(**{**TUNE_TINY, "hidden_size": 8}, max_steps=4, eval_interval=2),
    )
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "out" / "results.json").read_text())["trials"]
    assert all(
        "hidden_size" not in t["params"] and t["user_attrs"]["config"]["hidden_size"] == 8
        for t in trials
    )
