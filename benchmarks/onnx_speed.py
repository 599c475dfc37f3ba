"""Generation speed on one stream: ONNX Runtime beside charlstm's own engine, same models, same run.

    python benchmarks/onnx_speed.py [--chars N] [--repeats N] [--temperature T] [--threads N]

For randomly initialised models (speed does not depend on the weights): the lab's (embedding 35,
2 × 85 LSTM, vocabulary 74), a 2 × 256 LSTM, a 1 × 512 LSTM and the lab-sized GRU. Each is exported
with `charlstm.export.onnx.export_onnx` and generates one stream of N characters (from " ", at
temperature T) four ways, in turns, best of the repeats:

- charlstm: the native engine, as `charlstm generate` runs it (compiled kernels for an LSTM on the
  CPU, one PyTorch call per character for a GRU);
- charlstm-torch: the native engine's reference path (one PyTorch call per character) for every
  model, the path the compiled kernels replace;
- onnx-engine: `charlstm generate --engine onnx`: one ONNX Runtime call per character, charlstm's
  sampler and stop rules;
- onnx-bare: examples/onnx_generate.py, the loop a program without charlstm would write
  (onnxruntime and numpy only).

Everything runs on one thread (torch and ONNX Runtime). Prints the machine, a table of chars/s and
one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import onnxruntime
import torch

from charlstm.bench.generation import library, random_model
from charlstm.export.onnx import export_onnx, load_onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "lab LSTM 2x85": {"cell": "lstm"},
    "LSTM 2x256": {"cell": "lstm", "hidden_size": 256, "embedding_size": 64},
    "LSTM 1x512": {"cell": "lstm", "hidden_size": 512, "num_layers": 1, "embedding_size": 64},
    "lab GRU 2x85": {"cell": "gru"},
}
WAYS = ("charlstm", "charlstm-torch", "onnx-engine", "onnx-bare")


def example():
    spec = importlib.util.spec_from_file_location(
        "onnx_generate", ROOT / "examples/onnx_generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    try:
        lines = subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True
        ).stdout.splitlines()
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    keep = ("Model name", "CPU family", "Model", "CPU(s)")
    return ", ".join(f"{k} {fields[k].strip()}" for k in keep if k in fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=5000, help="characters per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, temp = args.chars, args.temperature
    load_before = os.getloadavg()[0]
    print(
        f"{date.today()}; {machine()}; torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, {args.threads} thread(s); {n} chars, temperature {temp}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sizes in MODELS.items():
            model = random_model(**sizes)
            folder = Path(tmp) / name.replace(" ", "_")
            export_onnx(model, folder)
            onnx_model = load_onnx(folder, threads=args.threads)
            results[name] = measure(model, onnx_model, folder, n, temp, args.repeats, args.threads)
    width = max(map(len, MODELS))
    print(f"\n{'model':<{width}}  " + "  ".join(f"{w:>14}" for w in WAYS) + "  onnx-bare/charlstm")
    for name, row in results.items():
        cells = "  ".join(f"{row[w]:>14,}" for w in WAYS)
        print(f"{name:<{width}}  {cells}  {row['onnx-bare'] / row['charlstm']:>18.2f}")
    load = os.getloadavg()[0]
    print(f"load average (1 min) {load_before:.2f} before, {load:.2f} after")
    print(json.dumps({"chars_per_s": results, "chars": n, "temperature": temp}))


def measure(model, onnx_model, folder: Path, n: int, temp: float, repeats: int, threads: int):
    """Chars/s of each way for one model: best of `repeats`, the ways in turns (so that a noisy
    minute hits every way), after one warm-up call each (kernels loaded, sessions' first runs)."""
    generate_bare = example().generate
    ways = {
        "charlstm": lambda: library(model, 1, n, temp)[0],
        "charlstm-torch": lambda: library(model, 1, n, temp, fast=False)[0],
        "onnx-engine": lambda: library(onnx_model, 1, n, temp)[0],
        "onnx-bare": lambda: _timed(lambda: generate_bare(folder, " ", n, temp, 0, threads)),
    }
    for way in ways.values():
        way()
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):
        for way, fn in ways.items():
            best[way] = min(best[way], fn())
    return {way: round(n / s) for way, s in best.items()}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
