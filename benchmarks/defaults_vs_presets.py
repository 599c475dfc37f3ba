"""The plain command against the best hand preset and the lab's recipe, text by text (issue 14).

For each row it runs, one after the other on this machine, with the same budget:

- ``auto``: ``charlstm train --text TEXT --max-time B``, nothing else (the automatic choice);
- ``preset``: the best hand preset for that text, as its author tuned it (``--auto off``);
- ``lab``: ``configs/lab.toml`` (``--auto off``: the lab's recipe, the fixed defaults elsewhere);
- with ``--threads 1 --variants preset,lab``, the same on one thread: the automatic choice picks its
  thread count, so the table compares it with the better of each hand recipe's two runs,

each as its own ``charlstm`` process, and reads the full-pass validation loss of best/ from the
final metrics record, the peak RSS of the process (wait4's ru_maxrss) and the choice auto made.
Budgets are the issue's, in seconds of the reference machine (bf16 matmul peak about 890 GFLOP/s);
on another machine they are scaled by the peak measured at the start (``--scale`` overrides). All
runs print no samples (``--sample-every 0``), which only costs time and is not part of the model.

    python benchmarks/defaults_vs_presets.py                       # every row
    python benchmarks/defaults_vs_presets.py --only byron-ru --only tinyshakespeare-100
    python benchmarks/defaults_vs_presets.py --variants auto       # after a change to the rules
    python benchmarks/defaults_vs_presets.py --table               # the table of the rows so far

Rows go to benchmarks/data/defaults_vs_presets.jsonl; --table prints them as docs/benchmarks.md
shows them. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlstm.runs.metrics import outcome
from charlstm.training.autoconfig import RULES_VERSION

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).with_name("data") / "defaults_vs_presets.jsonl"
REFERENCE_PEAK = 890.0  # GFLOP/s bf16, the machine the budgets are given on
CORPORA = Path(os.environ.get("CHARLSTM_CORPORA", "/work/corpora"))

# name → (source flags, reference budget in s, preset or None)
ROWS: dict[str, tuple[list[str], float, str | None]] = {
    "byron-ru": (["--dataset", "byron-ru"], 120, "configs/byron-tuned.toml"),
    "onegin-ru": (["--dataset", "onegin-ru"], 300, "configs/onegin-300s.toml"),
    "tinyshakespeare-100": (["--dataset", "tinyshakespeare"], 100, "configs/shakespeare-100s.toml"),
    "tinyshakespeare-600": (["--dataset", "tinyshakespeare"], 600, "configs/shakespeare-600s.toml"),
    "linux-c": (["--prepared", str(CORPORA / "linux-c-prepared")], 600, None),
    # Two texts no rule or preset was made for (see docs/benchmarks.md for how to get them).
    "gpl-3": (["--text", "/usr/share/common-licenses/GPL-3"], 120, None),
    "fortunes": (["--text", str(CORPORA / "fortunes.txt")], 300, None),
    # Two more, added when rules v5 were fitted with gpl-3's help: never used to fit anything.
    "mpl-2.0": (["--text", "/usr/share/common-licenses/MPL-2.0"], 120, None),
    "argparse-py": (["--text", "/usr/lib/python3.11/argparse.py"], 300, None),
}


def _cpu() -> str:
    out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    keep = ("Model name", "CPU family", "Model:")
    return "; ".join(" ".join(line.split()) for line in out.splitlines() if line.startswith(keep))


def _peak() -> float:
    """The bf16 matmul peak as the workplace's tool measures it (the figure the issue's budgets
    are scaled by), else charlstm's own measurement."""
    tool = ROOT.parent / "shared" / "tools" / "matmul_peak.py"
    if tool.is_file():
        out = subprocess.run(
            [sys.executable, str(tool), "bf16"], check=True, capture_output=True, text=True
        )
        return float(out.stdout.split()[-1])
    from charlstm.bench.training import matmul_gflops

    return matmul_gflops("bf16")


def _run(args: list[str], out: Path) -> dict:
    """One `charlstm train` process: its final record, peak RSS, wall time and auto's line."""
    cmd = [sys.executable, "-m", "charlstm", "train", *args, "--out", str(out), "--no-progress"]
    cmd += ["--sample-every", "0", "--force"]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
    auto = next((line for line in text.splitlines() if "charlstm: auto:" in line), "")
    return {
        **outcome(out / "metrics.jsonl"),
        "rss_mb": round(usage.ru_maxrss / 1024),
        "wall_s": round(time.monotonic() - start, 1),
        "auto": auto.split("auto: ", 1)[-1] if auto else None,
    }


