"""The sweep the automatic configuration's rules are read from (training/autoconfig.py).

For each text and budget it trains the automatic choice and its neighbours, one after the other on
the same machine: one width narrower and one wider (batch, regularisation and schedule re-derived
for that width), one regularisation row lighter and one heavier, and optionally half and twice the
batch. A rule is right for a cell when no neighbour beats its choice; a neighbour that wins says
which constant to move and which way. Each run is a row of benchmarks/data/autoconfig_sweep.jsonl
(text, its size, budget, threads, CPU, matmul peak, the variant, its model and batch, the characters
it processed, passes over the text, and the full-pass validation loss of best/).

    python benchmarks/autoconfig_sweep.py --text byron=../shared/data/byron_ru.txt --budget 40
    python benchmarks/autoconfig_sweep.py --summary     # each cell: the rule's choice and the best

Run it on a quiet machine; with `taskset -c N --threads 1` two sweeps can share a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from charlstm.bench.training import matmul_gflops
from charlstm.config import RunConfig, load_toml
from charlstm.data.loading import prepare_data
from charlstm.runs.metrics import outcome, read_records
from charlstm.training import autoconfig
from charlstm.training.orchestrate import train

DATA = Path(__file__).with_name("data") / "autoconfig_sweep.jsonl"
REG_FIELDS = ("dropout", "embedding_dropout", "weight_drop", "locked_dropout", "ema")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _reg_row(config: RunConfig) -> int:
    m, o = config.model, config.optim
    now = (m.dropout, m.embedding_dropout, m.weight_drop, m.locked_dropout, o.ema)
    for i, values in enumerate(autoconfig.REGULARISATION):
        if tuple(values) == now:
            return i
    return -1


def variants(chosen: RunConfig, batch: bool) -> dict[str, dict]:
    """Explicit settings for each neighbour of the automatic choice (the rule itself: none)."""
    out: dict[str, dict] = {"rule": {}}
    widths = autoconfig.WIDTHS
    w = chosen.model.hidden_size
    i = widths.index(w) if w in widths else -1
    if i > 0:
        out["narrower"] = {"hidden_size": widths[i - 1]}
    if 0 <= i < len(widths) - 1:
        out["wider"] = {"hidden_size": widths[i + 1]}
    r = _reg_row(chosen)
    rows = autoconfig.REGULARISATION
    for name, j in (("lighter", r - 1), ("heavier", r + 1)):
        if r >= 0 and 0 <= j < len(rows):
            out[name] = dict(zip(REG_FIELDS, rows[j], strict=True))
    if batch:
        b = chosen.data.batch_size
        out["half batch"] = {"batch_size": max(1, b // 2)}
        out["twice the batch"] = {"batch_size": b * 2}
    return out


def _final_best(run: Path) -> float:
    return outcome(run / "metrics.jsonl")["best_val_loss"]


def sweep(texts: dict[str, str], budgets: list[float], threads: int, batch: bool) -> None:
    peak = matmul_gflops("bf16")
    DATA.parent.mkdir(exist_ok=True)
    for name, path in texts.items():
        for budget in budgets:
            base = RunConfig().replace(
                dataset=None, text=path, max_time=budget, threads=threads, sample_every=0
            )
            lines: list[str] = []
            n_train = len(prepare_data(base).train_ids)
            with tempfile.TemporaryDirectory() as tmp:
                rule_out = Path(tmp) / "rule"
                train(base, rule_out, progress=False, log=lines.append, explicit=set())
                chosen = load_toml(rule_out / "config.toml")
                results = {"rule": (rule_out, chosen)}
                for label, fixed in variants(chosen, batch).items():
                    if label == "rule":
                        continue
                    out = Path(tmp) / label.replace(" ", "-")
                    train(
                        base.replace(**fixed),
                        out,
                        progress=False,
                        log=lines.append,
                        explicit=set(fixed),
                    )
                    results[label] = (out, load_toml(out / "config.toml"))
                for label, (out, cfg) in results.items():
                    records = read_records(out / "metrics.jsonl")
                    chars = max((r.get("chars", 0) for r in records), default=0)
                    steps = max(r["step"] for r in records)
                    row = {
                        "date": time.strftime("%Y-%m-%d"),
                        "cpu": _cpu(),
                        "bf16_peak_gflops": round(peak, 1),
                        "threads": threads,
                        "rules": autoconfig.RULES_VERSION,
                        "text": name,
                        "budget_s": budget,
                        "variant": label,
                        "hidden_size": cfg.model.hidden_size,
                        "num_layers": cfg.model.num_layers,
                        "batch": f"{cfg.data.batch_size}x{cfg.data.seq_len}",
                        "regularisation": [
                            cfg.model.dropout,
                            cfg.model.embedding_dropout,
                            cfg.model.weight_drop,
                            cfg.model.locked_dropout,
                            cfg.optim.ema,
                        ],
                        "steps": steps,
                        "chars_seen": chars or steps * cfg.data.batch_size * cfg.data.seq_len,
                        "n_train": n_train,
                        "passes": round(
                            (chars or steps * cfg.data.batch_size * cfg.data.seq_len) / n_train, 2
                        ),
                        "best_val_loss": round(_final_best(out), 4),
                    }
                    with DATA.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    print(json.dumps(row, ensure_ascii=False), flush=True)


def summary() -> None:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["text"], r["budget_s"], r["threads"], r.get("rules", 1))
        cells.setdefault(key, []).append(r)
    print(
        "| rules | text | budget | threads | rule's choice | loss | best of all | loss | regret |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (text, budget, threads, rules), group in cells.items():
        rule = next((r for r in group if r["variant"] == "rule"), None)
        if rule is None:
            continue
        best = min(group, key=lambda r: r["best_val_loss"])

        def show(r: dict) -> str:
            return f"{r['variant']}: {r['num_layers']}×{r['hidden_size']}, {r['batch']}"

        regret = rule["best_val_loss"] / best["best_val_loss"] - 1
        print(
            f"| v{rules} | {text} | {budget:g} s | {threads} | {show(rule)} | "
            f"{rule['best_val_loss']:.4f} | {show(best)} | {best['best_val_loss']:.4f} | "
            f"{100 * regret:.1f}% |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", action="append", default=[], help="NAME=PATH of a text to sweep")
    ap.add_argument("--budget", type=float, action="append", default=[], help="seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", action="store_true", help="also try half and twice the batch")
    ap.add_argument("--summary", action="store_true", help="summarise the rows so far")
    args = ap.parse_args()
    if args.summary:
        summary()
        return
    if not args.text or not args.budget:
        sys.exit("give --text NAME=PATH and --budget SECONDS (or --summary)")
    texts = dict(t.split("=", 1) for t in args.text)
    sweep(texts, args.budget, args.threads, args.batch)


if __name__ == "__main__":
    main()
