"""The Python face of charlstm: train a run, load it, generate from it and evaluate it.

>>> import charlstm
>>> config = charlstm.RunConfig().replace(dataset="byron-ru", max_time=120)
>>> run_dir = charlstm.train(config, "runs/byron")
>>> model = charlstm.load(run_dir)
>>> print(model.generate(start_text="Мне ", length=300, temperature=0.5, seed=7)[0])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charlstm.config import RunConfig
from charlstm.generate.textmodel import TextModel, load
from charlstm.training.orchestrate import train as _train

__all__ = ["RunConfig", "TextModel", "load", "train"]


def train(
    config: RunConfig | None = None, out: str | Path = "runs/charlstm", **kwargs: Any
) -> Path:
    """Train a run (see `charlstm.training.orchestrate.train`); `config` defaults to the built-in
    settings."""
    return _train(config or RunConfig(), out, **kwargs)
