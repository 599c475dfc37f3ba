"""How fast the library generates, next to the lab's per-character loop on the same model.

The lab's loop: one module call on a (1, 1) input per character, logits to the CPU, softmax to
numpy, `np.random.choice`. The library: `generate.engine.Engine` (compiled kernels for an LSTM on
the CPU), one stream and batches of streams, plus the time to the first character after a long start
text. With `big=True` it also times a 1 × 512 model and compares one stream with the bound that
memory bandwidth sets (every character reads every weight once).

`charlstm bench generate` and `benchmarks/generation_speed.py` print a table and one JSON line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.config import ModelConfig
from charlstm.data.vocabulary import Vocabulary
from charlstm.generate.engine import Engine, generate_stream
from charlstm.generate.sampling import SamplingParams, stream_seeds
from charlstm.generate.textmodel import TextModel
from charlstm.model import CharRNN

# The lab's model: embedding 35, 2 × 85 LSTM; its byron_ru.txt vocabulary has 74 characters.
LAB_MODEL = {"embedding_size": 35, "hidden_size": 85, "num_layers": 2}
LAB_VOCAB = 74


def random_model(vocab_size: int = LAB_VOCAB, seed: int = 0, **sizes: int) -> TextModel:
    """A randomly initialised model (the speed does not depend on training) and a vocabulary of
    letters, space and newline."""
    torch.manual_seed(seed)
    config = ModelConfig(
        **{**LAB_MODEL, **sizes}, dropout=0.0, embedding_dropout=0.0, vocab_size=vocab_size
    )
    alphabet = " \n" + "".join(chr(c) for c in range(0x430, 0x450)) + "abcdefghijklmnopqrstuvwxyz"
    alphabet += "".join(chr(c) for c in range(0x3B1, 0x3B1 + max(0, vocab_size - len(alphabet))))
    vocab = Vocabulary(tuple(alphabet[:vocab_size]))
    return TextModel(CharRNN(config).eval(), vocab, {}, Path("random"), torch.device("cpu"))


@torch.inference_mode()
def lab_loop(
    model: torch.nn.Module, start: list[int], n: int, temperature: float, seed: int = 0
) -> tuple[list[int], float, float]:
    """The lab's generation loop; returns (ids, seconds, seconds to the first character)."""
    rng = np.random.default_rng(seed)
    V = model.fc.out_features
    t0 = time.perf_counter()
    logits, hidden = model(torch.tensor([start]))
    out, first = [], 0.0
    for i in range(n):
        p = F.softmax(logits[0, -1].cpu() / temperature, dim=-1).numpy()
        idx = int(rng.choice(V, p=p))
        out.append(idx)
        if i == 0:
            first = time.perf_counter() - t0
        logits, hidden = model(torch.tensor([[idx]]), hidden)
    return out, time.perf_counter() - t0, first


def library(
    model: TextModel,
    streams: int,
    length: int,
    temperature: float,
    fast: bool | None = None,
    start: str = " ",
) -> tuple[float, float]:
    """(seconds, CPU seconds of all the process's threads) for `streams` samples of `length`
    characters through `generate_stream`."""
    prompts = [model.vocab.encode(start)] * streams
    params = SamplingParams(temperature)
    t0, c0 = time.perf_counter(), time.process_time()
    drawn = 0
    for outputs in generate_stream(
        model.model,
        prompts,
        length,
        params,
        stream_seeds(1, streams),
        model.vocab.decode,
        fast=fast,
    ):
        drawn += sum(o.drawn for o in outputs.values())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert drawn == streams * length
    return seconds, cpu


def first_character(model: TextModel, start: str, temperature: float) -> float:
    """Seconds from asking `TextModel.stream` for text to holding its first generated character."""
    t0 = time.perf_counter()
    for i, texts in enumerate(model.stream(start, 1000, temperature, seed=3)):
        if i > 0 and texts:
            return time.perf_counter() - t0
    raise AssertionError("no text was generated")


