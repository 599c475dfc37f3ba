"""Quality per second of training, and how close the training step runs to this machine's peak.

One run of `quality_per_time` prints:

- the validation loss reached within a wall-clock budget (a full pass over the validation split
  with carried state, exactly as `charlstm evaluate` computes it, on the best checkpoint);
- steps, characters/s, and the achieved GFLOP/s of the training step (counted analytically below);
- the matrix-multiply GFLOP/s of this machine measured in the same run, at the same precision and
  thread count, between the slices in which the step is timed (the median of those measurements),
  so that their ratio is a roofline figure and not a guess;
- the library's training step against a bare PyTorch loop over the same model and batches, timed
  alternately in the same run, so that machine noise hits both alike.
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from charlstm.config import ModelConfig, RunConfig, apply_cli_overrides, dataset_label, load_toml
from charlstm.hardware import autocast, pick_device, pick_precision, set_threads
from charlstm.model.evaluation import reset_rows
from charlstm.runs.folder import RunFolder


def _now() -> float:
    return time.perf_counter()


def matmul_gflops(
    precision: str, seconds: float = 1.0, sizes: tuple[int, ...] = (1024, 2048)
) -> float:
    """The best GFLOP/s of square matrix products at `precision` on the current threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        count, start = 0, _now()
        while _now() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (_now() - start) / 1e9)
    return best


def training_flops_per_char(m: ModelConfig) -> float:
    """Multiply-add FLOPs of one training step per character: the gate products of every recurrent
    layer and the output layer, forward (×1) and backward (×2: gradients of inputs and weights)."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[m.cell]
    forward = 0.0
    for layer in range(m.num_layers):
        fan_in = m.embedding_size if layer == 0 else m.hidden_size
        forward += 2 * (fan_in + m.hidden_size) * gates * m.hidden_size
    forward += 2 * m.hidden_size * m.vocab_size
    return 3 * forward


def _bare_step(model, opt, x, y, hidden, device, precision, clip):
    """The textbook loop, written without the library's machinery."""
    with autocast(device, precision):
        logits, hidden = model(x, hidden)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


def step_speed(
    config: RunConfig, seconds: float = 6.0, peak_precision: str | None = None
) -> dict[str, Any]:
    """Characters/s of the library's step (`Run.train_step`) and of a bare loop on the same model
    and batches, timed in alternating slices so that both see the same machine load.

    With `peak_precision`, a short matrix-multiply measurement follows every pair of slices, and the
    median of those is the peak: on a shared machine one measurement of the peak at the start of a
    run swung between 233 and 943 GFLOP/s (bf16, 2 cores), so a ratio of a step measured at one
    moment to a peak measured at another was noise; interleaved, both see the same load."""
    from charlstm.data.loading import prepare_data
    from charlstm.training.loop import Run

    data = prepare_data(config)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(config, RunFolder(Path(tmp)), data, log=lambda s: None, progress=False)
        bare = type(run.model)(run.config.model).to(run.device)
        bare.load_state_dict(run.model.state_dict())
        opt = torch.optim.Adam(bare.parameters(), lr=config.optim.lr)
        batches = [run.batcher.next() for _ in range(16)]
        timings = {"library": 0.0, "bare": 0.0}
        chars = {"library": 0, "bare": 0}
        hidden = None
        for b in batches[:3]:  # warm-up both
            run.train_step(b)
            hidden = _bare_step(
                bare, opt, b.x, b.y, hidden, run.device, run.precision, config.optim.grad_clip
            )
        deadline = _now() + seconds
        i = 0
        peaks: list[float] = []
        while _now() < deadline:
            if peak_precision is not None:
                peaks.append(matmul_gflops(peak_precision, seconds=0.25, sizes=(2048,)))
            for name in ("library", "bare"):
                start = _now()
                for _ in range(4):
                    b = batches[i % len(batches)]
                    i += 1
                    chars[name] += b.targets
                    if name == "library":
                        run.train_step(b)
                        continue
                    if b.reset:
                        hidden = None
                    elif b.reset_rows is not None:  # rows that start a document, as the library
                        hidden = reset_rows(hidden, b.reset_rows)
                    hidden = _bare_step(
                        bare,
                        opt,
                        b.x.to(run.device),
                        b.y.to(run.device),
                        hidden,
                        run.device,
                        run.precision,
                        config.optim.grad_clip,
                    )
                timings[name] += _now() - start
    lib = chars["library"] / timings["library"]
    bare_speed = chars["bare"] / timings["bare"]
    result: dict[str, Any] = {
        "library_chars_per_s": lib,
        "bare_chars_per_s": bare_speed,
        "library_vs_bare": lib / bare_speed,
    }
    if peaks:
        result["matmul_gflops"] = statistics.median(peaks)
        result["matmul_gflops_range"] = (min(peaks), max(peaks))
    return result


