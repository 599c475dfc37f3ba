"""byron-ru from scratch (tuned preset) against pre-training on onegin-ru and fine-tuning, one run.

Issue 8's targets, on the validation split of byron-ru (nats/char, the best weights of each run):
  - at most 2.30 from scratch with the tuned preset (configs/byron-tuned.toml);
  - at most 1.90 pre-trained on onegin-ru and fine-tuned (configs/byron-transfer.toml), with both
    phases together within 10 minutes of training on the 2 cores.

    python benchmarks/byron_transfer.py [--scratch CONFIG] [--transfer CONFIG] [--threads 1]
        [--scratch-time S] [--pretrain-time S] [--finetune-time S] [--out DIR] [--sequential]

The two runs train at the same time, each in its own process with --threads threads (default 1:
one core each on a 2-core machine), so the benchmark takes about the transfer run's two phases of
wall time. Prints a table, then one JSON line. CHARLSTM_DATA defaults to /work/shared/data.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH_TARGET, TRANSFER_TARGET, TRANSFER_BUDGET = 2.30, 1.90, 600.0


def _train(config, out: str, log_path: str) -> dict:
    """Train one run (pre-training first when the config says so); its best loss and timings."""
    from charlstm.runs import checkpoint as ckpt_io
    from charlstm.runs.folder import checkpoint_path
    from charlstm.training.orchestrate import train

    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as fh:
        train(
            config, out, force=True, progress=False, log=lambda m: (fh.write(m + "\n"), fh.flush())
        )
    meta = ckpt_io.read_checkpoint(checkpoint_path(out, "best")).meta
    last = ckpt_io.read_checkpoint(checkpoint_path(out, "last")).meta["metrics"]
    result = {
        "val_loss": meta["metrics"]["val_loss"],
        "best_step": meta["step"],
        "train_seconds": last["elapsed"],
        "wall_seconds": round(time.monotonic() - start, 1),
    }
    if config.train.pretrain:
        from charlstm.training.orchestrate import pretrain_out

        pre = ckpt_io.read_checkpoint(checkpoint_path(pretrain_out(Path(out)), "last")).meta[
            "metrics"
        ]
        result.update(pretrain_seconds=pre["elapsed"], pretrain_val_loss=pre["best_val_loss"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=ROOT / "configs" / "byron-tuned.toml")
    parser.add_argument("--transfer", type=Path, default=ROOT / "configs" / "byron-transfer.toml")
    parser.add_argument(
        "--scratch-time", type=float, help="seconds (default: the preset's max_time)"
    )
    parser.add_argument("--pretrain-time", type=float, help="seconds (default: the preset's)")
    parser.add_argument(
        "--finetune-time", type=float, help="seconds (default: the preset's max_time)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-transfer"))
    parser.add_argument("--sequential", action="store_true", help="one run after the other")
    args = parser.parse_args(argv)
    os.environ.setdefault("CHARLSTM_DATA", "/work/shared/data")

    from charlstm.config import load_toml

    # No samples: a run prints them on stderr, between the benchmark's own lines.
    common = {"sample_every": 0, **({"seed": args.seed} if args.seed is not None else {})}
    scratch = load_toml(args.scratch).replace(threads=args.threads, dataset="byron-ru", **common)
    if args.scratch_time:
        scratch = scratch.replace(max_time=args.scratch_time)
    transfer = load_toml(args.transfer).replace(threads=args.threads, dataset="byron-ru", **common)
    if args.pretrain_time:
        transfer = transfer.replace(pretrain_time=args.pretrain_time)
    if args.finetune_time:
        transfer = transfer.replace(max_time=args.finetune_time)
    if not transfer.train.pretrain:
        parser.error(f"{args.transfer} does not set `pretrain`")
    pre_config = transfer.train.pretrain_config
    if pre_config and not Path(pre_config).is_file() and (ROOT / pre_config).is_file():
        # the presets name each other relative to the repository root
        transfer = transfer.replace(pretrain_config=str(ROOT / pre_config))
    budget = transfer.train.pretrain_time + transfer.train.max_time
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "scratch": (scratch, str(args.out / "scratch"), str(args.out / "scratch.log")),
        "transfer": (transfer, str(args.out / "transfer"), str(args.out / "transfer.log")),
    }
    print(
        f"training {len(jobs)} runs {'one after the other' if args.sequential else 'at once'}, "
        f"{args.threads} thread(s) each; logs in {args.out}",
        file=sys.stderr,
        flush=True,
    )
    with ProcessPoolExecutor(
        1 if args.sequential else 2, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        futures = {name: pool.submit(_train, *job) for name, job in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}

    s, t = results["scratch"], results["transfer"]
    rows = [
        (
            "from scratch, " + args.scratch.name,
            f"{s['train_seconds']:.0f} s",
            s["val_loss"],
            SCRATCH_TARGET,
        ),
        (
            f"pre-trained on {transfer.train.pretrain}, fine-tuned ({args.transfer.name})",
            f"{t['pretrain_seconds']:.0f} + {t['train_seconds']:.0f} s",
            t["val_loss"],
            TRANSFER_TARGET,
        ),
    ]
    print("| byron-ru | training | validation (nats/char) | target |\n|---|---|---|---|")
    for name, time_, loss, target in rows:
        print(
            f"| {name} | {time_} | {loss:.4f} | ≤ {target:.2f} "
            f"{'met' if loss <= target else 'MISSED'} |"
        )
    ok = (
        s["val_loss"] <= SCRATCH_TARGET
        and t["val_loss"] <= TRANSFER_TARGET
        and budget <= TRANSFER_BUDGET
    )
    print(
        json.dumps(
            {
                "scratch": s,
                "transfer": t,
                "transfer_budget_s": budget,
                "threads": args.threads,
                "parallel": not args.sequential,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "targets_met": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
