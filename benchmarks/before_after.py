"""Training-step and generation speed of two versions of charlstm, measured alternately in one run.

    python benchmarks/before_after.py [--before REF] [--rounds 3] [--config PRESET] [--seconds 8]

A refactoring that should not change behaviour must not change speed either. This script takes the
source tree of git revision REF (default: the last commit before the redesign into sub-packages) and
the working tree's src/, and measures both in alternating subprocesses, switching the order every
round, so that the machine's drift and noise fall on both alike:

- the training step: `charlstm.bench.training.step_speed` (the library's `Run.train_step` against a
  bare PyTorch loop on the same model and batches), as characters/s;
- generation: `charlstm bench generate --no-big --repeats 1` (the lab's loop and the library at 1,
  16 and 256 streams), as characters/s.

It prints one row per round and version, the median of each, the after/before ratios, the CPU and
the bf16 matrix-multiply peak measured at the start, and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "63e7b81"  # main before issue 13's redesign

TRAIN = """
import json, sys
from charlstm.bench.training import main_config, step_speed
config = main_config(sys.argv[1], None, {"threads": int(sys.argv[3])})
print(json.dumps(step_speed(config, seconds=float(sys.argv[2]))))
"""


def _source_tree(ref: str, into: Path) -> Path:
    """`src/` of git revision `ref`, extracted into `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryFile() as fh:
        fh.write(archive)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(into, filter="data")
    return into / "src"


def _run(src: Path, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    shared = ROOT.parent / "shared" / "data"  # the corpora beside the checkout (as in Makefile)
    if "CHARLSTM_DATA" not in env and shared.is_dir():
        env["CHARLSTM_DATA"] = str(shared)
    out = subprocess.run(
        [sys.executable, *args], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    get = lambda k: fields.get(k, "?").strip()
    return f"{get('Model name')}, family {get('CPU family')}, model {get('Model')}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="configs/shakespeare-100s.toml", help="training preset")
    parser.add_argument("--seconds", type=float, default=8.0, help="step timing per measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from charlstm.bench.training import matmul_gflops

    peak = matmul_gflops("bf16")
    print(f"CPU: {_cpu()}; bf16 matmul peak at start {peak:.0f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": _source_tree(args.before, Path(tmp)), "after": ROOT / "src"}
        rows: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                step = _run(
                    trees[name],
                    ["-c", TRAIN, args.config, str(args.seconds), str(args.threads)],
                )
                gen = _run(
                    trees[name],
                    ["-m", "charlstm", "bench", "generate", "--no-big", "--repeats", "1"],
                )
                row = {
                    "train_chars_per_s": step["library_chars_per_s"],
                    "train_library_vs_bare": step["library_vs_bare"],
                }
                row.update(
                    {
                        k: v
                        for k, v in gen.items()
                        if k.endswith("_chars_per_s") or k == "first_char_s"
                    }
                )
                rows[name].append(row)
                print(
                    f"round {r + 1} {name:>6}: train {row['train_chars_per_s']:,.0f} chars/s "
                    f"(library/bare {row['train_library_vs_bare']:.3f}); generate "
                    + ", ".join(
                        f"{k} {v:,.0f}"
                        for k, v in row.items()
                        if k.endswith("chars_per_s") and not k.startswith("train")
                    ),
                    flush=True,
                )
    keys = [k for k in rows["after"][0] if all(k in row for row in rows["before"])]
    medians = {
        name: {k: statistics.median(row[k] for row in rows[name]) for k in keys} for name in rows
    }
    ratios = {k: medians["after"][k] / medians["before"][k] for k in keys if medians["before"][k]}
    print("\nmedian of each version, and after / before:")
    for k in keys:
        print(
            f"  {k:32} {medians['before'][k]:>14,.3f} {medians['after'][k]:>14,.3f} "
            f"{ratios.get(k, float('nan')):>7.3f}"
        )
    print(
        json.dumps(
            {
                "cpu": _cpu(),
                "bf16_peak_gflops": peak,
                "before": args.before,
                "medians": medians,
                "after_over_before": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
