"""Validation loss: a full pass over a text with the hidden state carried across windows.

This is what `charlstm evaluate` reports and what training uses for early stopping and for the
plateau schedule, so both read the same number. Loss is in nats per character; bits per character
and perplexity are derived from it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.data.batching import stream_layout
from charlstm.hardware import autocast


def loss_metrics(loss: float) -> dict[str, float]:
    return {
        "loss": loss,
        "bits_per_char": loss / math.log(2),
        "perplexity": math.exp(min(loss, 700.0)),
    }


def _window(
    ids: np.ndarray, rows: np.ndarray, L: int, start: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns [start, start+width) of `data.batching.eval_streams`'s (x, y) for `rows`.

    Read from `ids` on demand: a memory-mapped validation split is never copied whole (8 bytes a
    character)."""
    n_pred = len(ids) - 1
    pos = rows[:, None] * L + start + np.arange(width)[None, :]  # (R, W) prediction index
    valid = pos < n_pred
    safe = np.where(valid, pos, 0)
    x = np.where(valid, ids[safe].astype(np.int64), 0)
    y = np.where(valid, ids[safe + 1].astype(np.int64), -100)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.inference_mode()
def loss_sums(
    model,
    ids: np.ndarray,
    *,
    n_streams: int = 8,
    window: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    rows: np.ndarray | None = None,
) -> tuple[float, int]:
    """(summed cross-entropy, number of predictions) over `rows` of the stream layout (all rows if
    None). Rows are independent, so processes that each take some rows can add their sums up."""
    device = torch.device(device)
    ids = np.asarray(ids)
    S, L = stream_layout(len(ids), n_streams)
    rows = np.arange(S) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return 0.0, 0
    was_training = model.training
    model.eval()
    total, count, hidden = 0.0, 0, None
    try:
        for start in range(0, L, window):
            xb, yb = _window(ids, rows, L, start, min(window, L - start))
            xb, yb = xb.to(device), yb.to(device)
            with autocast(device, precision):
                logits, hidden = model(xb, hidden)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                yb.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((yb != -100).sum())
    finally:
        model.train(was_training)
    return total, count


def evaluate_ids(
    model,
    ids: np.ndarray,
    *,
    n_streams: int = 8,
    window: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> float:
    """Mean cross-entropy (nats/char) of predicting ids[1:] from ids[:-1] with carried state."""
    total, count = loss_sums(
        model, ids, n_streams=n_streams, window=window, device=device, precision=precision
    )
    return total / count
