"""Verse structure of a text (lines, stanzas, metre proxies, rhyme) and how far two texts differ.

A model can copy nothing and still miss the shape of its training text: prose-length lines, no
stanza breaks, no rhyme. `structure_stats` measures that shape and `structure_distance` compares a
generated text's shape with the training text's, giving one summary number to plot against the
sampling temperature.

Definitions (all on text split on "\\n"):

* a line is *non-empty* if it is not blank after `str.strip`; only non-empty lines are measured,
  and they are measured stripped (indentation is layout, not verse);
* a *stanza* is a maximal group of non-empty lines; one or more blank lines separate stanzas;
* *syllables* are approximated by vowel letters (Russian "аеёиоуыэюя", English "aeiouy",
  case-insensitive): exact for Russian, rough for English, and cheap;
* the *ending* of a line is its last character, after skipping closing quotes and brackets, if it
  is one of `END_PUNCTUATION`, else "none";
* *rhyme*: see `rhyme_key`; a line rhymes if a line one or two places away in the same stanza has
  the same key and a different last word (couplets, and alternate rhyme as in ABAB).

Distances are total variation, ``0.5 * sum |p - q|`` over normalised histograms: bounded in
[0, 1], readable as "share of probability mass that would have to move", and, unlike
Kullback-Leibler, finite when one text has line lengths the other never has.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

VOWELS = frozenset("аеёиоуыэюяaeiouy")
END_PUNCTUATION = frozenset(",.!?;:—–-…")
# Skipped before reading a line's final mark, so that «...прочь!» ends in "!" not "»".
_CLOSERS = "\"'»”’)]"
_WORD = re.compile(r"\w+")
_LETTERS = re.compile(r"[^\W\d_]+")


def rhyme_key(word: str) -> str | None:
    """The ending that decides rhyme: from the last vowel on, with the letter before a final vowel.

    ``правил`` -> ``ил``, ``наука`` -> ``ка``, ``night`` -> ``ight``, ``day`` -> ``ay``.
    Returns None for a word with no vowel. A bare final vowel is extended by one letter because
    "-а" alone would make most Russian feminine nouns rhyme, while "-ка" is what a reader hears. A
    closed syllable is not extended: it would split true rhymes such as отец/наконец or мил/сменил.
    On Onegin this finds 0.70 of lines rhyming against 0.04 once the lines are shuffled (always
    extending suffixes under three letters found 0.47 against 0.02). Crude (English silent "e",
    unknown stress), but equally crude for generated and training text, which a comparison needs.
    """
    word = word.lower()
    last = max((i for i, ch in enumerate(word) if ch in VOWELS), default=-1)
    if last < 0:
        return None
    if last == len(word) - 1 and last > 0:
        last -= 1
    return word[last:]


def _last_word(line: str) -> str | None:
    words = _LETTERS.findall(line.lower())
    return words[-1] if words else None


def _ending(line: str) -> str:
    """The line's final punctuation mark, or "none"."""
    tail = line.rstrip(_CLOSERS)
    return tail[-1] if tail and tail[-1] in END_PUNCTUATION else "none"


def _starts_upper(line: str) -> bool:
    """Whether the first letter or digit of the line is an uppercase letter."""
    first = next((ch for ch in line if ch.isalnum()), "")
    return first.isupper()


def _stanzas(text: str) -> list[list[str]]:
    """Stripped non-empty lines, grouped into stanzas."""
    stanzas: list[list[str]] = []
    current: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if line:
            current.append(line)
        elif current:
            stanzas.append(current)
            current = []
    if current:
        stanzas.append(current)
    return stanzas


def _rhyming_lines(stanza: list[str]) -> int:
    """How many lines of the stanza rhyme with a line one or two places away."""
    words = [_last_word(line) for line in stanza]
    keys = [rhyme_key(word) if word else None for word in words]
    count = 0
    for i, key in enumerate(keys):
        if key is None:
            continue
        partners = (j for j in (i - 2, i - 1, i + 1, i + 2) if 0 <= j < len(keys))
        # A repeated word is a refrain, not a rhyme.
        if any(keys[j] == key and words[j] != words[i] for j in partners):
            count += 1
    return count


def _histogram(values: Iterable[Any]) -> dict[Any, int]:
    return dict(sorted(Counter(values).items()))


def _mean(histogram: Mapping[int, int]) -> float | None:
    total = sum(histogram.values())
    return sum(k * v for k, v in histogram.items()) / total if total else None


