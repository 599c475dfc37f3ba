"""Turning a trained model into text: sampling controls and a batched, incremental generator.

Semantics follow the lab: feed ``start_text`` through the model, then draw one character at a time
from ``softmax(logits / temperature)``. Added controls: temperature 0 is greedy (argmax), ``top_k``
keeps the k most likely characters, ``top_p`` keeps the smallest set whose probability reaches p,
and a repetition penalty lowers the logits of characters seen in the last few positions.

Randomness is counter-based: stream i with seed s draws its t-th uniform from splitmix64(s, t). That
makes every stream's text depend only on its own seed, not on how many other streams share the batch
or on any global RNG, and it lets the fast paths reproduce the reference draws exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from charlstm.errors import UserError

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def uniforms(seeds: np.ndarray, counter: int | np.ndarray) -> np.ndarray:
    """The `counter`-th uniform in [0, 1) of each stream (splitmix64; vectorised over streams).

    `counter` is one step index for all streams or one per stream (streams that joined a batch at
    different times are at different steps)."""
    with np.errstate(over="ignore"):
        steps = np.asarray(counter, dtype=np.uint64) + np.uint64(1)
        state = seeds.astype(np.uint64) + steps * _GAMMA
        return (_mix64(state) >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def stream_seeds(seed: int | None, n: int) -> np.ndarray:
    """Independent per-stream seeds derived from one user seed (a fresh random one if None)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    with np.errstate(over="ignore"):
        base = np.uint64(seed % (1 << 64))
        return _mix64(base + np.arange(1, n + 1, dtype=np.uint64) * _M2)


# float32 logits are below 3.4e38 in size: scaled by at most MAX_PENALTY / MIN_TEMPERATURE they stay
# far inside float64's range, so the probabilities are always finite.
MIN_TEMPERATURE = 1e-100
MAX_PENALTY = 1e100


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.3
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    repetition_window: int = 20

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {t!r}; 0 means greedy")
        # Below MIN_TEMPERATURE (or above MAX_PENALTY) logits / temperature can overflow float64
        # into inf - inf = NaN, which silently draws character 0; such values are greedy in all but
        # name.
        if 0 < t < MIN_TEMPERATURE:
            raise UserError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise UserError(f"top_k must be a whole number >= 0, got {self.top_k!r}; 0 disables it")
        p = self.top_p
        if p is not None and (
            not isinstance(p, int | float) or not math.isfinite(p) or not 0 < p <= 1
        ):
            raise UserError(f"top_p must be in (0, 1], got {p!r}")
        r = self.repetition_penalty
        if not isinstance(r, int | float) or not math.isfinite(r) or not 1 <= r <= MAX_PENALTY:
            raise UserError(
                f"repetition_penalty must be between 1 and {MAX_PENALTY:g}, got {r!r}; "
                "1 disables it"
            )
        if self.repetition_window < 1:
            raise UserError(f"repetition_window must be >= 1, got {self.repetition_window}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise `UserError` unless these settings fit a model of `vocab_size` characters: top_k
        is at most the vocabulary (a larger k would keep every character anyway, and an unbounded
        one overflows the compiled sampler's int64). `Engine.add` calls it for every stream."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise UserError(
                f"top_k must be at most the vocabulary size {vocab_size}, got {self.top_k}; "
                "0 disables it"
            )


def apply_repetition_penalty(
    logits: np.ndarray, recent: np.ndarray | None, penalty: float
) -> np.ndarray:
    """CTRL's penalty: shrink the logits of recently produced characters. `recent` is (N, W) of ids,
    -1 where empty."""
    if penalty == 1.0 or recent is None or recent.size == 0:
        return logits
    logits = logits.copy()
    rows = np.repeat(np.arange(logits.shape[0]), recent.shape[1])
    cols = recent.reshape(-1)
    keep = cols >= 0
    rows, cols = rows[keep], cols[keep]
    vals = logits[rows, cols]
    logits[rows, cols] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def next_token_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """(N, V) float64 logits → (N, V) probabilities after temperature, top-k and top-p."""
    z = logits / params.temperature
    V = z.shape[1]
    if params.top_k and params.top_k < V:
        kth = np.partition(z, V - params.top_k, axis=1)[:, V - params.top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly before each entry
        drop_sorted = before >= params.top_p  # keeps the smallest prefix reaching top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=1, keepdims=True)
    return p


def sample_step(
    logits: np.ndarray,
    params: SamplingParams,
    seeds: np.ndarray,
    counter: int | np.ndarray,
    recent: np.ndarray | None = None,
) -> np.ndarray:
    """The reference sampler: one character index per row of `logits` (N, V)."""
    logits = apply_repetition_penalty(
        np.asarray(logits, dtype=np.float64), recent, params.repetition_penalty
    )
    if params.temperature == 0:
        return logits.argmax(axis=1)
    p = next_token_probs(logits, params)
    cdf = np.cumsum(p, axis=1)
    u = uniforms(seeds, counter) * cdf[:, -1]
    idx = (cdf <= u[:, None]).sum(axis=1)
    return np.minimum(idx, p.shape[1] - 1)


# ---------------------------------------------------------------------------------------- stopping


@dataclass(frozen=True)
class StopRule:
    """When a stream is finished: a stop string, a number of lines, or a number of stanzas."""

    stop: tuple[str, ...] = ()
    max_lines: int | None = None
    max_stanzas: int | None = None

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")
        for name in ("max_lines", "max_stanzas"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {v}")

    @property
    def active(self) -> bool:
        return bool(self.stop) or self.max_lines is not None or self.max_stanzas is not None

    def cut(self, generated: str) -> int | None:
        """The length to keep if `generated` (text after the start text) is finished, else None."""
        ends = []
        for s in self.stop:
            i = generated.find(s)
            if i >= 0:
                ends.append(i)
        if self.max_lines is not None:
            i = _nth(generated, "\n", self.max_lines)
            if i is not None:
                ends.append(i)
        if self.max_stanzas is not None:
            i = _nth_stanza_end(generated, self.max_stanzas)
            if i is not None:
                ends.append(i)
        return min(ends) if ends else None


def _nth(text: str, sub: str, n: int) -> int | None:
    i = -1
    for _ in range(n):
        i = text.find(sub, i + 1)
        if i < 0:
            return None
    return i


def _nth_stanza_end(text: str, n: int) -> int | None:
    """Index of the blank line that closes the n-th stanza (a stanza needs some non-blank text)."""
    count, i, seen_text = 0, 0, False
    while True:
        j = text.find("\n\n", i)
        if j < 0:
            return None
        if text[i:j].strip():
            seen_text = True
        if seen_text:
            count += 1
            seen_text = False
            if count == n:
                return j
        i = j + 1
