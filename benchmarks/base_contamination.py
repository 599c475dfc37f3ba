"""The proof that no base corpus holds a benchmark text: the longest span each base corpus shares
with byron-ru, onegin-ru and tinyshakespeare, by the memorisation analysis (issue 22).

Building a base corpus cuts every line that shares 50 characters with a benchmark text
(data/basecorpus.py, by hashing). This checks the result with the analysis's own code: the suffix
array of each benchmark text (`analysis.memorisation.CorpusIndex`) and the matching statistics of
the base corpus against it, which give the longest shared span exactly. Matching all of a
38 M-character corpus takes tens of minutes, so it reads only the stretches around every window of
`SEED` characters that the benchmark text also has (found by hashing): a shared span of `SEED` or
more characters always contains such a window, so every span that long is measured exactly; when
none is found, the longest shared span is shorter than `SEED`.

    python benchmarks/base_contamination.py               # both base corpora (built if needed)
    python benchmarks/base_contamination.py --only base-ru

The rows go to benchmarks/data/base_contamination.jsonl; the model cards quote them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from charlstm.analysis.memorisation import CorpusIndex, matching_statistics
from charlstm.data import basecorpus, datasets
from charlstm.textutil import normalise_newlines

DATA = Path(__file__).with_name("data") / "base_contamination.jsonl"
SEED = 20  # characters: every shared span this long or longer is found and measured exactly
MARGIN = 200  # characters read on each side of a seed window


def longest_shared(index: CorpusIndex, text: str) -> tuple[int, int]:
    """(length, position in `text`) of the longest span of `text` that occurs in the index, when it
    is at least SEED characters long; (0, 0) when none is."""
    seeds = np.unique(basecorpus.span_hashes(basecorpus._codes(index.text), SEED))
    hits = np.flatnonzero(
        basecorpus._member(basecorpus.span_hashes(basecorpus._codes(text), SEED), seeds)
    )
    best, where = 0, 0
    if not len(hits):
        return best, where
    # Stretches around the hits, merged where they touch.
    breaks = np.flatnonzero(np.diff(hits) > 2 * MARGIN) + 1
    for run in np.split(hits, breaks):
        begin = max(0, int(run[0]) - MARGIN)
        end = min(len(text), int(run[-1]) + SEED + MARGIN)
        ms = matching_statistics(index, text[begin:end])
        at = int(np.argmax(ms))
        if ms[at] > best:
            best, where = int(ms[at]), begin + at
    return best, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(basecorpus.BASE_CORPORA))
    args = ap.parse_args()
    DATA.parent.mkdir(exist_ok=True)
    for name in args.only or list(basecorpus.BASE_CORPORA):
        text, _ = basecorpus.load(name)
        sha = basecorpus.built_meta(name)["sha256"]
        for bench in basecorpus.get_base_corpus(name).excluded:
            start = time.monotonic()
            data, _ = datasets.read_dataset(bench, progress=False)
            index = CorpusIndex(normalise_newlines(data.decode("utf-8")))
            length, where = longest_shared(index, text)
            row = {
                "date": time.strftime("%Y-%m-%d"),
                "base_corpus": name,
                "corpus_sha256": sha,
                "characters": len(text),
                "benchmark": bench,
                "longest_shared_span": length if length else f"< {SEED}",
                "at": where,
                "span": text[where : where + length],
                "seconds": round(time.monotonic() - start, 1),
            }
            print(json.dumps(row, ensure_ascii=False), flush=True)
            with DATA.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
