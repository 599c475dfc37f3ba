"""How much of a run went at the floor rate: its steps past the cosine's decay_steps.

For each run folder: decay_steps (config.toml), the steps it took, and the share of its steps and
of its time at min_lr (the time read off metrics.jsonl, between the records around decay_steps).
With --decay N, the same for another decay_steps on the same run: the steps a run takes do not
depend on its schedule, so this is what other rules would have left at the floor.

    python benchmarks/floor_share.py RUN [RUN ...] [--decay 666]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tomllib
from pathlib import Path

from charlstm.runs.metrics import read_records


def floor_share(run: str, decay: int | None = None) -> dict:
    config = tomllib.loads((Path(run) / "config.toml").read_text(encoding="utf-8"))
    decay = decay or config["optim"]["decay_steps"]
    records = read_records(Path(run) / "metrics.jsonl")
    final = records[-1]
    steps, end = final["step"], final["time"]
    points = [(0, 0.0)] + [(r["step"], r["time"]) for r in records if not r.get("final")]
    at_decay = None
    for (s0, t0), (s1, t1) in itertools.pairwise(points):
        if s0 <= decay <= s1:
            at_decay = t0 + (t1 - t0) * (decay - s0) / max(s1 - s0, 1)
            break
    return {
        "run": run,
        "decay_steps": decay,
        "steps": steps,
        "floor_share_steps": round(max(0, steps - decay) / steps, 3),
        "floor_share_time": 0.0 if at_decay is None else round((end - at_decay) / end, 3),
        "best_val_loss": final.get("best_val_loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--decay", type=int, help="another decay_steps to read the runs under")
    args = ap.parse_args()
    for run in args.runs:
        print(json.dumps(floor_share(run, args.decay)))


if __name__ == "__main__":
    main()
