"""Tests for real words: how text is cut into words, which language is chosen, and the share."""

from __future__ import annotations

import random

import pytest

from charlstm.analysis.words import (
    TRAINING_TEXT,
    Lexicon,
    best_language,
    describe,
    known_share,
    main_script,
    real_words,
    words,
)

RU = (
    "Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя заставил и лучше "
    "выдумать не мог. Его пример другим наука; но, боже мой, какая скука с больным сидеть и день "
    "и ночь, не отходя ни шагу прочь!"
)
EN = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the "
    "slings and arrows of outrageous fortune, or to take arms against a sea of troubles and by "
    "opposing end them."
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Don't stop", ["Don't", "stop"]),
        ("по-русски — well-known", ["по-русски", "well-known"]),  # a dash is not a hyphen
        ("'quoted', (bracketed) end.", ["quoted", "bracketed", "end"]),
        ("1812 года, 3 ночи", ["года", "ночи"]),  # numbers are not words
        ("за́мок", ["за́мок"]),  # a stress mark stays inside its word
        ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),  # vowel signs are marks, not breaks
        ("a-b- -c x'", ["a-b", "c", "x"]),  # joiners count only between letters
        ("", []),
    ],
)
def test_words_are_cut_as_a_reader_would(text, expected):
    """Letters with their marks, joined by inner apostrophes and hyphens; digits, dashes split."""
    assert words(text) == expected


def test_main_script():
    """The script of most letters; None without letters."""
    assert main_script(RU) == "CYRILLIC"
    assert main_script(EN + " и") == "LATIN"
    assert main_script("123 — !") is None


def test_language_is_detected_from_small_samples():
    """A Russian and an English paragraph are known at well over the threshold in their language."""
    lang, share = best_language(RU)
    assert lang == "ru" and share > 0.95
    lang, share = best_language(EN)
    assert lang == "en" and share > 0.95
    assert best_language("1, 2, 3") == (None, None)


def test_lexicon_detects_or_falls_back_to_the_training_text():
    """A known language is detected; a made-up one falls back to the training text's words."""
    assert Lexicon.for_text(RU).measure == "ru"
    assert Lexicon.for_text(EN).how == "detected"
    rng = random.Random(0)
    made_up = " ".join(
        "".join(rng.choice("qxzvkjw") for _ in range(rng.randint(3, 8))) for _ in range(200)
    )
    lexicon = Lexicon.for_text(made_up)
    assert lexicon.measure == TRAINING_TEXT and lexicon.how == "unknown"
    assert lexicon.language_share is not None and lexicon.language_share < 0.8
    some = made_up.split()[:3]
    counted = real_words(" ".join([*some, "Qqqqq", some[0].upper()]), lexicon)
    # Known without case, whatever the list of the best candidate says.
    assert (counted.words, counted.real) == (5, 4)
    assert counted.to_dict()["made_up"] == ["Qqqqq"]
    assert "occur in the training text" in describe(lexicon.to_dict())


def test_base_language_wins_over_detection():
    """Given a base language, it is used even for a text in another language."""
    lexicon = Lexicon.for_text(EN, "ru")
    assert (lexicon.measure, lexicon.how) == ("ru", "base")
    assert "base model" in describe(lexicon.to_dict())


def test_real_word_share_on_known_inputs():
    """Real words, made-up words, case, stress marks and hyphens, each counted once per token."""
    lexicon = Lexicon.for_text(RU)
    counted = real_words("Мне не с выл набя,\nНо порить смел свердца, МНЕ по-русски за́мок", lexicon)
    d = counted.to_dict()
    assert d["words"] == 12
    assert sorted(d["made_up"]) == ["набя", "порить", "свердца"]
    assert d["real"] == 9 and d["real_share"] == pytest.approx(0.75)
    # Long words (4 letters or more): набя, порить, смел, свердца, по-русски, за́мок.
    assert d["long_words"] == 6 and d["long_real_share"] == pytest.approx(0.5)
    assert real_words("", lexicon).to_dict()["real_share"] is None


def test_known_share_counts_repeats():
    assert known_share(["the", "the", "the", "qzxq"], "en") == pytest.approx(0.75)
    assert known_share([], "en") is None


def test_random_letters_are_seldom_real_words():
    """Word-shaped strings of random Russian letters: few real words, fewer long ones."""
    rng = random.Random(1)
    alphabet = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
    text = " ".join(
        "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 9))) for _ in range(300)
    )
    d = real_words(text, Lexicon.for_text(RU)).to_dict()
    assert d["long_real_share"] < 0.05