def run_rows(
    names: list[str], scale: float | None, threads: int | None, variants: set[str]
) -> None:
    peak = _peak()
    factor = scale if scale is not None else REFERENCE_PEAK / peak
    machine = {
        "cpu": _cpu(),
        "bf16_peak_gflops": round(peak, 1),
        "python": platform.python_version(),
    }
    print(json.dumps(machine), flush=True)
    DATA.parent.mkdir(exist_ok=True)
    extra = ["--threads", str(threads)] if threads else []
    for name in names:
        source, ref_budget, preset = ROWS[name]
        budget = round(ref_budget * factor, 1)
        row = {
            "date": time.strftime("%Y-%m-%d"),
            **machine,
            "row": name,
            "budget_ref_s": ref_budget,
            "budget_s": budget,
            "threads": threads,
        }
        with tempfile.TemporaryDirectory() as tmp:
            plain = [*source, "--max-time", str(budget), *extra]
            tag = f"@{threads}t" if threads else ""  # a run with its thread count fixed
            if "auto" in variants:  # with the version of the rules that made its choice
                row["auto" + tag] = {**_run(plain, Path(tmp) / "auto"), "rules": RULES_VERSION}
            if preset and "preset" in variants:
                row["preset_file"] = preset
                row["preset" + tag] = _run(
                    ["--config", preset, *plain, "--auto", "off"], Path(tmp) / "preset"
                )
            if "lab" in variants:
                row["lab" + tag] = _run(
                    ["--config", "configs/lab.toml", *plain, "--auto", "off"], Path(tmp) / "lab"
                )
        with DATA.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps(row, ensure_ascii=False), flush=True)
    print(f"bf16 peak at the end: {_peak():.0f} GFLOP/s (at the start {peak:.0f})", flush=True)


def table() -> None:
    merged: dict[str, dict] = {}  # each row's latest run of each variant (a rerun replaces one)
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line:
            record = json.loads(line)
            merged.setdefault(record["row"], {}).update(record)
    rows = list(merged.values())
    print(
        "| text | budget (reference → here) | auto | best preset | auto / preset | best lab | "
        "auto vs lab | lab as shipped | auto vs it | rules | auto's choice | peak RSS (auto) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def best(r: dict, name: str) -> tuple[float | None, str]:
        """The better of the runs of `name` on all cores and on a fixed thread count."""
        runs = [(v["best_val_loss"], k) for k, v in r.items() if k.split("@")[0] == name]
        if not runs:
            return None, ""
        loss, key = min(runs)
        return loss, key.partition("@")[2] or "all cores"

    for r in rows:
        a = r["auto"]["best_val_loss"]
        p, p_how = best(r, "preset")
        lab, lab_how = best(r, "lab")
        ratio = f"{a / p:.3f}" if p else "—"
        shipped = r.get("lab", {}).get("best_val_loss")  # configs/lab.toml as it is: all cores
        vs_shipped = f"{shipped:.4f} | {100 * (a / shipped - 1):+.1f}%" if shipped else "— | —"
        choice = (r["auto"]["auto"] or "").split("→ ", 1)[-1]
        print(
            f"| {r['row']} | {r['budget_ref_s']} → {r['budget_s']} s | {a:.4f} | "
            f"{f'{p:.4f} ({p_how})' if p else '—'} | {ratio} | {lab:.4f} ({lab_how}) | "
            f"{100 * (a / lab - 1):+.1f}% | {vs_shipped} | "
            f"v{r['auto'].get('rules', r.get('rules', '4'))} | "
            f"{choice} | {r['auto']['rss_mb']} MB |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(ROWS), help="rows to run")
    ap.add_argument("--scale", type=float, help="budget factor (default 890 / measured peak)")
    ap.add_argument("--threads", type=int, help="torch threads of every run (default: all)")
    ap.add_argument("--table", action="store_true", help="print the rows so far as a table")
    ap.add_argument(
        "--variants",
        default="auto,preset,lab",
        help="which of auto, preset and lab to run (e.g. auto, after a change to the rules)",
    )
    args = ap.parse_args()
    if args.table:
        table()
        return
    run_rows(args.only or list(ROWS), args.scale, args.threads, set(args.variants.split(",")))


if __name__ == "__main__":
    main()
