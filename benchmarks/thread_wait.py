"""Why a charlstm run trains on one thread on a 2-core machine: OpenMP's waiting, measured.

`import charlstm` sets OMP_WAIT_POLICY=PASSIVE (unless the user set it): threads that wait for
work sleep instead of spinning. This script measures what that costs and what it protects against.
For a few model shapes it times real training steps (`calibration.measure`, bf16) on one thread and
on all cores, with libgomp's spin count at 0 (what PASSIVE means), 30 000 and 300 000 (libgomp's
default when no policy is set), once on a quiet machine and once while another process trains on
one core (what any second job does to a shared machine). Each measurement is its own process,
since libgomp reads its settings once, when it loads.

    python benchmarks/thread_wait.py            # prints a table of k characters/s

Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((1, 192, 16), (2, 192, 32), (1, 384, 32), (1, 512, 64))  # (layers, width, batch) × 64
SPINS = (0, 30_000, 300_000)
COMPETING_LOOP = """
import torch
from charlstm.training.calibration import Shape, measure
torch.set_num_threads(1)
while True:
    measure(Shape("lstm", 256, 1, 64, 80, 32, 64), torch.device("cpu"), "fp32", 5.0, 10**6)
"""
COMPETITOR = [sys.executable, "-c", COMPETING_LOOP]


def child(layers: int, width: int, batch: int, threads: int) -> None:
    import torch

    from charlstm.training.calibration import Shape, measure

    torch.set_num_threads(threads)
    shape = Shape("lstm", width, layers, 64, 80, batch, 64)
    measure(shape, torch.device("cpu"), "bf16", seconds=0.5, steps=20)  # warm-up
    print(measure(shape, torch.device("cpu"), "bf16", seconds=3.0, steps=10**6))


def _speed(shape: tuple[int, int, int], threads: int, spin: int) -> float:
    env = {**os.environ, "GOMP_SPINCOUNT": str(spin)}
    cmd = [sys.executable, __file__, "--child", *map(str, (*shape, threads))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; k characters/s of bf16 training steps, 1 thread vs {cores} threads")
    print(
        "| shape | machine | 1 thread | "
        + " | ".join(f"{cores} threads, spin {s:,}" for s in SPINS)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(SPINS))
    for busy in (False, True):
        competitor = None
        if busy:
            competitor = subprocess.Popen(
                ["taskset", "-c", "0", *COMPETITOR],
                cwd=Path(__file__).resolve().parents[1],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            time.sleep(3)
        try:
            for layers, width, batch in SHAPES:
                one = _speed((layers, width, batch), 1, 0)
                many = [_speed((layers, width, batch), cores, s) for s in SPINS]
                print(
                    f"| {layers}×{width}, {batch}×64 | {'busy' if busy else 'quiet'} | "
                    f"{one / 1e3:.0f} | " + " | ".join(f"{m / 1e3:.0f}" for m in many) + " |",
                    flush=True,
                )
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()


if __name__ == "__main__":
    main()
