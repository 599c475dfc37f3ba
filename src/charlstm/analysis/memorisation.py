"""How much of a generated text was copied from the training text, and how much is new.

`CorpusIndex` is a suffix array of the training text, built once per corpus and queried for any
number of generated texts. Its one primitive is *matching statistics*: for every position ``i`` of
the generated text, the length of the longest substring **starting at** ``i`` that occurs somewhere
in the training text. Everything else here (longest copy, share of characters inside long copies,
copied spans) is a few numpy operations on that array. Word n-gram novelty and reproduced lines
are plain set look-ups beside it.

Why a suffix array and not a suffix automaton: a pure-Python automaton over a 1 M-character corpus
needs millions of per-state dicts (hundreds of MB, several seconds), while prefix doubling with
``np.unique`` sorts tinyshakespeare in well under a second. The query is vectorised the same way:
all generated positions do their binary search over the suffix array together, and each comparison
finds the common prefix by binary lifting over the rank arrays that the doubling left behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+")


def _code_points(text: str) -> np.ndarray:
    """The text as an int64 array of Unicode code points (one element per Python character)."""
    # UTF-32 has exactly one 4-byte unit per code point, so indices match Python's str indices;
    # surrogatepass keeps lone surrogates (legal in a Python str) instead of failing on them.
    data = text.encode("utf-32-le", errors="surrogatepass")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)


class CorpusIndex:
    """A suffix array of a training text, with the rank arrays needed to match other texts to it.

    Build it once per corpus (about half a second for 1.1 M characters) and pass it to
    `matching_statistics`, `copied_spans` and `memorisation_report` for every generated text.
    Any Unicode text works; characters are compared by code point.

    Internals: ``_ranks[k][j]`` is the class of ``text[j:j + 2**k]`` among all substrings of that
    length (a block running past the end of the text is its own class, distinct from every
    full-length block); ``_keys[k]`` holds the sorted pair keys that defined level ``k``, so that
    a block of another text can be looked up in the same class numbering. Doubling stops at the
    first level ``K`` where every class is a single position; beyond it ``_ranks[K]`` is the
    inverse suffix array and block equality reduces to "same starting position".
    """

    def __init__(self, text: str) -> None:
        self.text = text
        codes = _code_points(text)
        self._codes = codes
        self._n = n = len(codes)
        self._alphabet, level0 = np.unique(codes, return_inverse=True)
        ranks = [level0.astype(np.int32)]
        keys: list[np.ndarray | None] = [None]  # level 0 is looked up in the alphabet instead
        counts = [len(self._alphabet)]
        while counts[-1] < n:
            h = 1 << (len(ranks) - 1)
            prev = ranks[-1].astype(np.int64)
            # Second half's class + 1, with 0 for "past the end": a shorter suffix sorts first and
            # never shares a class with a full-length block.
            second = np.zeros(n, dtype=np.int64)
            second[: n - h] = prev[h:] + 1
            unique, inverse = np.unique(prev * (counts[-1] + 1) + second, return_inverse=True)
            ranks.append(inverse.astype(np.int32))
            keys.append(unique)
            counts.append(len(unique))
        self._ranks = ranks
        self._keys = keys
        self._counts = counts
        self._suffix_array = np.empty(n, dtype=np.int64)
        self._suffix_array[ranks[-1]] = np.arange(n)
        self._lines: frozenset[str] | None = None
        self._ngrams: dict[int, frozenset[tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return self._n

    def matching_statistics(self, generated: str) -> np.ndarray:
        """For each position i of `generated`, the length of its longest prefix found in the corpus.

        Returns an int64 array ``ms`` of ``len(generated)`` with ``generated[i:i + ms[i]]``
        occurring in the training text and ``generated[i:i + ms[i] + 1]`` not (or running past
        the end).
        """
        g = _code_points(generated)
        m, n = len(g), self._n
        if m == 0 or n == 0:
            return np.zeros(m, dtype=np.int64)
        blocks = self._block_ranks(g)
        positions = np.arange(m)
        sa = self._suffix_array
        # Binary search for each generated suffix's insertion point among the sorted corpus
        # suffixes: afterwards suffixes sa[:lo] are smaller and sa[lo:] are not.
        lo = np.zeros(m, dtype=np.int64)
        hi = np.full(m, n, dtype=np.int64)
        for _ in range(n.bit_length()):
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            j = sa[np.minimum(mid, n - 1)]
            less = self._corpus_suffix_less(g, blocks, positions, j)
            lo = np.where(active & less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        # The corpus suffix sharing the longest prefix with a generated suffix is one of its two
        # neighbours in sorted order, since the common prefix only shrinks further away.
        best = np.zeros(m, dtype=np.int64)
        for neighbour, exists in ((lo - 1, lo > 0), (lo, lo < n)):
            j = sa[np.clip(neighbour, 0, n - 1)]
            best = np.maximum(best, np.where(exists, self._lcp(blocks, positions, j, m), 0))
        return best

    def _block_ranks(self, g: np.ndarray) -> list[np.ndarray]:
        """Classes of the generated text's power-of-two blocks in the corpus's numbering.

        Entry ``k`` holds, for each position i, the corpus class of ``g[i:i + 2**k]``, or -1 where
        the block does not occur in the corpus or runs past the end of `g`. The list stops at the
        last level with any occurring block, which bounds every common prefix below twice that
        length.
        """
        m = len(g)
        found = np.searchsorted(self._alphabet, g)
        found_clipped = np.minimum(found, len(self._alphabet) - 1)
        level = np.where(self._alphabet[found_clipped] == g, found, -1)
        levels = [level]
        top = len(self._ranks) - 1
        sa = self._suffix_array
        while (level >= 0).any():
            k = len(levels) - 1
            h = 1 << k
            size = m - 2 * h + 1
            if size <= 0:
                break
            a, b = level[:size], level[h : h + size]
            both = (a >= 0) & (b >= 0)
            if k < top:
                # Look the pair up among the corpus's sorted keys of level k + 1.
                key = a * (self._counts[k] + 1) + b + 1
                table = self._keys[k + 1]
                at = np.searchsorted(table, key)
                hit = both & (table[np.minimum(at, len(table) - 1)] == key)
                joined = np.where(hit, at, -1)
            else:
                # Past uniqueness a class is one corpus position; the two halves must be adjacent.
                hit = both & (sa[np.maximum(b, 0)] == sa[np.maximum(a, 0)] + h)
                joined = np.where(hit, a, -1)
            level = np.full(m, -1, dtype=np.int64)
            level[:size] = joined
            levels.append(level)
        while len(levels) > 1 and not (levels[-1] >= 0).any():
            levels.pop()
        return levels

    def _lcp(self, blocks: list[np.ndarray], i: np.ndarray, j: np.ndarray, m: int) -> np.ndarray:
        """Length of the common prefix of generated suffixes ``i`` and corpus suffixes ``j``."""
        n = self._n
        top = len(self._ranks) - 1
        length = np.zeros(len(i), dtype=np.int64)
        # Binary lifting: take each power-of-two step, largest first, while the blocks agree.
        for k in range(len(blocks) - 1, -1, -1):
            h = 1 << k
            gi = i + length
            tj = j + length
            g_class = blocks[k][np.minimum(gi, m - 1)]
            t_class = self._ranks[min(k, top)][np.minimum(tj, n - 1)]
            equal = (gi < m) & (tj + h <= n) & (g_class >= 0) & (g_class == t_class)
            length += equal * h
        return length

    def _corpus_suffix_less(
        self, g: np.ndarray, blocks: list[np.ndarray], i: np.ndarray, j: np.ndarray
    ) -> np.ndarray:
        """Whether corpus suffix ``j`` sorts strictly before generated suffix ``i``."""
        m, n = len(g), self._n
        length = self._lcp(blocks, i, j, m)
        gi, tj = i + length, j + length
        g_done, t_done = gi >= m, tj >= n
        g_next = g[np.minimum(gi, m - 1)]
        t_next = self._codes[np.minimum(tj, n - 1)]
        # A suffix that ends inside the common prefix is the smaller one.
        return ~g_done & (t_done | (t_next < g_next))

    def lines(self) -> frozenset[str]:
        """The corpus's lines, stripped (computed once)."""
        if self._lines is None:
            self._lines = frozenset(line.strip() for line in self.text.split("\n"))
        return self._lines

    def word_ngrams(self, n: int) -> frozenset[tuple[str, ...]]:
        """The set of the corpus's lowercase word n-grams (computed once per n)."""
        if n not in self._ngrams:
            self._ngrams[n] = frozenset(word_ngrams(self.text, n))
        return self._ngrams[n]


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """All word n-grams of `text` in order, words being lowercase ``\\w+`` tokens."""
    words = _WORD.findall(text.lower())
    return list(zip(*(words[k:] for k in range(n)), strict=False))


