"""Cutting the training text into (input, target) batches.

Two strategies, both yielding input and target shifted by one character:

``stream`` (default, as char-rnn and torch-rnn): the text is cut into B contiguous streams, one per
batch row, and each step takes the next window of T characters from every stream, so the hidden
state carried over from the previous window is the true context of the next one::

    text:   a b c d e f g h i j k l m n o p q r s t u v w x      B = 3 streams, T = 3
    row 0:  a b c | d e f | g h        ← window 0 | window 1 ...
    row 1:        i j k | l m n | o p
    row 2:              q r s | t u v | w x

Each epoch starts the streams at a fresh random offset (smaller than T) so that window boundaries
differ from epoch to epoch; on a tiny corpus this is a cheap source of variety.

``random``: the lab's random windows, each row an independent window at a random position; the
hidden state starts from zero every step.

**Many documents** (a corpus of many files, `corpus.Corpus.starts`): no window runs from one file
into the next, since the next file's first characters do not continue the last one's. Stream
batching then cuts every document into windows of T predictions from its start, the last one short
and padded (its missing targets are -100, which the loss ignores), and hands the windows out as
above: B rows, each a contiguous run of windows, one window per row per step::

    documents:  a b c d e f g | h i j | k l m n o p q r     T = 3, B = 2 (a document of n
    windows:    abc def | hi· | klm nop q··                  characters makes n-1 predictions;
    row 0:      abc | def | hi·    ← hi· starts a document    the windows show their inputs)
    row 1:      klm | nop | q··

Each row zeroes its own hidden state where its window starts a document (`Batch.reset_rows`); a
padded window is always its document's last, so the padding's state is never carried. The order of
the documents is shuffled every epoch (the variety the random offset gives a single text: window
boundaries always fall at a document's start and every T characters after it). A document of one
character has no prediction and is left out; a document shorter than a window costs one padded
window, so a folder of thousands of tiny files trains more slowly than the same text in one file.
Random batching draws each window inside one document (uniformly over the positions where a whole
window fits), so a document shorter than T+1 characters is never drawn.

With one document, both batchers give exactly the batches they always gave.

Batchers are deterministic given their seed, and expose `state_dict()` so that a resumed run
continues with exactly the windows an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from charlstm.errors import UserError

IGNORE = -100  # the target of a padded position: `F.cross_entropy`'s ignore_index


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64
    y: torch.Tensor  # (B, T) int64, x shifted left by one (IGNORE where padded)
    reset: bool  # True when carried hidden state must not be used (new epoch or random windows)
    # (B,) bool: rows whose window starts a new document, whose carried state must be zeroed;
    # None when no row starts one (a single text never has any).
    reset_rows: torch.Tensor | None = None

    @property
    def targets(self) -> int:
        """The characters this batch trains on: its targets less the padded ones (a document's
        last window is padded), which is what "characters seen" and chars/s count."""
        return int((self.y != IGNORE).sum())


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


class StreamBatcher:
    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.ids = np.asarray(ids)
        self.B, self.T = batch_size, seq_len
        need = batch_size * seq_len + seq_len + 1
        if len(self.ids) < need:
            raise UserError(
                f"the training text has {len(self.ids):,} characters but stream batching with "
                f"--batch-size {batch_size} and --seq-len {seq_len} needs at least {need:,}; "
                "use a longer text or shrink --batch-size / --seq-len"
            )
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.window = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        # A random offset in [0, T) shifts every window boundary; the stream length is then fixed
        # for the epoch so that every row has the same number of whole windows.
        self.offset = int(self.rng.integers(0, self.T))
        usable = len(self.ids) - 1 - self.offset
        self.stream_len = (usable // self.B) // self.T * self.T
        self.windows_per_epoch = self.stream_len // self.T

    def next(self) -> Batch:
        if self.window >= self.windows_per_epoch:
            self.epoch += 1
            self.window = 0
            self._start_epoch()
        reset = self.window == 0
        starts = self.offset + np.arange(self.B) * self.stream_len + self.window * self.T
        rows = starts[:, None] + np.arange(self.T + 1)[None, :]  # (B, T+1)
        chunk = torch.from_numpy(self.ids[rows].astype(np.int64))
        self.window += 1
        return Batch(chunk[:, :-1], chunk[:, 1:], reset)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "epoch": self.epoch,
            "window": self.window,
            "offset": self.offset,
            "rng": _rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.epoch = int(state["epoch"])
        self.window = int(state["window"])
        # Recompute the epoch's geometry from the stored offset (the RNG has already moved past it).
        self.offset = int(state["offset"])
        usable = len(self.ids) - 1 - self.offset
        self.stream_len = (usable // self.B) // self.T * self.T
        self.windows_per_epoch = self.stream_len // self.T
        if not (0 <= self.offset < self.T and 0 <= self.window <= self.windows_per_epoch):
            raise ValueError("the batcher's position is outside the text")


class DocumentStreamBatcher:
    """Stream batching over many documents: windows aligned to each document's start, B rows of
    consecutive windows, a per-row reset where a document starts (see the module docstring)."""

    def __init__(
        self, ids: np.ndarray, starts: np.ndarray, batch_size: int, seq_len: int, seed: int = 0
    ) -> None:
        self.ids = np.asarray(ids)
        self.B, self.T = batch_size, seq_len
        self.starts = np.asarray(starts, dtype=np.int64)
        lengths = np.diff(np.append(self.starts, len(self.ids)))
        self.preds = np.maximum(lengths - 1, 0)  # predictions per document
        self.n_windows = -(-self.preds // seq_len)  # windows per document (ceil)
        total = int(self.n_windows.sum())
        if total < batch_size:
            raise UserError(
                f"the training text's {len(self.starts):,} documents make {total:,} windows of "
                f"--seq-len {seq_len} but stream batching needs one per row of --batch-size "
                f"{batch_size}; use more text or shrink --batch-size / --seq-len"
            )
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.window = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        # The RNG's state before the shuffle is kept: a resumed batcher draws the same order again.
        self.epoch_rng = _rng_state(self.rng)
        self.order = self.rng.permutation(len(self.starts))
        self.ends = np.cumsum(self.n_windows[self.order])  # window index where each one ends
        self.windows_per_epoch = int(self.ends[-1]) // self.B

    def next(self) -> Batch:
        if self.window >= self.windows_per_epoch:
            self.epoch += 1
            self.window = 0
            self._start_epoch()
        T = self.T
        k = np.arange(self.B) * self.windows_per_epoch + self.window  # (B,) window of each row
        j = np.searchsorted(self.ends, k, side="right")  # its place in the epoch's order
        doc = self.order[j]
        within = k - (self.ends[j] - self.n_windows[doc])  # its index inside its document
        first = self.starts[doc] + within * T  # (B,) position of its first input
        n = np.minimum(T, self.preds[doc] - within * T)  # (B,) its predictions (T but the last)
        t = np.arange(T + 1)[None, :]
        valid = t <= n[:, None]  # (B, T+1): inputs t < n, targets t <= n
        chunk = np.where(valid, self.ids[np.where(valid, first[:, None] + t, 0)], 0)
        chunk = torch.from_numpy(chunk.astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        y[torch.from_numpy(~valid[:, 1:])] = IGNORE
        reset = self.window == 0
        starts_doc = torch.from_numpy(within == 0)
        self.window += 1
        return Batch(x, y, reset, None if reset or not starts_doc.any() else starts_doc)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "documents": len(self.starts),
            "epoch": self.epoch,
            "window": self.window,
            "epoch_rng": self.epoch_rng,
            "rng": _rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("documents") != len(self.starts):
            raise ValueError("the batcher's state is for another set of documents")
        # Redraw the epoch's order from the state its shuffle started from, then move on.
        _set_rng_state(self.rng, state["epoch_rng"])
        self._start_epoch()
        _set_rng_state(self.rng, state["rng"])
        self.epoch = int(state["epoch"])
        self.window = int(state["window"])
        if not 0 <= self.window <= self.windows_per_epoch:
            raise ValueError("the batcher's position is outside the text")


class RandomBatcher:
    """The lab's batches: B windows of T+1 characters at independent random positions (inside one
    document each, when there are many)."""

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        starts: np.ndarray | None = None,
    ) -> None:
        self.ids = np.asarray(ids)
        self.B, self.T = batch_size, seq_len
        if len(self.ids) < seq_len + 2:
            raise UserError(
                f"the training text has {len(self.ids):,} characters but windows of --seq-len "
                f"{seq_len} need at least {seq_len + 2}; use a longer text or shrink --seq-len"
            )
        # Window starts are drawn as one number in [0, total) and mapped to a document and a place
        # in it; with one document that number is the position itself, as it always was.
        self.starts = np.zeros(1, np.int64) if starts is None else np.asarray(starts, np.int64)
        lengths = np.diff(np.append(self.starts, len(self.ids)))
        self.fits = np.maximum(lengths - seq_len, 0)  # window starts inside each document
        self.fit_ends = np.cumsum(self.fits)
        if self.fit_ends[-1] == 0:
            raise UserError(
                f"no document of the training text is longer than --seq-len {seq_len} + 1 "
                "characters, so no random window fits in one; shrink --seq-len or use "
                "--batching stream"
            )
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def next(self) -> Batch:
        u = self.rng.integers(0, int(self.fit_ends[-1]), size=self.B)  # one doc: last start N-T-1
        if len(self.starts) == 1:
            starts = u
        else:
            doc = np.searchsorted(self.fit_ends, u, side="right")
            starts = self.starts[doc] + u - (self.fit_ends[doc] - self.fits[doc])
        rows = starts[:, None] + np.arange(self.T + 1)[None, :]
        chunk = torch.from_numpy(self.ids[rows].astype(np.int64))
        self.steps += 1
        return Batch(chunk[:, :-1], chunk[:, 1:], True)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "steps": self.steps, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.steps = int(state["steps"])


def make_batcher(
    kind: str,
    ids: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    starts: np.ndarray | None = None,
):
    """The batcher of `kind` over `ids`, whose documents start at `starts` (None: one text)."""
    many = starts is not None and len(starts) > 1
    if kind == "stream":
        if many:
            return DocumentStreamBatcher(ids, starts, batch_size, seq_len, seed)
        return StreamBatcher(ids, batch_size, seq_len, seed)
    if kind == "random":
        return RandomBatcher(ids, batch_size, seq_len, seed, starts if many else None)
    raise UserError(f"batching must be 'stream' or 'random', got {kind!r}")


def stream_layout(n_ids: int, n_streams: int) -> tuple[int, int]:
    """(S, L): how `eval_streams` cuts the n_ids - 1 predictions of a text into S rows of L."""
    n_pred = n_ids - 1
    if n_pred < 1:
        raise UserError("the validation text needs at least 2 characters")
    S = max(1, min(n_streams, n_pred // 64 or 1))
    return S, -(-n_pred // S)  # ceil


def eval_streams(ids: np.ndarray, n_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a text into `n_streams` contiguous rows covering every prediction exactly once.

    Returns (x, y) of shape (S, L); the tail of the last row is padded with -100 in `y` (ignored by
    the loss) so that the mean over non-padded targets is the text's exact per-character loss.
    """
    n_pred = len(ids) - 1
    S, L = stream_layout(len(ids), n_streams)
    x = np.zeros(S * L, dtype=np.int64)
    y = np.full(S * L, -100, dtype=np.int64)
    x[:n_pred] = ids[:-1]
    y[:n_pred] = ids[1:]
    return torch.from_numpy(x.reshape(S, L)), torch.from_numpy(y.reshape(S, L))
