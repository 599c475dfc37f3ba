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

from charlstm.batching import eval_streams
from charlstm.hardware import autocast


def loss_metrics(loss: float) -> dict[str, float]:
    return {
        "loss": loss,
        "bits_per_char": loss / math.log(2),
        "perplexity": math.exp(min(loss, 700.0)),
    }


@torch.inference_mode()
def evaluate_ids(model, ids: np.ndarray, *, n_streams: int = 8, window: int = 512,
                 device: torch.device | str = "cpu", precision: str = "fp32") -> float:
    """Mean cross-entropy (nats/char) of predicting ids[1:] from ids[:-1] with carried state."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x, y = eval_streams(np.asarray(ids), n_streams)
    x, y = x.to(device), y.to(device)
    total, count, hidden = 0.0, 0, None
    try:
        for start in range(0, x.shape[1], window):
            xb, yb = x[:, start:start + window], y[:, start:start + window]
            with autocast(device, precision):
                logits, hidden = model(xb, hidden)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((yb != -100).sum())
    finally:
        model.train(was_training)
    return total / count
