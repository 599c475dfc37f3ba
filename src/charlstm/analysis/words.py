"""Real words: the share of a text's words that are words of its language.

A **word** is what a reader would call one: a run of letters (with their combining marks), which
may hold an apostrophe or a hyphen between letters ("don't", "по-русски"). Digits split words and
are no words themselves, and so is punctuation, a dash included.

A word is **real** when the word list of the `wordfreq` package knows it in the language:
``zipf_frequency(word, language) > 0``. The lists (hundreds of thousands of words per language,
from Wikipedia, subtitles, books, news and the web) ship inside the package, so nothing is
downloaded. The look-up ignores case (wordfreq folds it), so "Мне" at the start of a line is the
word "мне". A capitalised word the list does not know is *not* excused as a name: a model's
made-up words are as often capitalised as not, and excusing them would hide them; the names that
the lists know (Байрон, Гарольд, Онегин, Татьяна) count like other words. Stress marks (a
combining acute or grave accent, as in "за́мок") are dropped before the look-up. A hyphenated word
is real when every part of it is (wordfreq splits it). By this rule the words of byron-ru are 97.4%
real and those of onegin-ru 97.2% (docs/benchmarks.md): the rest are archaic forms ("осьмнадцать")
and rare names.

The **language** is the run's base language when the run starts from a base model. Otherwise it is
detected from the training text: among wordfreq's languages written in the text's main script,
the one whose list knows the largest share of the training text's words, if that share is at least
`DETECT_SHARE`. Otherwise the language is unknown, and a generated word counts as real when it
occurs in the training text (without case or stress marks). Which of the two measures was used
is always reported.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

DETECT_SHARE = 0.8  # a language is detected when its list knows this share of the training words
DETECT_CHARS = 200_000  # characters of the training text read to detect its language
DETECT_PIECES = 20  # ... in this many evenly spaced stretches
TRAINING_TEXT = "training text"  # the measure's name when the language is unknown
EXAMPLES = 10  # made-up words listed in a report
LONG_WORD = 4  # letters: the share among words this long is also given (see `RealWords`)

_JOINERS = "'’ʼ-‐‑"  # apostrophes and hyphens, which join letters into one word
_STRESS = str.maketrans("", "", "\u0300\u0301")

# wordfreq's languages by the script they are written in (Chinese and Japanese are left out: their
# words are not separated by spaces, and wordfreq needs extra packages to cut them).
_LATIN = "en de fr es it pt nl sv nb da fi pl cs sk sl sh hu ro tr lt lv is ca id ms vi fil"
SCRIPT_LANGUAGES: dict[str, tuple[str, ...]] = {
    "LATIN": tuple(_LATIN.split()),
    "CYRILLIC": ("ru", "uk", "bg", "mk"),
    "GREEK": ("el",),
    "ARABIC": ("ar", "fa", "ur"),
    "HEBREW": ("he",),
    "DEVANAGARI": ("hi",),
    "BENGALI": ("bn",),
    "TAMIL": ("ta",),
    "HANGUL": ("ko",),
}


@cache
def _word_pattern() -> re.Pattern[str]:
    """Letters, each with its combining marks (stress marks, the vowel signs of Indian scripts),
    joined by apostrophes and hyphens. Python's ``\\w`` has no class for the marks, so it is built
    from the Unicode database, once (planes 0 and 1 and the variation selectors: about 0.1 s)."""
    codes = [*range(0x20000), *range(0xE0100, 0xE01F0)]
    marks = [c for c in codes if unicodedata.category(chr(c)).startswith("M")]
    ranges, start = [], marks[0]
    for prev, c in itertools.pairwise([*marks, -1]):
        if c != prev + 1:
            ranges.append(f"{chr(start)}-{chr(prev)}")
            start = c
    letter = rf"[^\W\d_][{''.join(ranges)}]*"
    return re.compile(rf"(?:{letter})+(?:[{re.escape(_JOINERS)}](?:{letter})+)*")


def _letters(word: str) -> int:
    return sum(ch.isalpha() for ch in word)


def words(text: str) -> list[str]:
    """The words of `text` in order, as written (see the module docstring)."""
    return _word_pattern().findall(text)


def main_script(text: str) -> str | None:
    """The script most of the text's letters are written in ("LATIN", "CYRILLIC", ...), from the
    first word of their Unicode names; None for a text without letters."""
    scripts: Counter[str] = Counter()
    for ch, n in Counter(text).items():
        if ch.isalpha():
            scripts[unicodedata.name(ch, "?").split(" ")[0]] += n
    return scripts.most_common(1)[0][0] if scripts else None


def _folded(word: str) -> str:
    """The word as it is looked up: lower case, without stress marks."""
    return word.lower().translate(_STRESS)


def _known(word: str, language: str) -> bool:
    from wordfreq import zipf_frequency  # its lists load on first use, one language at a time

    return zipf_frequency(word.translate(_STRESS), language) > 0


def known_share(tokens: Iterable[str], language: str) -> float | None:
    """Share of the word tokens (repeats counted) that wordfreq knows in `language`; None for
    none."""
    counts = Counter(tokens)
    total = sum(counts.values())
    if not total:
        return None
    return sum(n for w, n in counts.items() if _known(w, language)) / total


def _sample(text: str, chars: int = DETECT_CHARS, pieces: int = DETECT_PIECES) -> str:
    """`text` if short, else `pieces` evenly spaced stretches of it, `chars` in all."""
    if len(text) <= chars:
        return text
    step, size = len(text) // pieces, chars // pieces
    return "\n".join(text[k * step : k * step + size] for k in range(pieces))


def _small_list_share(tokens: Counter[str], language: str) -> float:
    """Share of the tokens in wordfreq's small list of `language` (its most common words, quick
    to load): enough to rank candidate languages, not to measure one."""
    from wordfreq import get_frequency_dict

    small = get_frequency_dict(language, wordlist="small")
    known = sum(n for w, n in tokens.items() if _folded(w) in small)
    return known / sum(tokens.values())


def best_language(text: str) -> tuple[str | None, float | None]:
    """The language whose word list knows most of the text's words, among wordfreq's languages
    written in the text's main script, and the share it knows; (None, None) without words or
    candidates.

    The candidates are ranked on wordfreq's small lists (each loads in milliseconds, where a full
    list takes up to a second), and the first is measured on its full list, as `known_share`
    measures generated words."""
    sample = _sample(text)
    tokens = Counter(words(sample))
    candidates = SCRIPT_LANGUAGES.get(main_script(sample) or "", ())
    if not tokens or not candidates:
        return None, None
    best = max(candidates, key=lambda lang: _small_list_share(tokens, lang))
    return best, known_share(tokens.elements(), best)


@dataclass(frozen=True)
class Lexicon:
    """What generated words are checked against: a language's word list, or the training text's
    words when the language is unknown."""

    measure: str  # a wordfreq language code, or TRAINING_TEXT
    how: str  # "base" (the run's base model's language), "detected" or "unknown"
    language: str | None  # the base's language, or the best candidate found in the training text
    language_share: float | None  # share of the training text's words known in `language`
    training_words: frozenset[str] = frozenset()  # `_folded`; for TRAINING_TEXT only

    @classmethod
    def for_text(cls, training_text: str, language: str | None = None) -> Lexicon:
        """The lexicon of a run: `language` if given (its base model's), else the language
        detected in the training text, else the training text's own words."""
        if language is not None:
            share = known_share(words(_sample(training_text)), language)
            return cls(language, "base", language, share)
        best, share = best_language(training_text)
        if best is not None and share is not None and share >= DETECT_SHARE:
            return cls(best, "detected", best, share)
        vocabulary = frozenset(_folded(w) for w in words(training_text))
        return cls(TRAINING_TEXT, "unknown", best, share, vocabulary)

    def is_real(self, word: str) -> bool:
        if self.measure == TRAINING_TEXT:
            return _folded(word) in self.training_words
        return _known(word, self.measure)

    def to_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "how": self.how,
            "language": self.language,
            "language_share": self.language_share,
        }


