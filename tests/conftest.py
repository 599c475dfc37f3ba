"""The fixtures of the whole suite (the functions behind them are in tests/helpers.py).

Tests never touch the network: CHARLSTM_DATA points at the read-only shared corpora and the user
cache is redirected into a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import CORPUS_TEXT, ROOT, folder_files, make_run

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_data(monkeypatch, tmp_path_factory):
    if "CHARLSTM_DATA" not in os.environ and SHARED_DATA.is_dir():
        monkeypatch.setenv("CHARLSTM_DATA", str(SHARED_DATA))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The tiny corpus (`CORPUS_TEXT`) as a file, alone in its folder; tests only read it."""
    path = tmp_path_factory.mktemp("corpus") / "poems.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus) -> Path:
    """A finished run of the plain tiny model (20 steps, 4 evaluations, best/ and last/), shared by
    the whole session: a test that changes a run works on a `copy_run` of it. The folder is
    checked at the end of the session, so a test that changed it makes that teardown fail."""
    run = make_run(tmp_path_factory.mktemp("trained") / "run", corpus)
    before = folder_files(run)
    yield run
    assert folder_files(run) == before, f"a test changed the shared run {run}"


@pytest.fixture(scope="session")
def trained_model(trained_run):
    """`trained_run` loaded on the CPU (a `TextModel`)."""
    import charlstm

    return charlstm.load(trained_run, device="cpu")
