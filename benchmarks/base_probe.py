"""What the base probe reads on each text, on its first look and whole (issue 22).

For every text and every shipped base that covers it (`training/bases.py`: `coverage`), prints the
base's loss on `probe_slice(text, PROBE_FIRST)` and on `probe_slice(text)` (PROBE_CHARS), and the
seconds each took. The first look is where a text in another language is turned away: its loss
must sit well above LANGUAGE_LOSS + FIRST_MARGIN for texts in other languages and well below it for
texts in the base's own.

    python benchmarks/base_probe.py                    # the benchmark texts and GPL-3
    python benchmarks/base_probe.py --text FILE ...    # others (CHARLSTM_CORPORA: de, sk)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from charlstm.data.corpus import load_documents
from charlstm.runs import bases as shipped
from charlstm.training import bases

DATASETS = ("byron-ru", "onegin-ru", "tinyshakespeare")
TEXTS = ("/usr/share/common-licenses/GPL-3",)


def timed_loss(ck, text: str) -> tuple[float, float]:
    start = time.perf_counter()
    loss = bases.base_loss(ck, text)
    return loss, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", action="append", default=[], help="more text files or folders")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the probe runs before a run chooses its threads
    sources = [(name, None) for name in DATASETS] + [(None, t) for t in [*TEXTS, *args.text]]
    checkpoints = {b.name: shipped.read_base(b.name) for b in shipped.available()}
    for dataset, path in sources:
        text = load_documents(dataset, [path] if path else None).text
        text = text[: int(0.9 * len(text))]  # the training part, as a run's probe reads
        for name, ck in checkpoints.items():
            row = {"text": dataset or Path(path).name, "base": name}
            row["coverage"] = round(bases.coverage(ck.vocab, text), 4)
            if row["coverage"] >= bases.MIN_COVERAGE:
                for label, chars in (("first", bases.PROBE_FIRST), ("whole", bases.PROBE_CHARS)):
                    loss, seconds = timed_loss(ck, bases.probe_slice(text, chars))
                    row[label] = {"loss": round(loss, 3), "seconds": round(seconds, 2)}
            print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
