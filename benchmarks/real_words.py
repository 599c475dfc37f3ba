"""Check the real-word share (charlstm.analysis.words) on real and random texts, and time the
comparison with a base corpus (charlstm.analysis.largecorpus).

Real texts, each with its language detected from itself as `charlstm analyze` detects a training
text's: byron-ru and onegin-ru (whole, and page by page: pages of 1,800 characters), and
tinyshakespeare. Random texts, measured in byron-ru's language, with the number of words of
byron-ru:

- characters drawn at random with byron-ru's character frequencies (spaces and newlines included);
- word-shaped strings of random Russian letters, with the lengths of byron-ru's words;
- byron-ru's own words with their letters shuffled.

Then, when the base corpus base-ru is built on this machine, the time of one pass over it for four
texts of 8,000 characters (what `charlstm analyze` compares by default: 8 samples of 1,000
characters at 4 temperatures), byron-ru's own pages as the texts.

    python benchmarks/real_words.py [--seed S]

$CHARLSTM_DATA (default /work/shared/data) holds the corpora. Prints a Markdown table and one
JSON line of timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

PAGE = 1_800  # characters of a printed page of verse, about


def _imports():
    try:
        from charlstm.analysis import largecorpus, words
        from charlstm.data import basecorpus
    except ImportError:  # run from a checkout without installing the package
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from charlstm.analysis import largecorpus, words
        from charlstm.data import basecorpus
    return words, largecorpus, basecorpus


def random_texts(byron: str, word_list: list[str], seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    alphabet = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
    by_frequency = "".join(rng.choices(byron, k=len(byron)))
    shaped = " ".join("".join(rng.choices(alphabet, k=len(w))) for w in word_list)
    shuffled = " ".join("".join(rng.sample(w, len(w))) for w in word_list)
    return {
        "random characters, byron-ru's frequencies": by_frequency,
        "random letters in words of byron-ru's lengths": shaped,
        "byron-ru's words, letters shuffled": shuffled,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    words, largecorpus, basecorpus = _imports()
    data = Path(os.environ.get("CHARLSTM_DATA", "/work/shared/data"))

    def read(name: str) -> str:
        return (data / name).read_text(encoding="utf-8")

    byron = read("byron_ru.txt")
    ru = words.Lexicon.for_text(byron)
    rows = []

    def row(label: str, text: str, lexicon) -> None:
        counted = words.real_words(text, lexicon).to_dict()
        pages = [text[i : i + PAGE] for i in range(0, len(text) - PAGE + 1, PAGE)]
        shares = [words.real_words(p, lexicon).to_dict()["real_share"] for p in pages]
        spread = (
            f"{100 * min(shares):.1f}-{100 * max(shares):.1f}% "
            f"(median {100 * statistics.median(shares):.1f}%)"
            if shares
            else "–"
        )
        rows.append(
            f"| {label} | {lexicon.measure} | {counted['words']:,} | "
            f"{100 * counted['real_share']:.1f}% | {spread} | "
            f"{100 * counted['long_real_share']:.1f}% |"
        )

    t0 = time.perf_counter()
    for name, label in (
        ("byron_ru.txt", "byron-ru"),
        ("onegin_ru.txt", "onegin-ru"),
        ("tinyshakespeare.txt", "tinyshakespeare"),
    ):
        text = read(name)
        row(label, text, words.Lexicon.for_text(text))
    for label, text in random_texts(byron, words.words(byron), args.seed).items():
        row(label, text, ru)
    words_s = time.perf_counter() - t0

    print(
        "| text | measure | words | real words | page by page | real words of ≥ 4 letters |\n"
        "|---|---|---|---|---|---|"
    )
    print("\n".join(rows))

    timings: dict[str, float | str] = {"words_s": round(words_s, 2)}
    if basecorpus.built_meta("base-ru") is None:
        timings["base"] = "base-ru is not built here: no timing"
    else:
        t0 = time.perf_counter()
        base, _ = basecorpus.load("base-ru", allow_download=False)
        t1 = time.perf_counter()
        texts = [byron[k * 2_000 : k * 2_000 + 8_000] for k in range(4)]
        ms = largecorpus.matching_statistics(base, texts)
        t2 = time.perf_counter()
        timings.update(
            base_chars=len(base),
            base_load_s=round(t1 - t0, 2),
            base_pass_s=round(t2 - t1, 2),
            longest_in_base=[int(m.max()) for m in ms],
        )
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
