"""Tests for verse-structure statistics and the distances between them."""

from __future__ import annotations

import json

import pytest

from charlstm.analysis import rhyme_key, structure_distance, structure_stats, total_variation

# Three stanzas (4, 2 and 1 lines) separated by one blank line, then by two blank lines of which
# one holds only spaces; leading and trailing blank lines and indentation must not count.
POEM = """
  Roses are red,
Violets are blue;
sugar is sweet
And so are you!

— One more line
and another

   \t
Last «word»...
"""

ONEGIN = """«Мой дядя самых честных правил,
Когда не в шутку занемог,
Он уважать себя заставил
И лучше выдумать не мог."""

SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:"""


def test_lines_and_stanzas_of_a_handmade_poem() -> None:
    """Blank or whitespace-only lines separate stanzas; line lengths are of the stripped lines."""
    stats = structure_stats(POEM)
    assert stats.n_lines == 7
    assert stats.n_stanzas == 3
    assert stats.stanza_lines == {1: 1, 2: 1, 4: 1}
    assert stats.mean_stanza_lines == 7 / 3
    # "Roses are red," without its two-space indent is 14 characters, like two other lines.
    assert stats.line_chars == {11: 1, 14: 3, 15: 2, 17: 1}
    assert stats.mean_line_chars == 100 / 7
    assert stats.line_words == {2: 2, 3: 4, 4: 1}
    assert stats.mean_line_words == 20 / 7


def test_endings_and_uppercase_starts() -> None:
    """Final marks are read past closing quotes; capitals are judged at the first letter."""
    stats = structure_stats(POEM)
    assert stats.line_endings == {",": 1, ";": 1, "!": 1, ".": 1, "none": 3}
    # "sugar" and "and another" start lowercase; "— One" starts with O after the dash.
    assert stats.uppercase_start_share == 5 / 7
    assert structure_stats("«Прочь!»").line_endings == {"!": 1}


def test_syllables_count_russian_and_english_vowels() -> None:
    """Syllables are vowel letters of either language, case-insensitive."""
    stats = structure_stats("Мой дядя самых честных правил\nShall I compare thee to a summer's day")
    assert stats.line_syllables == {9: 1, 13: 1}
    assert stats.mean_line_syllables == 11.0


def test_rhyme_key_examples() -> None:
    """The key runs from the last vowel, taking one more letter when the word ends in a vowel."""
    assert rhyme_key("правил") == "ил"
    assert rhyme_key("Наука") == "ка"
    assert rhyme_key("night") == "ight"
    assert rhyme_key("day") == "ay"
    assert rhyme_key("a") == "a"
    assert rhyme_key("hmm") is None


@pytest.mark.parametrize("quatrain", [ONEGIN, SONNET], ids=["russian", "english"])
def test_rhyming_quatrain_rhymes_throughout(quatrain: str) -> None:
    """An alternately rhymed (ABAB) quatrain has every line rhyming within two lines."""
    assert structure_stats(quatrain).rhyme_rate == 1.0


def test_rhyme_needs_the_same_stanza_and_a_different_word() -> None:
    """Rhymes stay within a stanza and two lines; a repeated word is no rhyme."""
    assert structure_stats("the day\nthe way\n\nthe say").rhyme_rate == 2 / 3
    assert structure_stats("red day\nblue\ngreen\nthe way").rhyme_rate == 0.0
    assert structure_stats("a day\na day").rhyme_rate == 0.0
    assert structure_stats(SONNET.replace("May", "June")).rhyme_rate == 0.5


def test_char_freq_excludes_line_breaks() -> None:
    """Character frequencies count every character except the line break."""
    assert structure_stats("ab\nba a").char_freq == {" ": 1, "a": 3, "b": 2}


def test_empty_text_has_no_lines_and_undefined_shares() -> None:
    """An empty or blank text gives zero counts and None for means and shares."""
    stats = structure_stats("\n  \n")
    assert (stats.n_lines, stats.n_stanzas, stats.line_chars) == (0, 0, {})
    assert stats.mean_line_chars is None and stats.rhyme_rate is None


def test_total_variation_bounds() -> None:
    """Identical histograms are 0 apart, disjoint ones 1; counts are normalised first."""
    assert total_variation({1: 2, 2: 2}, {1: 5, 2: 5}) == 0.0
    assert total_variation({1: 3}, {2: 1}) == 1.0
    assert total_variation({1: 1, 2: 1}, {1: 1}) == 0.5
    assert total_variation({}, {}) == 0.0
    assert total_variation({}, {1: 1}) == 1.0


def test_structure_distance_is_zero_to_itself_and_large_for_prose() -> None:
    """A text is at distance 0 from itself; prose against verse scores high on the summary."""
    verse = structure_stats(ONEGIN + "\n\n" + SONNET)
    same = structure_distance(verse, verse)
    assert all(value == 0.0 for value in same.values())
    prose = structure_stats(" ".join([ONEGIN.replace("\n", " ")] * 3))
    distance = structure_distance(prose, verse)
    assert distance["rhyme_rate_diff"] == 1.0
    assert distance["stanza_lines_tv"] == 1.0
    assert distance["structure_distance"] > 0.8
    histograms = ["line_chars", "line_words", "line_syllables", "stanza_lines", "line_endings"]
    assert distance["structure_distance"] == pytest.approx(
        sum(distance[f"{name}_tv"] for name in histograms) / len(histograms)
    )
    assert 0.0 < distance["char_freq_tv"] < 1.0


def test_stats_to_dict_is_json_serialisable() -> None:
    """to_dict() holds every field in plain containers that json.dumps accepts."""
    stats = structure_stats(POEM)
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["n_stanzas"] == 3
    assert data["stanza_lines"] == {"1": 1, "2": 1, "4": 1}
    assert set(data) >= {"rhyme_rate", "char_freq", "line_endings", "uppercase_start_share"}
