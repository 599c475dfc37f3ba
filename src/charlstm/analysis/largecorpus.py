"""Matching statistics against a corpus too large for a suffix array, such as a base corpus.

A base corpus holds tens of millions of characters: `CorpusIndex` (memorisation.py) would sort it
for minutes in gigabytes. The texts to compare with it are small, though, so the work is turned
around. Every window of `MIN_LENGTH` characters of the texts is hashed and sorted (tens of
thousands of hashes); the corpus streams past them once, in chunks, each of its windows hashed and
looked up. Each hit is a pair (text position i, corpus position j) whose first `MIN_LENGTH`
characters agree, and all pairs are grown at once to the length of their common prefix by a binary
search over hashes of longer prefixes. The longest common prefix at each i is its matching
statistic, exactly as `CorpusIndex.matching_statistics` defines it, wherever it is at least
`MIN_LENGTH`; shorter ones are reported as 0 (not measured).

Hashes are polynomial modulo 2**64, as `charlstm.data.basecorpus.span_hashes`. A false match
needs two different windows with the same 64-bit hash: for 40 k text windows against 40 M corpus
windows, about one chance in ten million per analysis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_LENGTH = 16  # shorter common prefixes are not measured (every text shares those with 40 M)
CHUNK = 1 << 22  # corpus windows hashed at a time (each array of a chunk: 32 MB)
BITMAP_BITS = 22  # a bitmap of this many bits rules most corpus windows out before the search
MAX_PAIRS = 1 << 22  # pairs grown at a time, to bound the memory of one step

_B = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64
_SEPARATOR = np.uint64(0x110000)  # above every code point: a window holding it matches nothing


def _code_points(text: str) -> np.ndarray:
    """The text as uint64 code points, one per Python character."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), "<u4").astype(np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^k, B^-k) for k < n, modulo 2**64."""
    with np.errstate(over="ignore"):
        up = np.full(n, _B, dtype=np.uint64)
        down = np.full(n, pow(int(_B), -1, 2**64), dtype=np.uint64)
        up[0] = down[0] = 1
        return np.cumprod(up, dtype=np.uint64), np.cumprod(down, dtype=np.uint64)


class _PrefixHashes:
    """Hashes of any windows of one code array: prefix sums S[k] = sum of c[i]·B^-i for i < k, so
    that the window of length L at i hashes to B^(i+L-1)·(S[i+L] - S[i]) = sum of c[i+t]·B^(L-1-t),
    a value that does not depend on where the window lies."""

    def __init__(self, codes: np.ndarray, up: np.ndarray, down: np.ndarray) -> None:
        self.up = up
        with np.errstate(over="ignore"):
            self.sums = np.zeros(len(codes) + 1, dtype=np.uint64)
            np.cumsum(codes * down[: len(codes)], dtype=np.uint64, out=self.sums[1:])

    def windows(self, start: np.ndarray, length: np.ndarray | int) -> np.ndarray:
        """Hashes of the windows at `start` of `length` (arrays, or one length for all)."""
        end = start + length
        with np.errstate(over="ignore"):
            return (self.sums[end] - self.sums[start]) * self.up[end - 1]

    def first_windows(self, n: int, length: int) -> np.ndarray:
        """Hashes of the first `n` windows of `length`: `windows(arange(n), length)` by slices,
        which is several times faster than gathering."""
        with np.errstate(over="ignore"):
            out = self.sums[length : length + n] - self.sums[:n]
            out *= self.up[length - 1 : length - 1 + n]
            return out


def _grow(
    text: _PrefixHashes,
    i: np.ndarray,
    corpus: _PrefixHashes,
    j: np.ndarray,
    known: int,
    most: np.ndarray,
) -> np.ndarray:
    """Length of the common prefix of text[i:] and corpus[j:] for each pair, knowing that the first
    `known` characters agree and at most `most` can: a binary search on window hashes."""
    lo = np.full(len(i), known, dtype=np.int64)
    hi = most.astype(np.int64)
    while (active := lo < hi).any():
        mid = (lo + hi + 1) // 2
        equal = text.windows(i, mid) == corpus.windows(j, mid)
        lo = np.where(active & equal, mid, lo)
        hi = np.where(active & ~equal, mid - 1, hi)
    return lo


def matching_statistics(
    corpus: str, texts: Sequence[str], min_len: int = MIN_LENGTH, chunk: int = CHUNK
) -> list[np.ndarray]:
    """For each text, an int64 array: at position i, the length of the longest prefix of
    ``text[i:]`` that occurs in `corpus` when that is at least `min_len`, else 0.

    One pass over the corpus serves every text (see the module docstring)."""
    if min_len < 1:
        raise ValueError(f"min_len must be at least 1, got {min_len}")
    lengths = [len(t) for t in texts]
    bounds = np.cumsum([0] + [n + 1 for n in lengths])  # each text is followed by a separator
    best = np.zeros(int(bounds[-1]), dtype=np.int64)
    longest = max(lengths, default=0)  # no copy can be longer than its text
    if longest < min_len or len(corpus) < min_len:
        return [best[a : a + n] for a, n in zip(bounds, lengths, strict=False)]

    codes = np.concatenate([np.append(_code_points(t), _SEPARATOR) for t in texts])
    m = len(codes)
    up, down = _powers(max(m, min(chunk, len(corpus)) + longest) + 1)
    text = _PrefixHashes(codes, up, down)
    # The texts' windows that hold no separator, sorted by hash with their positions grouped, and
    # the room each position has before its separator (the longest copy that can start there).
    seps = np.flatnonzero(codes == _SEPARATOR)
    room = seps[np.searchsorted(seps, np.arange(m))] - np.arange(m)
    starts = np.flatnonzero(room >= min_len)
    hashes = text.windows(starts, min_len)
    order = np.argsort(hashes, kind="stable")
    keys, first, count = np.unique(hashes[order], return_index=True, return_counts=True)
    positions = starts[order]
    bitmap = np.zeros(1 << BITMAP_BITS, dtype=bool)
    shift = np.uint64(64 - BITMAP_BITS)  # the top bits: the best mixed of a polynomial hash
    bitmap[np.right_shift(keys, shift).view(np.int64)] = True
    batch = max(1, MAX_PAIRS // int(count.max()))  # corpus hits whose pairs are grown at once

    for c0 in range(0, len(corpus) - min_len + 1, chunk):
        # Windows starting in [c0, c0 + chunk), with room after them for the longest copy.
        piece = _code_points(corpus[c0 : c0 + chunk + longest])
        hashed = _PrefixHashes(piece, up, down)
        window = hashed.first_windows(min(chunk, len(piece) - min_len + 1), min_len)
        # The top bits are below 2**BITMAP_BITS, so their int64 view is the index itself.
        j = np.flatnonzero(bitmap[np.right_shift(window, shift).view(np.int64)])
        at = np.minimum(np.searchsorted(keys, window[j]), len(keys) - 1)
        hit = keys[at] == window[j]
        j, at = j[hit], at[hit]
        for b in range(0, len(j), batch):
            # Each corpus hit pairs with every text position that holds its window.
            n = count[at[b : b + batch]]
            jj = np.repeat(j[b : b + batch], n)
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            ii = positions[np.repeat(first[at[b : b + batch]], n) + within]
            most = np.minimum(room[ii], len(piece) - jj)
            np.maximum.at(best, ii, _grow(text, ii, hashed, jj, min_len, most))
    return [best[a : a + n] for a, n in zip(bounds, lengths, strict=False)]
