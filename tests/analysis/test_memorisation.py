"""Tests for the corpus index and the memorisation report."""

from __future__ import annotations

import itertools
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from charlstm.analysis import (
    CorpusIndex,
    copied_spans,
    matching_statistics,
    memorisation_report,
    word_ngrams,
)

# A few code points from different planes, so that the index is exercised beyond ASCII/BMP.
ALPHABET = "ab\nб😀"


def _brute_matching(training: str, generated: str) -> list[int]:
    """Matching statistics by definition: grow each prefix while it is still a substring."""
    out = []
    for i in range(len(generated)):
        length = 0
        while i + length < len(generated) and generated[i : i + length + 1] in training:
            length += 1
        out.append(length)
    return out


def _brute_covered(training: str, generated: str, min_len: int) -> list[bool]:
    """Whether each character lies in some substring of >= min_len characters found in training."""
    covered = [False] * len(generated)
    for i in range(len(generated)):
        for j in range(i + min_len, len(generated) + 1):
            if generated[i:j] in training:
                covered[i:j] = [True] * (j - i)
    return covered


def _corpus(seed: int = 0, n_lines: int = 600) -> str:
    """A verse-shaped corpus of made-up words: stanzas of four lines of 4-8 words."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(400)
    ]
    lines = []
    for k in range(n_lines):
        lines.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 8))))
        if k % 4 == 3:
            lines.append("")
    return "\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(
    training=st.text(alphabet=ALPHABET, max_size=40),
    generated=st.text(alphabet=ALPHABET + "z", max_size=30),
    min_len=st.integers(min_value=1, max_value=6),
)
def test_matching_statistics_equal_brute_force(training: str, generated: str, min_len: int) -> None:
    """Matching statistics, coverage and copied spans agree with brute-force definitions."""
    index = CorpusIndex(training)
    assert matching_statistics(index, generated).tolist() == _brute_matching(training, generated)
    covered = _brute_covered(training, generated, min_len)
    spans = copied_spans(index, generated, min_len)
    assert [any(s <= c < e for s, e in spans) for c in range(len(generated))] == covered
    # Merged: sorted, disjoint and not touching.
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(spans))
    if generated:
        report = memorisation_report(index, generated, ks=(min_len,))
        assert report.coverage[min_len] == sum(covered) / len(generated)


def test_long_repeats_beyond_the_corpus_rank_levels() -> None:
    """A periodic corpus still gives exact matches far longer than its doubling levels reach."""
    training = "ab" * 300
    generated = "b" + "ab" * 500 + "c"
    ms = CorpusIndex(training).matching_statistics(generated)
    assert ms.tolist() == _brute_matching(training, generated)
    assert ms.max() == 600


def test_training_excerpt_is_fully_copied() -> None:
    """An excerpt of the training text counts as one whole copy: longest span = excerpt length."""
    corpus = _corpus()
    excerpt = corpus[1000:1400]
    report = memorisation_report(CorpusIndex(corpus), excerpt, ks=(20, 50))
    assert report.longest_copy_length == len(excerpt)
    assert report.longest_copy_start == 0
    assert report.longest_copy_text == excerpt
    assert report.coverage == {20: 1.0, 50: 1.0}
    assert report.copied_spans == ((0, len(excerpt)),)
    # Only n-grams holding a word cut at either end of the excerpt can be new (3 per end).
    assert report.novel_ngram_share[3] <= 6 / len(word_ngrams(excerpt, 3))


def test_longest_copy_is_located_inside_novel_text() -> None:
    """A planted excerpt between made-up text is found at its offset with its exact text."""
    corpus = _corpus()
    planted = corpus[5000:5120]
    generated = "Q" * 30 + planted + "Q" * 30
    report = memorisation_report(CorpusIndex(corpus), generated)
    assert (report.longest_copy_start, report.longest_copy_length) == (30, 120)
    assert report.longest_copy_text == planted
    assert report.copied_spans == ((30, 150),)


def test_shuffled_training_words_have_almost_no_long_copies() -> None:
    """Training words in random order are not copies: < 5 % of characters in 50-char copies."""
    corpus = _corpus()
    words = corpus.split()
    random.Random(1).shuffle(words)
    generated = " ".join(words)[:5000]
    report = memorisation_report(CorpusIndex(corpus), generated, ks=(20, 50))
    assert report.coverage[50] < 0.05
    assert report.novel_ngram_share[3] > 0.9
    assert report.longest_copy_length < 50


def test_novel_ngram_share_counts_occurrences_of_lowercase_words() -> None:
    """Word n-grams are lowercase \\w+ tokens; the share counts each unseen n-gram occurrence."""
    index = CorpusIndex("The cat sat on the mat.")
    report = memorisation_report(index, "the CAT, sat on a mat", ks=(5,))
    # 3-grams: (the cat sat) (cat sat on) (sat on a) (on a mat): the last two are new.
    assert report.novel_ngram_share[3] == 0.5
    assert report.novel_ngram_share[4] == 2 / 3
    assert word_ngrams("a b", 3) == []
    assert memorisation_report(index, "two words", ks=(5,)).novel_ngram_share == {3: None, 4: None}


def test_reproduced_lines_ignore_short_lines_and_whitespace() -> None:
    """Whole lines count when stripped and at least 10 characters long; short lines are skipped."""
    index = CorpusIndex("ROMEO:\nBut soft, what light\n  through yonder window breaks\n")
    generated = (
        "ROMEO:\n   But soft, what light  \nthrough yonder window breaks\nsomething new here\n\n"
    )
    report = memorisation_report(index, generated)
    assert (report.lines_considered, report.lines_reproduced) == (3, 2)
    assert report.lines_reproduced_share == 2 / 3


def test_unicode_text_and_empty_inputs() -> None:
    """Cyrillic and astral characters index correctly; empty texts give zeros and None shares."""
    corpus = "Мой дядя самых честных правил 😀\n"
    report = memorisation_report(CorpusIndex(corpus), "дядя самых 😀", ks=(3,))
    assert report.longest_copy_text == "дядя самых "
    assert report.coverage[3] == 11 / 12
    empty = memorisation_report(CorpusIndex(corpus), "")
    assert (empty.longest_copy_length, empty.coverage[50], empty.copied_spans) == (0, None, ())
    nothing = memorisation_report(CorpusIndex(""), "abc", ks=(1,))
    assert (nothing.longest_copy_length, nothing.coverage[1]) == (0, 0.0)


def test_report_to_dict_is_json_serialisable() -> None:
    """to_dict() gives plain containers that json.dumps accepts, with every field present."""
    corpus = _corpus(n_lines=40)
    report = memorisation_report(CorpusIndex(corpus), corpus[:300] + "QQQQ")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["longest_copy_length"] == 300
    assert data["coverage"]["50"] == 300 / 304
    assert data["copied_spans"] == [[0, 300]]
