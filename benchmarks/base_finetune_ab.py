"""Fine-tuning variants side by side: pairs of `charlstm train` runs, one thread each, at the same
time, so that both of a pair share whatever else the machine is doing (issue 22's fine-tuning
settings, training/bases.py, were read off such pairs).

    python benchmarks/base_finetune_ab.py "--dataset byron-ru" 104 \
        "lr1e-4=--lr 1e-4 --min-lr 1e-5 --dropout 0.1 --ema 0.99" \
        "lr5e-4=--lr 5e-4 --min-lr 5e-5 --dropout 0.1 --ema 0.99"

Each variant is NAME=FLAGS added to ``charlstm train TEXT-FLAGS --max-time BUDGET --threads 1``;
variants run two at a time in the order given. Prints each one's best full-pass validation loss
and the step it was reached at, and appends the rows to benchmarks/data/base_finetune_ab.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from charlstm.runs.metrics import outcome

DATA = Path(__file__).with_name("data") / "base_finetune_ab.jsonl"


def launch(text: list[str], budget: str, flags: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "charlstm", "train", *text, "--out", str(out), "--force"]
    cmd += ["--no-progress", "--sample-every", "0", "--threads", "1", "--max-time", budget, *flags]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text", help='the text flags, quoted: "--dataset byron-ru"')
    ap.add_argument("budget", help="--max-time of every run")
    ap.add_argument("variants", nargs="+", help="NAME=FLAGS")
    ap.add_argument("--keep", type=Path, default=Path("runs/finetune-ab"))
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    DATA.parent.mkdir(exist_ok=True)
    for i in range(0, len(variants), 2):
        pair = variants[i : i + 2]
        procs = [
            (name, flags, launch(args.text.split(), args.budget, flags.split(), args.keep / name))
            for name, flags in pair
        ]
        for name, flags, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"{name} failed ({proc.returncode})")
            row = {
                "date": time.strftime("%Y-%m-%d"),
                "text": args.text,
                "budget_s": float(args.budget),
                "variant": name,
                "flags": flags,
                "paired_with": [n for n, _ in pair if n != name],
                **outcome(args.keep / name / "metrics.jsonl"),
                "load": os.getloadavg()[0],
            }
            print(json.dumps(row), flush=True)
            with DATA.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
