"""Peak memory of preparing and training on a 200 MB corpus: the target is below 1.5 GB each.

Generates a corpus of random Russian and English words and lines (deterministic seed) in a
temporary folder, runs ``charlstm prepare`` on it, then ``charlstm train --prepared`` for a few
hundred steps, each in its own process. For each it prints the peak resident set size (the kernel's
ru_maxrss from wait4, the same figure as VmHWM in /proc/PID/status) and, sampled every 0.1 s, the
largest anonymous (heap) and file-backed (memory-mapped ids.bin, libraries) parts of it. It also
prints prepare's throughput in MB/s of source text.

The file-backed part of a memory map counts towards RSS while its pages are resident, but it is page
cache the kernel can drop at any time; the anonymous part is what the process really allocates.
Loading the same corpus as a Python string would cost about 2 bytes a character for the string
alone, plus the encoded copies.

    python benchmarks/large_corpus_rss.py [--mb 200] [--steps 300] [--keep DIR]

The model is small (1×64 LSTM, 64 streams of 64) because the figure is about the data path, which
does not depend on it. The validation split is set to 0.2 % (about 300,000 characters) so that the
few evaluations stay short; a larger split costs evaluation time, not memory (validation windows are
read on demand).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TARGET_MB = 1500
# SIM905 waived: a line of syllables split at its spaces reads better than a list literal, which the
# formatter would spread over one line per syllable.
SYLLABLES_RU = "ма ло ры ве ст на ко ни про та ду ше ли сь мо ро зи со лн це дь ём юг щи".split()  # noqa: SIM905
SYLLABLES_EN = "the qu ick bro wn fox ju mps ov er la zy dog sh all com pa re thee sum mer".split()  # noqa: SIM905


def make_words(rng: np.random.Generator, n: int) -> np.ndarray:
    words = []
    for i in range(n):
        pool = SYLLABLES_RU if i % 3 else SYLLABLES_EN
        k = int(rng.integers(1, 4))
        word = "".join(pool[j] for j in rng.integers(0, len(pool), size=k))
        if rng.random() < 0.1:
            word = word.capitalize()
        if rng.random() < 0.08:
            word += rng.choice([",", ".", "!", "?", ";", "…"])
        words.append(word)
    return np.array(words, dtype=object)


def generate(path: Path, mb: float, seed: int = 0) -> int:
    """Write about `mb` MB of random words; lines of 1-12 words, a blank line now and then."""
    rng = np.random.default_rng(seed)
    words = make_words(rng, 5000)
    target, written = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        while written < target:
            n = 200_000
            chosen = words[rng.integers(0, len(words), size=n)]
            seps = np.where(rng.random(n) < 0.15, "\n", " ").astype(object)
            seps[rng.random(n) < 0.01] = "\n\n"
            both = np.empty(2 * n, dtype=object)
            both[0::2], both[1::2] = chosen, seps
            data = "".join(both).encode("utf-8")[: target - written]
            fh.write(data.decode("utf-8", "ignore"))
            written += len(data)
    return path.stat().st_size


def _status_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def measured(cmd: list[str], logs: Path) -> dict:
    """Run `cmd`; its exit status, wall time, peak RSS (ru_maxrss of this child alone, from wait4)
    and the peak anonymous and file-backed RSS sampled from /proc every 0.1 s."""
    start = time.monotonic()
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, peak in peaks.items():
                peaks[key] = max(peak, _status_kb(proc.pid, key))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(
        status
    )  # reaped here, so that wait4 gives its rusage
    done.set()
    return {
        "code": proc.returncode,
        "seconds": time.monotonic() - start,
        "peak_kb": usage.ru_maxrss,
        "anon_kb": peaks["RssAnon"],
        "file_kb": peaks["RssFile"],
        "stderr": logs.with_suffix(".err").read_text(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="corpus size in MB")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="charlstm-rss-") if args.keep is None else None
    work = Path(tmp.name) if tmp else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "big.txt"
        t0 = time.monotonic()
        size = generate(corpus, args.mb)
        print(f"generated {size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s", flush=True)

        prep = measured(
            [
                sys.executable,
                "-m",
                "charlstm",
                "prepare",
                "--text",
                str(corpus),
                "--out",
                str(work / "prepared"),
                "--force",
                "--no-progress",
            ],
            work / "prepare",
        )
        if prep["code"]:
            sys.exit(prep["stderr"])
        # prepare's own figure (its two passes), without the Python and torch start-up
        inner = re.search(r"in ([\d.]+) s \(([\d.]+) MB/s\)", prep["stderr"])
        prep_s = float(inner.group(1)) if inner else prep["seconds"]
        prep_mb_s = size / 1e6 / max(prep_s, 1e-9)
        meta = json.loads((work / "prepared" / "meta.json").read_text())

        trained = measured(
            [
                sys.executable,
                "-m",
                "charlstm",
                "train",
                "--prepared",
                str(work / "prepared"),
                "--out",
                str(work / "run"),
                "--force",
                "--max-steps",
                str(args.steps),
                "--max-time",
                "3600",
                "--eval-interval",
                str(max(1, args.steps // 3)),
                "--early-stopping",
                "0",
                "--sample-every",
                "0",
                "--no-progress",
                "--val-fraction",
                "0.002",
                "--ema",
                "0",
                "--batch-size",
                "64",
                "--seq-len",
                "64",
                "--embedding-size",
                "32",
                "--hidden-size",
                "64",
                "--num-layers",
                "1",
                "--device",
                "cpu",
                "--precision",
                "fp32",
            ],
            work / "train",
        )
        if trained["code"]:
            sys.exit(trained["stderr"])
        last = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()][
            -1
        ]
    finally:
        if tmp:
            tmp.cleanup()

    def mb(kb: int) -> float:
        return kb / 1024

    vocab = f"vocabulary {meta['vocab_size']} ({meta['dtype']})"
    print(
        f"prepare: {meta['length']:,} characters, {vocab} in "
        f"{prep_s:.1f} s = {prep_mb_s:.1f} MB/s ({prep['seconds']:.1f} s with start-up); peak RSS "
        f"{mb(prep['peak_kb']):.0f} MB (anon {mb(prep['anon_kb']):.0f} MB, file "
        f"{mb(prep['file_kb']):.0f} MB)"
    )
    peak_kb = max(prep["peak_kb"], trained["peak_kb"])
    print(
        f"train:   {args.steps} steps in {trained['seconds']:.1f} s, validation loss "
        f"{last['val_loss']:.3f}; peak RSS {mb(trained['peak_kb']):.0f} MB (anon "
        f"{mb(trained['anon_kb']):.0f} MB, file {mb(trained['file_kb']):.0f} MB); target "
        f"< {TARGET_MB} MB: {'met' if peak_kb < TARGET_MB * 1024 else 'MISSED'}"
    )
    print(
        json.dumps(
            {
                "corpus_mb": round(size / 1e6, 1),
                "characters": meta["length"],
                "prepare_s": round(prep_s, 2),
                "prepare_wall_s": round(prep["seconds"], 2),
                "prepare_mb_per_s": round(prep_mb_s, 1),
                "prepare_peak_rss_mb": round(mb(prep["peak_kb"])),
                "train_steps": args.steps,
                "train_s": round(trained["seconds"], 1),
                "train_peak_rss_mb": round(mb(trained["peak_kb"])),
                "train_peak_anon_mb": round(mb(trained["anon_kb"])),
                "train_peak_file_mb": round(mb(trained["file_kb"])),
                "target_mb": TARGET_MB,
            }
        )
    )


if __name__ == "__main__":
    main()
