"""Vocabulary: encode/decode round trips over arbitrary Unicode and the unknown-character policy."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_round_trip_any_unicode(text):
    """Decoding the encoding of any text gives the text back, one index per code point."""
    vocab = Vocabulary.from_text(text)
    ids = vocab.encode(text)
    assert len(ids) == len(text)
    assert vocab.decode(ids) == text
    assert all(0 <= i < len(vocab) for i in ids)


def test_order_is_frequency_then_code_point():
    """Most frequent first, as the lab sorts; ties broken by code point so the order is stable."""
    vocab = Vocabulary.from_text("bbbaacd")
    assert vocab.chars == ("b", "a", "c", "d")
    assert vocab.char_to_idx["b"] == 0 and vocab.idx_to_char[3] == "d"


def test_combining_marks_are_separate_code_points():
    """A letter with a combining accent is two symbols, never bytes."""
    vocab = Vocabulary.from_text("е\u0301")
    assert len(vocab) == 2


def test_unknown_characters_error_lists_them():
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(UserError, match=r"'x'.*--unknown skip"):
        vocab.encode("axbx")


def test_unknown_characters_skip_warns_and_drops():
    vocab = Vocabulary.from_text("abc")
    with pytest.warns(UserWarning, match="dropping"):
        assert vocab.decode(vocab.encode("axb", unknown="skip")) == "ab"


def test_union_keeps_existing_indices():
    a, b = Vocabulary.from_text("aab"), Vocabulary.from_text("bcc")
    u = a.union(b)
    assert u.chars[: len(a)] == a.chars and set(u.chars) == {"a", "b", "c"}
