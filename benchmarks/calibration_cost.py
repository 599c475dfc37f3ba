"""What the automatic configuration spends measuring on a machine seen for the first time.

Runs `autoconfig.choose` for a text of the given size and a time budget with an empty calibration
cache (a new temporary CHARLSTM_CACHE) on all cores, prints every measurement it took (shape,
thread count, seconds, characters/s), then the seconds the choice counted against the budget and
their share, and the choice's own line. Run each case in a fresh process: the first training step
of a process pays for starting torch, which the choice says apart.

    python benchmarks/calibration_cost.py --budget 90 --train 1003855 --val 111539 --vocab 65
    PYTHONPATH=/path/to/other/src python benchmarks/calibration_cost.py ...   # another version
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, required=True, help="--max-time, seconds")
    ap.add_argument("--train", type=int, required=True, help="training characters")
    ap.add_argument("--val", type=int, required=True, help="validation characters")
    ap.add_argument("--vocab", type=int, required=True, help="vocabulary size")
    args = ap.parse_args()
    os.environ["CHARLSTM_CACHE"] = tempfile.mkdtemp(prefix="charlstm-cold-")

    import torch

    from charlstm.config import RunConfig
    from charlstm.hardware import set_threads
    from charlstm.training import autoconfig, calibration

    real = calibration.measure

    def timed(shape, device, precision, **kw):
        start = time.perf_counter()
        value = real(shape, device, precision, **kw)
        seconds = time.perf_counter() - start
        print(
            f"{shape.key():48s} {torch.get_num_threads()}t {seconds:6.2f} s {value:10.0f} chars/s"
        )
        return value

    real_relative = getattr(calibration, "measure_relative", None)  # rules v8 on

    def timed_relative(shape, device, precision, *a, **kw):
        start = time.perf_counter()
        value = real_relative(shape, device, precision, *a, **kw)
        seconds = time.perf_counter() - start
        print(
            f"{shape.key():48s} {torch.get_num_threads()}t {seconds:6.2f} s {value:10.3f} of plain"
        )
        return value

    calibration.measure = timed
    if real_relative is not None:
        calibration.measure_relative = timed_relative
    threads = set_threads(None)
    config = RunConfig().replace(max_time=args.budget)
    cpu = torch.device("cpu")
    choice = autoconfig.choose(
        config, set(), args.train, args.val, args.vocab, cpu, "bf16", threads
    )
    share = 100 * choice.seconds / args.budget
    print(f"counted {choice.seconds:.2f} s = {share:.1f}% of {args.budget:g} s")
    print(choice.explanation)


if __name__ == "__main__":
    main()
