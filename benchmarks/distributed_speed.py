"""Training characters/s on 1 and on N CPU processes (DDP over gloo) at the same global batch.

Each configuration trains tinyshakespeare for `--steps` steps through the CLI (`charlstm train` and
`charlstm train --nproc N`), with the same global batch (`--batch-size` streams of `--seq-len`):
one process uses every core, N processes a share of the cores each. The figure is the
characters/s of the second half of the steps, as metrics.jsonl records it (the first half holds
start-up, DDP's first broadcast and warm-up; evaluation time is not counted).

On a machine with 2 cores no speed-up is expected from 2 processes: the same arithmetic is split
between the same 2 cores, and each step adds an all-reduce of the gradients and two tiny agreement
all-reduces. DDP pays off with one process per GPU, or with more cores than one process can use.

    python benchmarks/distributed_speed.py [--configs 1x2,1x1,2x1] [--steps 60] [--batch-size 32]

Prints one line per configuration and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    half = max(1, args.steps // 2)
    cmd = [
        sys.executable,
        "-m",
        "charlstm",
        "train",
        "--dataset",
        "tinyshakespeare",
        "--out",
        str(out),
        "--force",
        "--max-steps",
        str(2 * half),
        "--max-time",
        "3600",
        "--eval-interval",
        str(half),
        "--early-stopping",
        "0",
        "--sample-every",
        "0",
        "--no-progress",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--hidden-size",
        str(args.hidden_size),
        "--num-layers",
        str(args.num_layers),
        "--eval-streams",
        "4",
        "--val-fraction",
        "0.01",
        "--threads",
        str(threads),
    ]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{nproc} process(es) failed:\n{result.stderr}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "chars_per_s" in r]
    return {
        "processes": nproc,
        "threads_each": threads,
        "chars_per_s": timed[-1]["chars_per_s"],
        "val_loss": records[-1]["val_loss"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        help="PROCESSESxTHREADS each, comma-separated (default: "
        "1 process on every core, 1 process on 1 core, 2 processes on half each)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (streams)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("CHARLSTM_DATA", "/work/shared/data")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    configs = args.configs or f"1x{cores},1x1,2x{max(1, cores // 2)}"
    results = []
    with tempfile.TemporaryDirectory(prefix="charlstm-dist-") as tmp:
        for n, t in (map(int, c.split("x")) for c in configs.split(",")):
            tries = [run(n, t, args, Path(tmp) / f"n{n}t{t}") for _ in range(args.repeats)]
            r = max(tries, key=lambda x: x["chars_per_s"])
            results.append(r)
            print(
                f"{n} process(es) × {t} thread(s): {r['chars_per_s']:,.0f} characters/s "
                f"(best of {args.repeats}; global batch {args.batch_size}×{args.seq_len}, {cores} "
                f"cores), validation loss {r['val_loss']:.4f} after {args.steps} steps",
                flush=True,
            )
    base = results[0]["chars_per_s"]
    summary = {
        "cores": cores,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "steps": args.steps,
        "results": results,
        "relative": {
            f"{r['processes']}x{r['threads_each']}": round(r["chars_per_s"] / base, 3)
            for r in results
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
