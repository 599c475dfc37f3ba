"""Side-by-side runs of the plain command and variants of it: how rules v5 were chosen.

The sweep (autoconfig_sweep.py) moves the automatic choice one width or one regularisation row at
a time. Some questions are not a neighbour of the choice: is the learning rate right, is a
threshold in the right place? This script answers them directly: it trains `charlstm train` on one
text and budget with each variant's extra flags (an empty variant is the plain command), two at a
time with `--pairs`, each pinned to its own core and one thread, so that both arms of a comparison
share the machine's conditions. Each run is a row of benchmarks/data/autoconfig_ab.jsonl: the text,
budget, flags, the choice auto made around them, the steps, and the full-pass validation loss of
best/.

    python benchmarks/autoconfig_ab.py --name gpl-3 --budget 43.1 \\
        --source "--text /usr/share/common-licenses/GPL-3" \\
        --variant "rules=" --variant "light=--hidden-size 256 --dropout 0.2 ..." --pairs
    python benchmarks/autoconfig_ab.py --summary

Budgets here are seconds on this machine, not scaled: both arms of a pair get the same seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlstm.runs.metrics import outcome

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).with_name("data") / "autoconfig_ab.jsonl"


def _cpu() -> str:
    out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    keep = ("Model name", "CPU family", "Model:")
    return "; ".join(" ".join(line.split()) for line in out.splitlines() if line.startswith(keep))


def _start(source: list[str], flags: list[str], budget: float, core: int | None, out: Path):
    cmd = [sys.executable, "-m", "charlstm", "train", *source, *flags, "--max-time", str(budget)]
    cmd += ["--out", str(out), "--force", "--sample-every", "0", "--no-progress"]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd, "--threads", "1"]
    log = open(out.with_suffix(".log"), "w+")  # noqa: SIM115 (closed in _result)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log


def _result(proc, log, out: Path) -> dict:
    proc.wait()
    log.seek(0)
    text = log.read()
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"a run failed ({proc.returncode}):\n{text[-2000:]}")
    auto = next((line for line in text.splitlines() if "charlstm: auto:" in line), "")
    return {
        **outcome(out / "metrics.jsonl"),
        "auto": auto.split("auto: ", 1)[-1] if auto else None,
    }


def run(
    name: str, source: str, budget: float, variants: list[str], pairs: bool, keep: Path | None
) -> None:
    parsed = [v.split("=", 1) for v in variants]
    from charlstm.training.autoconfig import RULES_VERSION

    base = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "text": name, "budget_s": budget}
    base["rules"] = RULES_VERSION
    with tempfile.TemporaryDirectory() as scratch:
        tmp = keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        step = 2 if pairs else 1
        for i in range(0, len(parsed), step):
            group = parsed[i : i + step]
            started = []
            for j, (label, flags) in enumerate(group):
                out = tmp / (label if keep else f"{i + j}")
                core = j if pairs else None
                started.append(
                    (
                        label,
                        flags,
                        out,
                        *_start(shlex.split(source), shlex.split(flags), budget, core, out),
                    )
                )
            for label, flags, out, proc, log in started:
                row = {**base, "variant": label, "flags": flags, "pinned": pairs}
                row.update(_result(proc, log, out))
                print(json.dumps(row), flush=True)
                DATA.parent.mkdir(exist_ok=True)
                with DATA.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")


def summary() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    print("| text | budget | variant | flags | loss | steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        flags = r["flags"] or "(the plain command)"
        print(
            f"| {r['text']} | {r['budget_s']:g} s | {r['variant']} | `{flags}` | "
            f"{r['best_val_loss']:.4f} | {r['steps']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", help="the text's label in the rows")
    ap.add_argument("--source", help='the text flags, e.g. "--dataset byron-ru"')
    ap.add_argument("--budget", type=float, help="seconds of every run")
    ap.add_argument("--variant", action="append", default=[], help="LABEL=FLAGS (may be empty)")
    ap.add_argument("--pairs", action="store_true", help="two runs at a time, one per core")
    ap.add_argument("--summary", action="store_true", help="print the rows so far")
    ap.add_argument("--keep", type=Path, help="keep the run folders here, named by variant")
    args = ap.parse_args()
    if args.summary:
        summary()
        return
    if not (args.name and args.source and args.budget and args.variant):
        ap.error("--name, --source, --budget and at least one --variant are needed")
    os.environ.setdefault("CHARLSTM_DATA", str(ROOT.parent / "shared" / "data"))
    run(args.name, args.source, args.budget, args.variant, args.pairs, args.keep)


if __name__ == "__main__":
    main()