def quality_per_time(
    config: RunConfig,
    budget: float,
    out: Path | None = None,
    progress: bool = False,
    speed_seconds: float = 12.0,
) -> dict[str, Any]:
    """Train for `budget` seconds and measure everything listed in the module docstring."""
    from charlstm.generate.textmodel import load
    from charlstm.model.evaluation import split_metrics
    from charlstm.training.orchestrate import train

    config = config.replace(max_time=budget, max_steps=None)
    threads = set_threads(config.train.threads)
    device = pick_device(config.train.device)
    precision = pick_precision(config.train.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(out) if out else Path(tmp) / "run"
        start = _now()
        train(config, run_dir, force=True, progress=progress, log=lambda s: None)
        wall = _now() - start
        folder = RunFolder(run_dir)
        metrics = folder.read_metrics()
        chars = folder.read_checkpoint("last").meta["metrics"]["chars"]  # padding not counted
        model = load(run_dir, which="best", device=config.train.device)
        val = split_metrics(model.model, config, "validation", model.vocab, device=model.device)
        m = model.model.config
    steps = max(x["step"] for x in metrics)
    train_time = metrics[-1]["time"]
    speed = chars / train_time
    gflops = speed * training_flops_per_char(m) / 1e9
    on_cpu = device.type == "cpu"
    speeds = step_speed(config, seconds=speed_seconds, peak_precision=precision if on_cpu else None)
    peak = speeds.get("matmul_gflops", float("nan"))
    step_gflops = speeds["library_chars_per_s"] * training_flops_per_char(m) / 1e9
    cpu = platform.processor() or platform.machine()
    return {
        "dataset": dataset_label(config),
        "budget_s": budget,
        "val_loss": round(val["loss"], 4),
        "val_bpc": round(val["bits_per_char"], 4),
        "best_step": min(metrics, key=lambda r: r["val_loss"])["step"],
        "steps": steps,
        "chars_per_s": round(speed, 1),
        "train_gflops": round(gflops, 2),
        "step_gflops": round(step_gflops, 2),
        "matmul_gflops": round(peak, 1),  # the median of the measurements between step slices
        "matmul_gflops_range": [round(x, 1) for x in speeds.get("matmul_gflops_range", ())],
        "roofline": round(step_gflops / peak, 3) if math.isfinite(peak) else None,
        "library_chars_per_s": round(speeds["library_chars_per_s"], 1),
        "bare_chars_per_s": round(speeds["bare_chars_per_s"], 1),
        "library_vs_bare": round(speeds["library_vs_bare"], 3),
        "precision": precision,
        "threads": threads,
        "device": device.type,
        "parameters": sum(p.numel() for p in model.model.parameters()),
        "wall_s": round(wall, 1),
        "machine": f"{cpu}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }


def parse_value(text: str) -> Any:
    """A --set value as the TOML scalar it looks like: int, float, true/false, or a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main_config(preset: str | None, dataset: str | None, overrides: dict[str, Any]) -> RunConfig:
    config = load_toml(preset) if preset else RunConfig()
    return apply_cli_overrides(config, {"dataset": dataset, **overrides})
