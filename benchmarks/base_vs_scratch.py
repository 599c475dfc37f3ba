"""The plain command against itself with --base none, text by text, same budget, same machine
(issue 22): what starting from a shipped base model buys, and what it costs.

For each row it runs, one after the other:

- ``auto``: ``charlstm train --dataset NAME --max-time B`` (or ``--text FILE``), nothing else: the
  run decides whether to start from a base (training/bases.py);
- ``none``: the same with ``--base none``: from scratch, the automatic configuration as before;
- ``forced`` (rows that name a base, when the rule declined it): the same with ``--base NAME``,
  to see what the declined base would have reached,

each as its own ``charlstm`` process (after a 2-second run from scratch that warms the calibration
cache, so that neither pays for the other's measurements), and records the full-pass validation
loss of best/, the base decision line, the wall time, the time until the first training step
(start-up: reading the text, probing the bases, calibrating) and the peak RSS. With ``--samples``
it also analyses what the ``auto`` run generates at T = 0.5 (`charlstm analyze`: real words,
copies of the training text and of the base corpus).

Budgets are the issue's, in seconds of the reference machine (2-core Zen 5), times the ``scale``
printed by ``../shared/tools/machine_scale.py`` (measured at the start unless ``--scale`` is given).

    python benchmarks/base_vs_scratch.py                    # every row
    python benchmarks/base_vs_scratch.py --only byron-ru --samples
    python benchmarks/base_vs_scratch.py --table            # the rows so far, as a table

Rows go to benchmarks/data/base_vs_scratch.jsonl. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlstm.runs.metrics import outcome
from charlstm.training.bases import RULES_VERSION

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).with_name("data") / "base_vs_scratch.jsonl"
CORPORA = Path(os.environ.get("CHARLSTM_CORPORA", "/work/corpora"))

# name → (source flags, reference budget in s, what the issue asks of the row[, a base to force])
ROWS: dict[str, tuple] = {
    "byron-ru": (["--dataset", "byron-ru"], 120, "validation ≤ 1.75"),
    "onegin-ru": (["--dataset", "onegin-ru"], 300, "≥ 10% below --base none"),
    "gpl-3": (["--text", "/usr/share/common-licenses/GPL-3"], 120, "≥ 10% below --base none"),
    "tinyshakespeare": (["--dataset", "tinyshakespeare"], 600, "not worse than --base none", "en"),
    # Two small texts in languages with no base (docs/benchmarks.md says how to get them): German
    # in the Latin script the English base reads, and Slovak, whose letters it mostly lacks.
    "de-infodrom": (["--text", str(CORPORA / "de-infodrom.txt")], 120, "within 1%, no slower"),
    "sk-hviezdoslav": (
        ["--text", str(CORPORA / "sk-hviezdoslav-1869")],
        120,
        "within 1%, no slower",
    ),
    # The sweep the rule was read from (not targets): sizes and budgets around the crossover.
    "tinyshakespeare-100": (["--dataset", "tinyshakespeare"], 100, "sweep", "en"),
    "tinyshakespeare-300": (["--dataset", "tinyshakespeare"], 300, "sweep", "en"),
    "byron-ru-60": (["--dataset", "byron-ru"], 60, "sweep"),
    "onegin-ru-60": (["--dataset", "onegin-ru"], 60, "sweep"),
}
STARTED = re.compile(r"train / [\d,]+ validation characters")


def _cpu() -> str:
    out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    keep = ("Model name", "CPU family", "Model:")
    return "; ".join(" ".join(line.split()) for line in out.splitlines() if line.startswith(keep))


def machine_scale() -> dict:
    """The workplace's measure of this machine against the reference (its JSON line)."""
    tool = ROOT.parent / "shared" / "tools" / "machine_scale.py"
    out = subprocess.run([sys.executable, str(tool)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train(args: list[str], out: Path) -> dict:
    """One `charlstm train` process: its outcome, base decision, start-up and wall time, RSS."""
    cmd = [sys.executable, "-m", "charlstm", "train", *args, "--out", str(out), "--no-progress"]
    cmd += ["--sample-every", "0", "--force"]
    start = time.monotonic()
    started, lines = None, []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    for line in proc.stderr:  # the log: the line naming the split comes just before step 1
        lines.append(line)
        if started is None and STARTED.search(line):
            started = round(time.monotonic() - start, 2)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    log = "".join(lines)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{log[-2000:]}")
    base = next((ln for ln in log.splitlines() if ln.startswith("charlstm: base:")), "")
    auto = next((ln for ln in log.splitlines() if ln.startswith("charlstm: auto:")), "")
    return {
        **outcome(out / "metrics.jsonl"),
        "wall_s": round(time.monotonic() - start, 1),
        "startup_s": started,
        "rss_mb": round(usage.ru_maxrss / 1024),
        "base": base.removeprefix("charlstm: base: ") or None,
        "auto": auto.removeprefix("charlstm: auto: ") or None,
    }


def analyse(run: Path) -> dict:
    """What the run generates at T = 0.5 from best/ (what `charlstm generate` samples from):
    `charlstm analyze`'s figures as JSON."""
    cmd = [sys.executable, "-m", "charlstm", "analyze", str(run), "--temperatures", "0.5"]
    cmd += ["--which", "best"]
    cmd += ["--samples", "8", "--length", "1000", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def run_rows(names: list[str], scale: float | None, samples: bool, keep: Path | None) -> None:
    measured = machine_scale()
    factor = scale if scale is not None else measured["scale"]
    machine = {"cpu": _cpu(), "machine_scale": measured, "python": platform.python_version()}
    print(json.dumps(machine), flush=True)
    DATA.parent.mkdir(exist_ok=True)
    for name in names:
        source, ref_budget, target, *forced = ROWS[name]
        budget = round(ref_budget * factor, 1)
        row = {
            "date": time.strftime("%Y-%m-%d"),
            **machine,
            "row": name,
            "target": target,
            "budget_ref_s": ref_budget,
            "budget_s": budget,
            "rules": RULES_VERSION,
            "commit": _commit(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            folder = keep / name if keep else Path(tmp)
            plain = [*source, "--max-time", str(budget)]
            # A short run first, not recorded: it fills the calibration cache with the shapes
            # this text's runs measure, so that the first recorded run does not pay for what the
            # second then reads from the cache (a start-up gap of 1-2.5 s that was the order's).
            run_train([*source, "--max-time", "2", "--base", "none"], folder / "warm-up")
            row["auto"] = run_train(plain, folder / "auto")
            row["none"] = run_train([*plain, "--base", "none"], folder / "none")
            took = (row["auto"]["base"] or "").split(" (")[0]
            if forced and took != forced[0]:  # declined: what the base would have given
                row["forced"] = run_train([*plain, "--base", forced[0]], folder / "forced")
            if samples:  # a failed analysis must not lose the runs' figures
                try:
                    row["auto"]["analysis"] = analyse(folder / "auto")
                except subprocess.CalledProcessError as exc:
                    row["auto"]["analysis"] = {"error": exc.stderr[-500:]}
        with DATA.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps(row, ensure_ascii=False), flush=True)


def _commit() -> str:
    """The code measured: the checkout's commit, marked when it has changes of its own."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "src"], check=False, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def table() -> None:
    latest: dict[str, dict] = {}
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line:
            record = json.loads(line)
            latest[record["row"]] = record
    print(
        "| text | budget (reference → here) | plain command | --base none | change | target | "
        "base chosen | base forced | wall (plain / none) | start-up (plain / none) | code |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in latest.values():
        a, n = r["auto"], r["none"]
        change = 100 * (a["best_val_loss"] / n["best_val_loss"] - 1)
        chosen = (a["base"] or "").split(":")[0].split(" (")[0]
        f = r.get("forced")
        forced = f"{f['best_val_loss']:.4f} ({f['base'].split(' (')[0]})" if f else "-"
        print(
            f"| {r['row']} | {r['budget_ref_s']} → {r['budget_s']} s | {a['best_val_loss']:.4f} | "
            f"{n['best_val_loss']:.4f} | {change:+.1f}% | {r['target']} | {chosen} | {forced} | "
            f"{a['wall_s']:.0f} / {n['wall_s']:.0f} s | {a['startup_s']} / {n['startup_s']} s | "
            f"{r.get('commit', '5cbd0f7')} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(ROWS), help="rows to run")
    ap.add_argument("--scale", type=float, help="budget factor (default: machine_scale.py's)")
    ap.add_argument("--samples", action="store_true", help="analyse the plain run's samples")
    ap.add_argument("--keep", type=Path, help="keep the run folders under this folder")
    ap.add_argument("--table", action="store_true", help="print the rows so far as a table")
    args = ap.parse_args()
    if args.table:
        table()
        return
    run_rows(args.only or list(ROWS), args.scale, args.samples, args.keep)


if __name__ == "__main__":
    main()
