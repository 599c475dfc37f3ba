"""Validation loss: a full pass over a text with the hidden state carried across windows.

This is what `charlstm evaluate` reports and what training's final figures are. Training's
scheduled evaluations (early stopping, the plateau schedule, best/) read a fixed slice instead
(`spread_slice`): many short stretches spread evenly over the text, each read after a warm-up
that builds up its state and is not scored, the same characters every time. Every pass is a set
of `Stretches` read side by side. Loss is in nats per character; bits per character and
perplexity are derived from it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.data.batching import stream_layout
from charlstm.hardware import autocast
from charlstm.model.network import Hidden, hidden_tensors

# A split longer than `eval_streams` × STREAM_CHARS is read in more streams, up to MAX_STREAMS.
STREAM_CHARS = 50_000
MAX_STREAMS = 256
# The scheduled slice: stretches of SLICE_STRETCH scored characters, each after SLICE_WARMUP
# characters that only build up the state. The slice used to be the first 2,048 characters of
# each of 8 streams, 8 long stretches: a small sample of a text whose difficulty changes from
# scene to scene or file to file. Shifted along the split, such a slice's figure moved by 0.050
# nats/char (standard deviation) on a tinyshakespeare model and 0.061 on one of Python's standard
# library, and where it sat it read 0.060 and 0.035 below the full pass; 128 stretches of 128
# moved by 0.012 and 0.023 (benchmarks/slice_gap.py). A stretch read from a fresh state reads
# 0.02-0.05 above the full pass's figure for the same characters; after 32 characters of warm-up,
# within 0.003, and after 64 within 0.0003 (models of 1×256 and 1×768).
SLICE_STRETCH = 128
SLICE_WARMUP = 64


def streams_for(n_ids: int, configured: int) -> int:
    """The streams a split of `n_ids` characters is read in: `configured` (`--eval-streams`), or
    more for a split longer than `configured` × 50 k characters: a power of two up to 256, each
    stream still 50 k characters of context. A full pass walks its streams one column at a time,
    so the Linux C files' 13 M validation characters are 1.6 M sequential steps in 8 streams (the
    lab's run: 948 s of wall time for a 216 s budget) and a thirty-second of that in 256. On
    a split of up to 400 k characters (at the default 8) nothing changes. Every reader of a split
    (training's evaluations, the test figure, `charlstm evaluate`, the report) goes through this,
    so they all read it the same way."""
    if n_ids <= STREAM_CHARS * configured:
        return configured
    wanted = min(MAX_STREAMS, n_ids // STREAM_CHARS)
    return max(configured, 2 ** int(math.log2(wanted)))


def loss_metrics(loss: float) -> dict[str, float]:
    return {
        "loss": loss,
        "bits_per_char": loss / math.log(2),
        "perplexity": math.exp(min(loss, 700.0)),
    }


@dataclass(frozen=True, eq=False)
class Stretches:
    """What a pass over a text reads: R stretches side by side, one row of a batch each. Row k
    reads the predictions starts[k] … starts[k] + length - 1 (those past the text's end are
    padding) with the state carried along it from zero; its first `warmup` predictions only build
    up the state and are not scored."""

    starts: np.ndarray  # (R,) the first prediction index of each row
    length: int
    warmup: int = 0

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Stretches)
            and (self.length, self.warmup) == (other.length, other.warmup)
            and np.array_equal(self.starts, other.starts)
        )

    __hash__ = None  # type: ignore[assignment]  # equal by value, and not hashable (an array)

    def rows(self, which: np.ndarray | slice) -> Stretches:
        """Some of the rows (a distributed run's share): rows are independent, so the sums of
        disjoint shares add up to the whole."""
        return Stretches(self.starts[which], self.length, self.warmup)


def full_pass(n_ids: int, n_streams: int) -> Stretches:
    """Every prediction of a text once: `stream_layout`'s S contiguous streams of L."""
    S, L = stream_layout(n_ids, n_streams)
    return Stretches(np.arange(S, dtype=np.int64) * L, L)


def stream_heads(n_ids: int, n_streams: int, n_chars: int) -> Stretches | None:
    """The slice of run folders written before `spread_slice`: the first ceil(n_chars / S)
    columns of each of the S streams of the full pass, each from a fresh state as the full pass
    reads them; None (the whole text) when `n_chars` is 0 or covers it. A run that began with it
    keeps it when resumed, so that its scheduled figures stay comparable."""
    S, L = stream_layout(n_ids, n_streams)
    if n_chars <= 0 or n_chars >= S * L:
        return None
    return Stretches(np.arange(S, dtype=np.int64) * L, -(-n_chars // S))


def spread_slice(n_ids: int, n_chars: int) -> Stretches | None:
    """The slice a scheduled evaluation reads: ceil(n_chars / SLICE_STRETCH) stretches of
    SLICE_STRETCH scored characters (at least `n_chars` in all), one in the middle of each of as
    many equal parts of the text, each after SLICE_WARMUP characters of warm-up; None (the whole
    text) when `n_chars` is 0 or the slice would read as many characters as the text holds."""
    n_pred = n_ids - 1
    if n_pred < 1:
        stream_layout(n_ids, 1)  # the one message for a text too short to evaluate
    K = -(-n_chars // SLICE_STRETCH)
    length = SLICE_WARMUP + SLICE_STRETCH
    if n_chars <= 0 or K * length >= n_pred:
        return None
    spacing = n_pred / K
    starts = np.floor(np.arange(K) * spacing + (spacing - length) / 2).astype(np.int64)
    return Stretches(starts, length, SLICE_WARMUP)


def _window(
    ids: np.ndarray, reading: Stretches, start: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns [start, start+width) of `reading`'s rows as (x, y); the targets of padding and of
    the warm-up are -100 (not scored).

    Read from `ids` on demand: a memory-mapped validation split is never copied whole (8 bytes a
    character)."""
    n_pred = len(ids) - 1
    cols = start + np.arange(width)[None, :]  # (1, W)
    pos = reading.starts[:, None] + cols  # (R, W) prediction index
    valid = pos < n_pred
    safe = np.where(valid, pos, 0)
    x = np.where(valid, ids[safe].astype(np.int64), 0)
    y = np.where(valid & (cols >= reading.warmup), ids[safe + 1].astype(np.int64), -100)
    return torch.from_numpy(x), torch.from_numpy(y)


def reset_rows(hidden: Hidden | None, rows: torch.Tensor) -> Hidden | None:
    """`hidden` (layers, B, H) with the state of the rows where `rows` (B,) is True set to zero:
    those streams start a new document, which must not see the previous one's context."""
    if hidden is None:
        return None
    keep = (~rows).to(device=hidden_tensors(hidden)[0].device)[None, :, None]  # (1, B, 1)
    if isinstance(hidden, tuple):
        return tuple(h * keep for h in hidden)
    return hidden * keep


def _document_breaks(
    starts: np.ndarray, reading: Stretches, start: int, width: int, yb: torch.Tensor
) -> np.ndarray:
    """Mask in `yb` the predictions whose target is a document's first character, and return
    (R, W) bool: where an input is a document's first character (the state is zeroed before it).
    Starts are found by binary search: nothing here grows with the length of the text."""
    pos = reading.starts[:, None] + start + np.arange(width)[None, :]  # (R, W) input position
    crosses = _is_start(starts, pos + 1)
    yb[torch.from_numpy(crosses)] = -100
    return _is_start(starts, pos)


def _is_start(starts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    i = np.minimum(np.searchsorted(starts, pos), len(starts) - 1)
    return (starts[i] == pos) & (pos > 0)


def _predictions(
    model,
    ids: np.ndarray,
    reading: Stretches,
    window: int,
    device: torch.device | str,
    precision: str,
    starts: np.ndarray | None,
):
    """Walk the rows of `reading` side by side with the state carried, and yield, for every piece
    the model is run on, (prediction index (R, w), per-target losses (R, w), which of them count
    (R, w)).

    With `starts` (more than one document), a window is run in pieces cut where some row's
    document starts, that row's state is zeroed there, and the prediction of a document's first
    character from the previous document does not count (its loss is 0). The model is in eval
    mode for the walk and put back as it was after it."""
    device = torch.device(device)
    ids = np.asarray(ids)
    if len(reading.starts) == 0:
        return
    was_training = model.training
    model.eval()
    hidden = None
    try:
        for start in range(0, reading.length, window):
            width = min(window, reading.length - start)
            xb, yb = _window(ids, reading, start, width)
            cuts, breaks = [0, width], None
            if starts is not None and len(starts) > 1:
                breaks = _document_breaks(starts, reading, start, width, yb)
                cuts = sorted({0, width, *np.flatnonzero(breaks.any(axis=0)).tolist()})
            xb, yb = xb.to(device), yb.to(device)
            for a, b in itertools.pairwise(cuts):
                if breaks is not None and breaks[:, a].any():
                    hidden = reset_rows(hidden, torch.from_numpy(breaks[:, a]))
                with autocast(device, precision):
                    logits, hidden = model(xb[:, a:b], hidden)
                target = yb[:, a:b]
                losses = F.cross_entropy(
                    logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none"
                )
                pos = reading.starts[:, None] + start + np.arange(a, b)[None, :]
                yield pos, losses, target != -100
    finally:
        model.train(was_training)


@torch.inference_mode()
def loss_sums(
    model,
    ids: np.ndarray,
    *,
    n_streams: int = 8,
    window: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    reading: Stretches | None = None,
    starts: np.ndarray | None = None,
) -> tuple[float, int]:
    """(summed cross-entropy, number of scored predictions) of `reading` (None: the full pass in
    `n_streams` streams). Rows are independent, so processes that each read some of them
    (`Stretches.rows`) can add their sums up.

    With `starts` (where documents start in `ids`), no context crosses a boundary (see
    `_predictions`): each document of n characters counts n-1 predictions. Rows are laid on the
    text as for one document, so slices and rows mean what they mean for one text."""
    reading = full_pass(len(ids), n_streams) if reading is None else reading
    total, count = 0.0, 0
    for _, losses, counted in _predictions(model, ids, reading, window, device, precision, starts):
        total += float(losses.sum())
        count += int(counted.sum())
    return total, count


@torch.inference_mode()
def char_losses(
    model,
    ids: np.ndarray,
    *,
    n_streams: int = 8,
    window: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    starts: np.ndarray | None = None,
) -> np.ndarray:
    """The loss of every prediction of the full pass, read exactly as `loss_sums` reads it:
    element p is the loss of predicting ids[p + 1] from what comes before it in its document,
    NaN where ids[p + 1] starts a document (nothing is predicted there across the boundary).
    Their mean over the rest is `evaluate_ids`'s figure; the analyses that ask where in a line,
    or after how much context, a model errs read these."""
    out = np.full(len(ids) - 1, np.nan)
    reading = full_pass(len(ids), n_streams)
    walk = _predictions(model, ids, reading, window, device, precision, starts)
    for pos, losses, counted in walk:
        keep = counted.cpu().numpy()
        out[pos[keep]] = losses.cpu().numpy()[keep]
    return out


def evaluate_ids(
    model,
    ids: np.ndarray,
    *,
    n_streams: int = 8,
    window: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    reading: Stretches | None = None,
    starts: np.ndarray | None = None,
) -> float:
    """Mean cross-entropy (nats/char) of predicting ids[1:] from ids[:-1] with carried state (of
    the scored part of `reading`, or of the whole text), never across the document starts
    `starts`."""
    total, count = loss_sums(
        model,
        ids,
        n_streams=n_streams,
        window=window,
        device=device,
        precision=precision,
        reading=reading,
        starts=starts,
    )
    return total / count


def split_metrics(
    model, config, which: str, vocab, *, device: torch.device | str = "cpu", unknown: str = "error"
) -> dict[str, float]:
    """Loss, bits/char, perplexity and length of a run's "validation" or "test" split (cut where
    training cut it, documents kept apart): what `charlstm evaluate RUN` reports, read as the
    final figures of training read it (a full pass in `streams_for` streams)."""
    from charlstm.data.loading import held_out

    ids, starts, source = held_out(config, which, vocab, unknown)
    streams = streams_for(len(ids), config.train.eval_streams)
    loss = evaluate_ids(model, ids, n_streams=streams, device=device, starts=starts)
    return {"source": source, **loss_metrics(loss), "characters": len(ids)}
