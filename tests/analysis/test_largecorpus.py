"""Tests for hashed matching statistics against a large corpus: they must equal the suffix array's
wherever those reach the minimum length, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlstm.analysis import CorpusIndex
from charlstm.analysis.largecorpus import matching_statistics
from charlstm.analysis.memorisation import copy_figures

ALPHABET = "ab\nб😀"  # beyond ASCII and the BMP, as in test_memorisation


def _expected(corpus: str, text: str, min_len: int) -> list[int]:
    if not corpus:
        return [0] * len(text)
    ms = CorpusIndex(corpus).matching_statistics(text)
    return [int(x) if x >= min_len else 0 for x in ms]


@settings(max_examples=200, deadline=None)
@given(
    corpus=st.text(ALPHABET, max_size=120),
    texts=st.lists(st.text(ALPHABET, max_size=60), max_size=4),
    planted=st.integers(0, 120),
    min_len=st.integers(1, 6),
    chunk=st.sampled_from([1, 5, 16, 1 << 22]),
)
def test_equals_the_suffix_array_above_the_minimum(corpus, texts, planted, min_len, chunk):
    """Any corpus, texts (one with a planted copy), minimum length and chunk size."""
    if texts:
        texts[0] = texts[0][:3] + corpus[planted : planted + 40] + texts[0][3:]
    got = matching_statistics(corpus, texts, min_len, chunk)
    assert [list(map(int, g)) for g in got] == [_expected(corpus, t, min_len) for t in texts]


def test_copies_never_cross_from_one_text_to_the_next():
    """Texts are compared one by one, even though they share one pass over the corpus."""
    corpus = "abcdefghijklmnopqrstuvwxyz" * 2
    first, second = matching_statistics(corpus, ["xyzab", "cdefg"], min_len=3)
    assert list(first) == [5, 4, 3, 0, 0] and list(second) == [5, 4, 3, 0, 0]


def test_copy_figures_of_a_planted_copy():
    """A 300-character stretch of a longer corpus, inside made-up text, is found whole."""
    rng = np.random.default_rng(0)
    corpus = "".join(rng.choice(list("абвгдежзиклмн \n"), 20_000))
    text = "ЯЯЯЯ" + corpus[5000:5300] + "ЯЯЯЯ"
    (ms,) = matching_statistics(corpus, [text], chunk=4096)  # the copy crosses a chunk's end
    figures = copy_figures(ms, text, (20, 50))
    assert figures["longest_copy_length"] == 300 and figures["longest_copy_start"] == 4
    assert figures["longest_copy_text"] == corpus[5000:5300]
    assert figures["coverage"][50] == pytest.approx(300 / 308)


def test_nothing_to_compare():
    (empty,) = matching_statistics("", ["abc"])
    assert list(empty) == [0, 0, 0]
    assert matching_statistics("abc" * 10, []) == []
    with pytest.raises(ValueError, match="min_len"):
        matching_statistics("abc", ["a"], min_len=0)
