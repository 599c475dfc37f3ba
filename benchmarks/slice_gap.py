"""The validation slice against the full pass: what a run's records say, and what each slice reads.

Scheduled evaluations read a fixed slice of the validation split; the end of a run reads all of it.
For each run folder this prints:

- from metrics.jsonl: the last scheduled figure (and what it read, ``val_scope``) and the final
  full pass of the same run, a few steps later;
- on best/'s weights: the full pass, the slice of rules v8 (`spread_slice`: short stretches spread
  over the split, each after a warm-up) and the slice before it (`stream_heads`: the first columns
  of each stream), and how much a slice of each shape moves with where its stretches sit: the
  standard deviation of its figure over 200 random shifts of its evenly spaced stretches, read
  off the full pass's per-character losses (so without the warm-up, whose effect the first
  figures include);
- how much a stretch read after W characters of warm-up reads above the full pass's figure for
  the same characters, for W from 0 to 128 (`warmup_bias`);
- with ``--timing``, the seconds each slice takes on these weights, the two in turn, medians of 7
  (a ratio, since a busy machine moves both).

    python benchmarks/slice_gap.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from charlstm.api import load
from charlstm.config import from_dict
from charlstm.data.loading import held_out
from charlstm.model import evaluation
from charlstm.model.evaluation import char_losses, evaluate_ids, streams_for
from charlstm.runs.metrics import read_records


def placement_spread(losses: np.ndarray, stretches: int, length: int, rng) -> float:
    """The standard deviation of the mean of `stretches` stretches of `length` per-character
    losses, one in each of as many equal parts of the text, all at the same random place in
    their parts: how far a fixed, evenly spaced slice of that shape can read from its text."""
    n = len(losses)
    spacing = n / stretches
    means = []
    for _ in range(200):
        first = np.floor(np.arange(stretches) * spacing + rng.uniform(0, spacing - length))
        rows = first.astype(np.int64)[:, None] + np.arange(length)[None, :]
        means.append(np.nanmean(losses[rows]))
    return float(np.std(means))


def warmup_bias(model, ids, starts, precision, losses: np.ndarray, chars: int) -> dict:
    """For each warm-up W: the spread slice read after W characters, less the full pass's figure
    for the same scored characters (the context a fresh state lacks)."""
    kept = evaluation.SLICE_WARMUP
    bias = {}
    try:
        for warmup in (0, 16, 32, 64, 128):
            evaluation.SLICE_WARMUP = warmup
            reading = evaluation.spread_slice(len(ids), chars)
            if reading is None:
                continue
            scored = reading.starts[:, None] + np.arange(warmup, reading.length)[None, :]
            figure = evaluate_ids(model, ids, reading=reading, starts=starts, precision=precision)
            bias[warmup] = figure - float(np.nanmean(losses[scored]))
    finally:
        evaluation.SLICE_WARMUP = kept
    return bias


def slice_seconds(model, ids, starts, precision, readings: dict) -> dict:
    """Median seconds of each reading, the readings in turn, 7 rounds."""
    times: dict[str, list[float]] = {name: [] for name in readings}
    for _ in range(7):
        for name, reading in readings.items():
            start = time.perf_counter()
            evaluate_ids(model, ids, reading=reading, starts=starts, precision=precision)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(run: str, timing: bool = False) -> dict:
    """One run's row: its records' figures, and the slices' figures on its best/ weights."""
    records = read_records(Path(run) / "metrics.jsonl")
    final = records[-1]
    scheduled = [r for r in records if not r.get("final")][-1]
    model = load(run, which="best", device="cpu")
    config = from_dict(model.meta["config"])
    ids, starts, _ = held_out(config, "validation", model.vocab)
    streams = streams_for(len(ids), config.train.eval_streams)
    precision = model.meta["metrics"].get("precision", "fp32")
    chars = config.train.eval_chars

    def figure(reading: evaluation.Stretches | None) -> float | None:
        return evaluate_ids(
            model.model, ids, n_streams=streams, reading=reading, starts=starts, precision=precision
        )

    spread = evaluation.spread_slice(len(ids), chars)
    heads = evaluation.stream_heads(len(ids), streams, chars)
    losses = char_losses(model.model, ids, n_streams=streams, starts=starts, precision=precision)
    rng = np.random.default_rng(0)
    row = {
        "run": run,
        "split": len(ids),
        "last_scheduled": {
            "step": scheduled["step"],
            "val_loss": scheduled["val_loss"],
            "val_scope": scheduled.get("val_scope", "(not recorded)"),
        },
        "final_full_pass": {"step": final["step"], "val_loss": final["val_loss"]},
        "best": {
            "full": figure(None),
            "spread": None if spread is None else figure(spread),
            "heads": None if heads is None else figure(heads),
        },
        "placement_sd": {
            "spread": None
            if spread is None
            else placement_spread(losses, len(spread.starts), evaluation.SLICE_STRETCH, rng),
            "heads": None
            if heads is None
            else placement_spread(losses, len(heads.starts), heads.length, rng),
        },
        "warmup_bias": warmup_bias(model.model, ids, starts, precision, losses, chars),
    }
    if timing and spread is not None and heads is not None:
        readings = {"spread": spread, "heads": heads}
        row["seconds"] = slice_seconds(model.model, ids, starts, precision, readings)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--timing", action="store_true", help="also time the two slices, in turn")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(json.dumps(measure(run, args.timing)))


if __name__ == "__main__":
    main()