@dataclass(frozen=True)
class StructureStats:
    """The shape of a text. Histograms map a value to how many lines (or stanzas) have it."""

    n_lines: int  # non-empty lines
    n_stanzas: int
    line_chars: dict[int, int]
    mean_line_chars: float | None
    line_words: dict[int, int]
    mean_line_words: float | None
    line_syllables: dict[int, int]
    mean_line_syllables: float | None
    stanza_lines: dict[int, int]
    mean_stanza_lines: float | None
    uppercase_start_share: float | None
    line_endings: dict[str, int]  # final punctuation mark (or "none") -> lines
    rhyme_rate: float | None  # share of non-empty lines that rhyme within their stanza
    char_freq: dict[str, int]  # every character except "\n" -> occurrences

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready containers (int dict keys become strings under `json.dumps`)."""
        return {
            name: dict(value) if isinstance(value, dict) else value
            for name, value in self.__dict__.items()
        }


def structure_stats(text: str) -> StructureStats:
    """Measure the line, stanza, ending and rhyme structure of `text` (see the module docstring)."""
    stanzas = _stanzas(text)
    lines = [line for stanza in stanzas for line in stanza]
    n = len(lines)
    line_chars = _histogram(len(line) for line in lines)
    line_words = _histogram(len(_WORD.findall(line)) for line in lines)
    line_syllables = _histogram(sum(ch in VOWELS for ch in line.lower()) for line in lines)
    stanza_lines = _histogram(len(stanza) for stanza in stanzas)
    rhyming = sum(_rhyming_lines(stanza) for stanza in stanzas)
    char_freq = Counter(text)
    char_freq.pop("\n", None)  # line breaks are measured as structure, not as characters
    return StructureStats(
        n_lines=n,
        n_stanzas=len(stanzas),
        line_chars=line_chars,
        mean_line_chars=_mean(line_chars),
        line_words=line_words,
        mean_line_words=_mean(line_words),
        line_syllables=line_syllables,
        mean_line_syllables=_mean(line_syllables),
        stanza_lines=stanza_lines,
        mean_stanza_lines=_mean(stanza_lines),
        uppercase_start_share=sum(map(_starts_upper, lines)) / n if n else None,
        line_endings=_histogram(map(_ending, lines)),
        rhyme_rate=rhyming / n if n else None,
        char_freq=dict(sorted(char_freq.items())),
    )


def total_variation(p: Mapping[Any, int | float], q: Mapping[Any, int | float]) -> float:
    """Total-variation distance between two histograms, each normalised to sum to one.

    Two empty histograms are identical (0.0); an empty one is as far as possible from any
    non-empty one (1.0).
    """
    p_total, q_total = sum(p.values()), sum(q.values())
    if not p_total or not q_total:
        return 0.0 if p_total == q_total else 1.0
    keys = p.keys() | q.keys()
    return 0.5 * sum(abs(p.get(k, 0) / p_total - q.get(k, 0) / q_total) for k in keys)


# The distributions whose mean distance is the summary; character frequencies are reported but
# left out of it, since they measure spelling rather than verse shape.
STRUCTURE_HISTOGRAMS = (
    "line_chars",
    "line_words",
    "line_syllables",
    "stanza_lines",
    "line_endings",
)
_SCALARS = (
    "mean_line_chars",
    "mean_line_words",
    "mean_line_syllables",
    "mean_stanza_lines",
    "uppercase_start_share",
    "rhyme_rate",
)


def _abs_diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else abs(a - b)


def structure_distance(
    generated: StructureStats, training: StructureStats
) -> dict[str, float | None]:
    """Distances between two texts' structure.

    Keys: ``<histogram>_tv`` for each histogram (total variation, including ``char_freq_tv``),
    ``<scalar>_diff`` for each mean and share (absolute difference, None if either is undefined),
    and ``structure_distance``: the mean of the five structural histogram distances (all of
    `STRUCTURE_HISTOGRAMS`, not characters), one number in [0, 1] for plotting.
    """
    tv = {
        name: total_variation(getattr(generated, name), getattr(training, name))
        for name in (*STRUCTURE_HISTOGRAMS, "char_freq")
    }
    distances: dict[str, float | None] = {f"{name}_tv": value for name, value in tv.items()}
    for name in _SCALARS:
        distances[f"{name}_diff"] = _abs_diff(getattr(generated, name), getattr(training, name))
    structural = [tv[name] for name in STRUCTURE_HISTOGRAMS]
    distances["structure_distance"] = sum(structural) / len(structural)
    return distances
