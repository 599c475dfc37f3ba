"""Validation loss reached within a wall-clock training budget, with speed and roofline figures.

    python benchmarks/quality_per_time.py --config configs/shakespeare-100s.toml --budget 100
    python benchmarks/quality_per_time.py --dataset byron-ru --config configs/byron.toml \\
        --budget 120

Prints one JSON line (see charlstm.bench.training). Same as `charlstm bench train`.
"""

from __future__ import annotations

import argparse
import json

from charlstm.bench.training import main_config, parse_value, quality_per_time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="TOML preset")
    parser.add_argument("--dataset", help="named dataset (overrides the preset's)")
    parser.add_argument("--budget", type=float, required=True, help="training seconds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set precision=fp32",
    )
    parser.add_argument("--out", help="keep the run folder here")
    args = parser.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    config = main_config(
        args.config, args.dataset, {k: parse_value(v) for k, v in overrides.items()}
    )
    print(json.dumps(quality_per_time(config, args.budget, args.out)), flush=True)


if __name__ == "__main__":
    main()
