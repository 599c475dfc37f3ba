"""Shared fixtures: a tiny corpus written by the test, tiny configurations, and offline data.

Tests never touch the network: CHARLSTM_DATA points at the read-only shared corpora and the user cache
is redirected into a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from charlstm.config import RunConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

POEM = (
    "Прощай, свободная стихия!\nВ последний раз передо мной\n"
    "Ты катишь волны голубые\nИ блещешь гордою красой.\n\n"
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n\n"
)


@pytest.fixture(autouse=True)
def _offline_data(monkeypatch, tmp_path_factory):
    if "CHARLSTM_DATA" not in os.environ and SHARED_DATA.is_dir():
        monkeypatch.setenv("CHARLSTM_DATA", str(SHARED_DATA))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small corpus (about 4,700 characters) written by the test."""
    path = tmp_path / "poems.txt"
    path.write_text(POEM * 8, encoding="utf-8")
    return path


@pytest.fixture
def tiny():
    """A function building a tiny, fast, deterministic configuration for a corpus file."""
    return tiny_config


def tiny_config(text: Path, **overrides) -> RunConfig:
    base = dict(
        text=str(text),
        dataset=None,
        batch_size=4,
        seq_len=16,
        embedding_size=8,
        hidden_size=16,
        num_layers=1,
        dropout=0.0,
        embedding_dropout=0.0,
        weight_drop=0.0,
        ema=0.0,
        max_steps=20,
        max_time=None,
        eval_interval=5,
        sample_every=0,
        threads=1,
        precision="fp32",
        device="cpu",
        lr=1e-2,
    )
    base.update(overrides)
    return RunConfig().replace(**base)
