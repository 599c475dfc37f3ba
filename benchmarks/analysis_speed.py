"""Time the text analysis on tinyshakespeare: index build, memorisation report, structure stats.

The target is 100,000 generated characters analysed against the 1.1 M-character corpus in at most
10 s, index build included. The "generated" text mixes corpus excerpts of 30-200 characters with
runs of shuffled corpus words, so that both copied and novel text are present.

    python benchmarks/analysis_speed.py [CORPUS] [--chars N] [--seed S]

CORPUS defaults to $CHARLSTM_DATA/tinyshakespeare.txt, $CHARLSTM_DATA to /work/shared/data.
Prints one JSON line of timings in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

TARGET_SECONDS = 10.0


def planted_text(corpus: str, n_chars: int, seed: int) -> str:
    """`n_chars` of corpus excerpts (30-200 characters) mixed at random with shuffled words."""
    rng = random.Random(seed)
    words = corpus.split()
    parts: list[str] = []
    total = 0
    while total < n_chars:
        length = rng.randint(30, 200)
        if rng.random() < 0.5:
            start = rng.randrange(max(1, len(corpus) - length))
            part = corpus[start : start + length]
        else:
            part = ""
            while len(part) < length:
                part += rng.choice(words) + rng.choice("  \n")
        parts.append(part)
        total += len(part)
    return "".join(parts)[:n_chars]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("CHARLSTM_DATA", "/work/shared/data")) / "tinyshakespeare.txt"
    parser.add_argument("corpus", nargs="?", type=Path, default=default)
    parser.add_argument("--chars", type=int, default=100_000, help="generated characters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        from charlstm.analysis import (
            CorpusIndex,
            memorisation_report,
            structure_distance,
            structure_stats,
        )
    except ImportError:
        # Run from a checkout without installing the package.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from charlstm.analysis import (
            CorpusIndex,
            memorisation_report,
            structure_distance,
            structure_stats,
        )

    corpus = args.corpus.read_text(encoding="utf-8")
    generated = planted_text(corpus, args.chars, args.seed)

    t0 = time.perf_counter()
    index = CorpusIndex(corpus)
    t1 = time.perf_counter()
    report = memorisation_report(index, generated, ks=(20, 50))
    t2 = time.perf_counter()
    distance = structure_distance(structure_stats(generated), structure_stats(corpus))
    t3 = time.perf_counter()

    print(
        json.dumps(
            {
                "corpus": str(args.corpus),
                "corpus_chars": len(corpus),
                "generated_chars": len(generated),
                "index_build_s": round(t1 - t0, 3),
                "memorisation_report_s": round(t2 - t1, 3),
                "structure_s": round(t3 - t2, 3),  # stats of both texts + distance
                "total_s": round(t3 - t0, 3),
                "target_s": TARGET_SECONDS,
                "longest_copy": report.longest_copy_length,
                "coverage_50": report.coverage[50],
                "structure_distance": round(distance["structure_distance"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
