"""Validation loss: a full pass over a text with the hidden state carried across windows.

This is what `charlstm evaluate` reports and what training's final figures are. Training's
scheduled evaluations (early stopping, the plateau schedule, best/) read a fixed slice instead
(`slice_columns`): the first columns of every stream, the same characters each time, spread
evenly over the text. Loss is in nats per character; bits per character and perplexity are
derived from it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.data.batching import stream_layout
from charlstm.hardware import autocast
from charlstm.model.network import Hidden, hidden_tensors

# A split longer than `eval_streams` × STREAM_CHARS is read in more streams, up to MAX_STREAMS.
STREAM_CHARS = 50_000
MAX_STREAMS = 256


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


def slice_columns(n_ids: int, n_streams: int, n_chars: int) -> int | None:
    """How many leading columns of each stream a slice of about `n_chars` characters reads (None:
    the whole text, when `n_chars` is 0 or covers it).

    A slice made of the start of every stream samples S evenly spaced stretches of the text rather
    than its first n_chars (a long text's start is often a preface or one author), and each
    stretch starts from a fresh state exactly as it does in the full pass, so the slice's figure is
    the full pass's figure for those characters, read the same way every time."""
    S, L = stream_layout(n_ids, n_streams)
    if n_chars <= 0 or n_chars >= S * L:
        return None
    return -(-n_chars // S)  # ceil: at least n_chars, never a zero-width row


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
    starts: np.ndarray, rows: np.ndarray, L: int, start: int, width: int, yb: torch.Tensor
) -> np.ndarray:
    """Mask in `yb` the predictions whose target is a document's first character, and return
    (R, W) bool: where an input is a document's first character (the state is zeroed before it).
    Starts are found by binary search: nothing here grows with the length of the text."""
    pos = rows[:, None] * L + start + np.arange(width)[None, :]  # (R, W) input position
    crosses = _is_start(starts, pos + 1)
    yb[torch.from_numpy(crosses)] = -100
    return _is_start(starts, pos)


def _is_start(starts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    i = np.minimum(np.searchsorted(starts, pos), len(starts) - 1)
    return (starts[i] == pos) & (pos > 0)


def _predictions(
    model,
    ids: np.ndarray,
    n_streams: int,
    window: int,
    device: torch.device | str,
    precision: str,
    rows: np.ndarray | None,
    columns: int | None,
    starts: np.ndarray | None,
):
    """Walk `rows` (all if None) of the stream layout over their first `columns` columns (all if
    None) with the state carried, and yield, for every piece the model is run on, (prediction
    index (R, w), per-target losses (R, w), which of them count (R, w)).

    With `starts` (more than one document), a window is run in pieces cut where some row's
    document starts, that row's state is zeroed there, and the prediction of a document's first
    character from the previous document does not count (its loss is 0). The model is in eval
    mode for the walk and put back as it was after it."""
    device = torch.device(device)
    ids = np.asarray(ids)
    S, L = stream_layout(len(ids), n_streams)
    rows = np.arange(S) if rows is None else np.asarray(rows, dtype=np.int64)
    width_read = L if columns is None else min(L, columns)
    if len(rows) == 0:
        return
    was_training = model.training
    model.eval()
    hidden = None
    try:
        for start in range(0, width_read, window):
            width = min(window, width_read - start)
            xb, yb = _window(ids, rows, L, start, width)
            cuts, breaks = [0, width], None
            if starts is not None and len(starts) > 1:
                breaks = _document_breaks(starts, rows, L, start, width, yb)
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
                pos = rows[:, None] * L + start + np.arange(a, b)[None, :]
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
    rows: np.ndarray | None = None,
    columns: int | None = None,
    starts: np.ndarray | None = None,
) -> tuple[float, int]:
    """(summed cross-entropy, number of predictions) over `rows` of the stream layout (all rows if
    None) and their first `columns` columns (all if None; see `slice_columns`). Rows are
    independent, so processes that each take some rows can add their sums up.

    With `starts` (where documents start in `ids`), no context crosses a boundary (see
    `_predictions`): each document of n characters counts n-1 predictions. The layout is the
    same, so slices and rows mean what they mean for one text."""
    total, count = 0.0, 0
    walk = _predictions(model, ids, n_streams, window, device, precision, rows, columns, starts)
    for _, losses, counted in walk:
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
    walk = _predictions(model, ids, n_streams, window, device, precision, None, None, starts)
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
    columns: int | None = None,
    starts: np.ndarray | None = None,
) -> float:
    """Mean cross-entropy (nats/char) of predicting ids[1:] from ids[:-1] with carried state (of
    the slice `columns` says, or of the whole text), never across the document starts `starts`."""
    total, count = loss_sums(
        model,
        ids,
        n_streams=n_streams,
        window=window,
        device=device,
        precision=precision,
        columns=columns,
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