def bandwidth(n_bytes: int, repeats: int) -> float:
    """One thread's read bandwidth in bytes/s: `max` over a float32 array of `n_bytes` (numpy's
    SIMD reduction reads at the memory's pace; best of `repeats`). One stream is one thread."""
    a = np.ones(n_bytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.max()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def _best(fn, repeats: int):
    """The fastest of `repeats` calls (by its first value)."""
    return min((fn() for _ in range(repeats)), key=lambda r: r[0] if isinstance(r, tuple) else r)


def run(
    model: TextModel | None = None,
    *,
    temperature: float = 0.5,
    lab_chars: int = 3000,
    single_chars: int = 100_000,
    batch_chars: int = 400_000,
    streams: tuple[int, ...] = (1, 16, 256),
    start_chars: int = 1000,
    repeats: int = 3,
    big: bool = True,
    log=print,
) -> dict[str, Any]:
    """Time everything; `log` gets the table lines. Returns the figures (chars/s, seconds)."""
    source = model.path.as_posix() if model is not None else "random lab-sized model"
    model = model or random_model()
    m = model.model
    V, H, L = m.fc.out_features, m.config.hidden_size, m.config.num_layers
    result: dict[str, Any] = {
        "model": source,
        "cell": m.config.cell,
        "hidden_size": H,
        "num_layers": L,
        "embedding_size": m.config.embedding_size,
        "vocab_size": V,
        "temperature": temperature,
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
    }
    log(
        f"model: {source} ({L} × {H} {m.config.cell}, vocabulary {V}); temperature {temperature}; "
        f"{torch.get_num_threads()} threads; load average {result['load_average']}"
    )

    # The compiled kernels load from numba's cache (or compile on the first run ever): that cost
    # is paid once per process, so it is reported apart and kept out of the speeds.
    t0 = time.perf_counter()
    compiled = Engine(m, model.vocab.decode).compiled
    library(model, 1, 200, temperature)
    library(model, _batched_streams(), 4, temperature)
    result["compiled"] = compiled
    result["warmup_s"] = round(time.perf_counter() - t0, 3)
    log(
        f"compiled kernels: {'yes' if compiled else 'no (reference path)'}; "
        f"first call (cache load or compile) {result['warmup_s']:.2f} s"
    )

    lab, by_threads = _lab_speed(m, model.vocab.encode(" "), lab_chars, temperature, repeats)
    result["lab_chars_per_s"] = round(lab)
    result["lab_chars_per_s_by_threads"] = by_threads
    log(f"{'lab loop, 1 stream':<34}{lab:>14,.0f} chars/s   (best of {by_threads} by thread count)")
    for n in streams:
        length = max(200, (single_chars if n == 1 else batch_chars) // n)
        seconds, cpu = _best(
            lambda n=n, length=length: library(model, n, length, temperature), repeats
        )
        speed, per_cpu = n * length / seconds, n * length / max(cpu, 1e-9)
        result[f"library_{n}_chars_per_s"] = round(speed)
        result[f"ratio_{n}_vs_lab"] = round(speed / lab, 1)
        result[f"library_{n}_chars_per_cpu_s"] = round(per_cpu)
        log(
            f"{f'library, {n} stream' + ('s' if n > 1 else ''):<34}{speed:>14,.0f} chars/s"
            f"{speed / lab:>10.1f}× the lab loop   ({per_cpu:,.0f} per CPU-second)"
        )
    ref_chars = min(lab_chars, 1000)
    ref = ref_chars / library(model, 1, ref_chars, temperature, fast=False)[0]
    result["reference_1_chars_per_s"] = round(ref)
    label = "library reference path, 1 stream"
    log(f"{label:<34}{ref:>14,.0f} chars/s{ref / lab:>10.1f}× the lab loop")

    long_start = "".join(model.vocab.chars[2 + i % (V - 2)] for i in range(start_chars))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(by_threads, key=by_threads.get))  # the lab's faster setting
    try:
        lab_ttfc = min(
            lab_loop(m, model.vocab.encode(long_start), 1, temperature)[2] for _ in range(repeats)
        )
    finally:
        torch.set_num_threads(threads)
    ttfc = _best(lambda: first_character(model, long_start, temperature), repeats)
    result["first_char_s"] = round(ttfc, 5)
    result["lab_first_char_s"] = round(lab_ttfc, 5)
    log(
        f"time to first character after a {start_chars}-character start text: "
        f"{ttfc * 1e3:.2f} ms (lab loop {lab_ttfc * 1e3:.2f} ms)"
    )

    if big:
        result["big"] = _big(temperature, repeats, log)
    return result


def _lab_speed(m, start: list[int], n: int, temperature: float, repeats: int):
    """The lab loop's characters/s at its best thread count: one thread or PyTorch's default. Tiny
    ops gain nothing from threads, and on a busy machine a threaded module call can wait for a
    descheduled thread; the lab gets whichever is faster, so the ratios are not inflated."""
    threads = torch.get_num_threads()
    by_threads = {}
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            by_threads[t] = round(
                n / min(lab_loop(m, start, n, temperature)[1] for _ in range(repeats))
            )
    finally:
        torch.set_num_threads(threads)
    return max(by_threads.values()), by_threads


def _batched_streams() -> int:
    """A batch big enough to take the batched (BLAS) path, to warm it up."""
    try:
        from charlstm.generate.kernels import LSTMRows
    except ImportError:
        return 2
    return LSTMRows.batch_rows * max(1, torch.get_num_threads())


def _big(temperature: float, repeats: int, log) -> dict[str, Any]:
    """A 1 × 512 LSTM: speeds, and one stream against the memory-bandwidth bound."""
    model = random_model(embedding_size=64, hidden_size=512, num_layers=1)
    m = model.model
    weight_bytes = 4 * (m.rnn.weight_hh_l0.numel() + m.fc.weight.numel())  # read per character
    out: dict[str, Any] = {
        "hidden_size": 512,
        "num_layers": 1,
        "weight_bytes_per_char": weight_bytes,
    }
    lab, out["lab_chars_per_s_by_threads"] = _lab_speed(m, [0], 1000, temperature, repeats)
    out["lab_chars_per_s"] = round(lab)
    log(f"1 × 512 model: {weight_bytes / 1e6:.2f} MB of weights read per character")
    log(f"{'  lab loop, 1 stream':<34}{lab:>14,.0f} chars/s")
    for n, total in ((1, 20_000), (16, 40_000), (256, 100_000)):
        length = max(100, total // n)
        speed = (
            n
            * length
            / _best(lambda n=n, length=length: library(model, n, length, temperature), repeats)[0]
        )
        out[f"library_{n}_chars_per_s"] = round(speed)
        log(
            f"{f'  library, {n} stream' + ('s' if n > 1 else ''):<34}{speed:>14,.0f} chars/s"
            f"{speed / lab:>10.1f}× the lab loop"
        )
    dram = bandwidth(512 << 20, repeats)
    cached = bandwidth(weight_bytes, 20 * repeats)
    single = out["library_1_chars_per_s"]
    for name, bw in (("dram", dram), ("cache", cached)):
        bound = bw / weight_bytes
        out[f"{name}_bandwidth_gb_s"] = round(bw / 1e9, 1)
        out[f"{name}_bound_chars_per_s"] = round(bound)
        out[f"single_vs_{name}_bound"] = round(single / bound, 3)
        where = (
            "memory (512 MB array)"
            if name == "dram"
            else f"cache ({weight_bytes / 1e6:.1f} MB array)"
        )
        log(
            f"  bandwidth from {where}: {bw / 1e9:.1f} GB/s → bound {bound:,.0f} chars/s for one "
            f"stream; measured {single / bound:.0%} of it"
        )
    return out
