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

Batchers are deterministic given their seed, and expose `state_dict()` so that a resumed run
continues with exactly the windows an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from charlstm.errors import UserError


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64
    y: torch.Tensor  # (B, T) int64, x shifted left by one
    reset: bool  # True when carried hidden state must not be used (new epoch or random windows)


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


class RandomBatcher:
    """The lab's batches: B windows of T+1 characters at independent random positions."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.ids = np.asarray(ids)
        self.B, self.T = batch_size, seq_len
        if len(self.ids) < seq_len + 2:
            raise UserError(
                f"the training text has {len(self.ids):,} characters but windows of --seq-len "
                f"{seq_len} need at least {seq_len + 2}; use a longer text or shrink --seq-len"
            )
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def next(self) -> Batch:
        starts = self.rng.integers(0, len(self.ids) - self.T, size=self.B)  # last start: N-T-1
        rows = starts[:, None] + np.arange(self.T + 1)[None, :]
        chunk = torch.from_numpy(self.ids[rows].astype(np.int64))
        self.steps += 1
        return Batch(chunk[:, :-1], chunk[:, 1:], True)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "steps": self.steps, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.steps = int(state["steps"])


def make_batcher(kind: str, ids: np.ndarray, batch_size: int, seq_len: int, seed: int):
    if kind == "stream":
        return StreamBatcher(ids, batch_size, seq_len, seed)
    if kind == "random":
        return RandomBatcher(ids, batch_size, seq_len, seed)
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
