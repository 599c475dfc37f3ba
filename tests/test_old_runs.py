"""Run folders written before the redesign into sub-packages still load, evaluate and resume.

The fixture in tests/data/run-before-redesign was written by commit 63e7b81 (see its README). The
checkpoint format did not change, so everything a user did with such a folder must still work.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

import charlstm
from charlstm.data.loading import prepare_data
from charlstm.model.evaluation import evaluate_ids
from charlstm.runs.folder import RunFolder
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import quiet

OLD = Path(__file__).parent / "data" / "run-before-redesign"


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    """A copy of the old run; the working folder is its parent, as the run's relative text path
    ("poems.txt") expects."""
    shutil.copytree(OLD, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    return Path("run")


def test_an_old_best_checkpoint_loads_and_evaluates_to_its_recorded_loss(old_run) -> None:
    """The best weights, evaluated on the run's own validation split by today's code, give the loss
    the old code recorded in the checkpoint: loading and evaluation did not change."""
    model = charlstm.load(old_run, device="cpu")
    config = resume_config(old_run, {})
    data = prepare_data(config, model.vocab)
    metrics = model.meta["metrics"]
    measured = evaluate_ids(
        model.model,
        data.val_ids,
        n_streams=config.train.eval_streams,
        device=model.device,
        precision=metrics["precision"],
    )
    assert math.isclose(measured, metrics["val_loss"], rel_tol=1e-6), (measured, metrics)
    assert len(model.generate("Ты ", length=40, seed=1)[0]) == len("Ты ") + 40


def test_an_old_run_resumes_where_it_stopped(old_run) -> None:
    """Resuming continues from the old last/ (step 20), keeps its metrics and writes new ones."""
    folder = RunFolder(old_run)
    before = folder.read_metrics()
    assert [r["step"] for r in before if "train_loss" in r] == [10, 20]
    train(
        resume_config(old_run, {"max_steps": 30}),
        old_run,
        resume=True,
        progress=False,
        log=quiet,
    )
    assert folder.read_checkpoint("last").meta["step"] == 30
    after = folder.read_metrics()
    assert after[: len(before)] == before
    assert [r["step"] for r in after if "train_loss" in r] == [10, 20, 30]