def describe(lexicon: dict[str, Any]) -> str:
    """One sentence: what "real words" means, from `Lexicon.to_dict` (as an analysis stores it)."""
    share = lexicon["language_share"]
    known = "" if share is None else f"{100 * share:.1f}%"
    if lexicon["measure"] == TRAINING_TEXT:
        best = f" (at best {known}, in {lexicon['language']!r})" if share is not None else ""
        return (
            "Real words: the share of generated words that occur in the training text, whose "
            f"language wordfreq does not know well enough{best}."
        )
    if lexicon["how"] == "base":
        why = "the base model's language"
    else:
        why = f"detected: the list knows {known} of the training text's words"
    return (
        f"Real words: the share of generated words in wordfreq's word list of "
        f"{lexicon['measure']!r} ({why})."
    )


@dataclass(frozen=True)
class RealWords:
    """How many of a text's words are real, in all and among words of `LONG_WORD` or more
    letters (a random string of letters is rarely a long word, often a short one)."""

    measure: str
    words: int
    real: int
    long_words: int
    long_real: int
    made_up: tuple[str, ...]  # the most frequent words that are not real, most frequent first

    def to_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "words": self.words,
            "real": self.real,
            "real_share": self.real / self.words if self.words else None,
            "long_words": self.long_words,
            "long_real_share": self.long_real / self.long_words if self.long_words else None,
            "made_up": list(self.made_up),
        }


def real_words(text: str, lexicon: Lexicon) -> RealWords:
    """Count the words of `text` that `lexicon` knows (each distinct word is looked up once)."""
    counts = Counter(words(text))
    real = {w for w in counts if lexicon.is_real(w)}
    long = {w for w in counts if _letters(w) >= LONG_WORD}
    made_up = Counter({w: n for w, n in counts.items() if w not in real})
    return RealWords(
        measure=lexicon.measure,
        words=sum(counts.values()),
        real=sum(counts[w] for w in real),
        long_words=sum(counts[w] for w in long),
        long_real=sum(counts[w] for w in long & real),
        made_up=tuple(w for w, _ in made_up.most_common(EXAMPLES)),
    )