def matching_statistics(index: CorpusIndex, generated: str) -> np.ndarray:
    """Per position of `generated`: length of the longest corpus substring starting there."""
    return index.matching_statistics(generated)


def covered(ms: np.ndarray, min_len: int) -> np.ndarray:
    """From matching statistics `ms` (of any corpus): a mask of the positions inside some corpus
    substring of at least `min_len` characters."""
    starts = np.arange(len(ms))
    # Any copied substring containing c that is >= min_len long starts at some i <= c with
    # ms[i] >= its length, so c is covered iff the furthest such reach from the left passes c.
    ends = np.where(ms >= min_len, starts + ms, 0)
    return np.maximum.accumulate(ends) > starts if len(ms) else np.zeros(0, dtype=bool)


def mask_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in `mask` as half-open (start, end) pairs."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def longest_copy(ms: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest copy given matching statistics `ms`: the first of the
    longest, for a stable report; (0, 0) when nothing was copied."""
    start = int(np.argmax(ms)) if len(ms) else 0
    length = int(ms[start]) if len(ms) else 0
    return (start if length else 0), length


def copy_figures(ms: np.ndarray, generated: str, ks: Sequence[int]) -> dict[str, Any]:
    """The longest copy (length, start, text) and the share of characters inside copies of at
    least K characters, for each K of `ks`, from matching statistics `ms` of `generated` against
    any corpus (a `CorpusIndex`'s, or `largecorpus.matching_statistics`)."""
    start, length = longest_copy(ms)
    return {
        "longest_copy_length": length,
        "longest_copy_start": start,
        "longest_copy_text": generated[start : start + length],
        "coverage": {int(k): (float(covered(ms, k).mean()) if len(ms) else None) for k in ks},
    }


def _check_min_len(min_len: int) -> None:
    if min_len < 1:
        raise ValueError(f"span length must be at least 1, got {min_len}")


def copied_spans(index: CorpusIndex, generated: str, min_len: int) -> list[tuple[int, int]]:
    """Half-open spans of `generated` covered by corpus substrings of at least `min_len` characters.

    Overlapping and touching copies are merged, so the spans are sorted and disjoint: ready to
    highlight. A merged span need not itself occur in the corpus as a whole.
    """
    _check_min_len(min_len)
    return mask_spans(covered(index.matching_statistics(generated), min_len))


@dataclass(frozen=True)
class MemorisationReport:
    """What a generated text copied from its training text, and what it made up.

    Shares are ``None`` when their denominator is empty (no characters, no n-grams, no lines).
    """

    n_chars: int
    longest_copy_length: int
    longest_copy_start: int  # index into the generated text; 0 when nothing was copied
    longest_copy_text: str
    coverage: dict[int, float | None]  # K -> share of characters inside copies of >= K characters
    novel_ngram_share: dict[int, float | None]  # n -> share of word n-grams absent from the corpus
    lines_considered: int  # generated non-empty lines of at least `min_line_len` characters
    lines_reproduced: int  # ... of which equal some training line (both stripped)
    lines_reproduced_share: float | None
    span_min_len: int
    copied_spans: tuple[tuple[int, int], ...]  # merged spans copied in runs of >= span_min_len

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready containers (int dict keys become strings under `json.dumps`)."""
        return {
            "n_chars": self.n_chars,
            "longest_copy_length": self.longest_copy_length,
            "longest_copy_start": self.longest_copy_start,
            "longest_copy_text": self.longest_copy_text,
            "coverage": dict(self.coverage),
            "novel_ngram_share": dict(self.novel_ngram_share),
            "lines_considered": self.lines_considered,
            "lines_reproduced": self.lines_reproduced,
            "lines_reproduced_share": self.lines_reproduced_share,
            "span_min_len": self.span_min_len,
            "copied_spans": [list(span) for span in self.copied_spans],
        }


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _novel_share(index: CorpusIndex, generated: str, n: int) -> float | None:
    """Share of the generated text's n-gram occurrences (repeats counted) absent from the corpus."""
    grams = word_ngrams(generated, n)
    known = index.word_ngrams(n)
    return _share(sum(gram not in known for gram in grams), len(grams))


def _reproduced_lines(index: CorpusIndex, generated: str, min_line_len: int) -> tuple[int, int]:
    """(lines considered, lines equal to a training line); short lines are skipped as trivial."""
    # Lines such as "ROMEO:" or "And so" recur in any corpus; only long lines say "memorised".
    candidates = [s for line in generated.split("\n") if len(s := line.strip()) >= min_line_len]
    known = index.lines()
    return len(candidates), sum(line in known for line in candidates)


def memorisation_report(
    index: CorpusIndex,
    generated: str,
    ks: Sequence[int] = (20, 50),
    *,
    ngram_sizes: Iterable[int] = (3, 4),
    min_line_len: int = 10,
) -> MemorisationReport:
    """Compare `generated` with the corpus behind `index`: copies, coverage, novelty, whole lines.

    Copied spans in the report are those of at least ``max(ks)`` characters.
    """
    if not ks:
        raise ValueError("ks must name at least one copy length")
    for k in ks:
        _check_min_len(k)
    ms = index.matching_statistics(generated)
    span_min_len = int(max(ks))
    considered, reproduced = _reproduced_lines(index, generated, min_line_len)
    return MemorisationReport(
        n_chars=len(generated),
        **copy_figures(ms, generated, ks),
        novel_ngram_share={int(n): _novel_share(index, generated, n) for n in ngram_sizes},
        lines_considered=considered,
        lines_reproduced=reproduced,
        lines_reproduced_share=_share(reproduced, considered),
        span_min_len=span_min_len,
        copied_spans=tuple(mask_spans(covered(ms, span_min_len))),
    )
