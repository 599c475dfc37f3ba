"""LSTM vs GRU vs plain RNN: equal parameters, equal time, several seeds, and a long-range probe.

Each cell gets the hidden size that brings its parameter count closest to the LSTM's of the base
configuration (an LSTM layer has four gates, a GRU three, a plain RNN one, so at equal parameters
the RNN is about twice as wide), and every run trains for the same number of seconds. The table
reports the mean and spread over seeds of the best validation loss.

The probe looks at *how* the cells use context, on the validation text with each run's best weights:

- by distance from the last newline: the loss of characters 0-4, 5-9, ... positions into a line;
- by context length: the loss at the same positions when the model sees only the last k characters
  (from a zero state) against the whole preceding text (carried state). ``loss(k) - loss(full)``
  is what the cell gains from context older than k characters; a plain RNN, whose gradient
  vanishes over a few dozen steps, gains the least.

With ``copy_delays``, a synthetic task isolates memory: lines ``k....=k`` where a random key k must
be recalled after d filler characters. Small models of equal size train on it for a few seconds per
delay, and the loss on the recalled character is reported (ln 8 = 2.08 for a guess, 0 for perfect
recall): the delay at which a cell falls back to guessing is how far back it can learn to look.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.config import CELLS, RunConfig, dataset_label
from charlstm.errors import UserError
from charlstm.model.evaluation import char_losses

LINE_EDGES = (0, 5, 10, 20, 40)  # buckets of "characters since the last newline"
CONTEXTS = (1, 4, 16, 64)  # context lengths of the probe, besides the full carried state
GAIN_FROM = "4"  # the table's gain: what context older than this many characters is worth
PROBE_POSITIONS = 2000
COPY_KEYS = "abcdefgh"
COPY_CHARS = 200_000  # characters of synthetic text per delay


# ---------------------------------------------------------------------------------------- sizes


def parameter_count(config: RunConfig, vocab_size: int) -> int:
    """Parameters of the model `config` describes, without allocating it."""
    from charlstm.model import parameter_shapes

    shapes = parameter_shapes(dataclasses.replace(config.model, vocab_size=vocab_size))
    return sum(math.prod(shape) for shape in shapes.values())


def matched_hidden_sizes(
    config: RunConfig, cells: Sequence[str], vocab_size: int
) -> dict[str, tuple[int, int]]:
    """For each cell, the hidden size whose parameter count is closest to the LSTM's of `config`,
    and that count: {cell: (hidden_size, parameters)}."""
    target = parameter_count(config.replace(cell="lstm"), vocab_size)
    sizes = {}
    for cell in cells:

        def count(h: int, cell: str = cell) -> int:
            return parameter_count(config.replace(cell=cell, hidden_size=h), vocab_size)

        lo, hi = 1, 8 * config.model.hidden_size  # count(h) grows with h: bisect for the target
        while lo < hi:
            mid = (lo + hi) // 2
            if count(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        best = min((h for h in (lo - 1, lo) if h >= 1), key=lambda h: abs(count(h) - target))
        sizes[cell] = (best, count(best))
    return sizes


# ---------------------------------------------------------------------------------------- probes


def line_distance(
    ids: np.ndarray, newline: int | None, starts: np.ndarray | None = None
) -> np.ndarray:
    """For each prediction p (of ids[p + 1]), how many characters of its line the model has seen:
    0 right after a newline. The text's start, and every document's start (`starts`), count as
    line starts: the model's state is fresh there, as after a newline."""
    pos = np.arange(len(ids) - 1)
    breaks = np.zeros(len(pos), dtype=bool)
    if newline is not None:
        breaks |= ids[:-1] == newline
    if starts is not None:  # as if a newline came just before each document's first character
        before = np.asarray(starts, dtype=np.int64) - 1
        breaks[before[(before >= 0) & (before < len(pos))]] = True
    return pos - np.maximum.accumulate(np.where(breaks, pos, -1))


def line_buckets(
    losses: np.ndarray, distance: np.ndarray, edges: Sequence[int] = LINE_EDGES
) -> dict[str, float]:
    out = {}
    for lo, hi in zip(edges, list(edges[1:]) + [math.inf]):
        mask = (distance >= lo) & (distance < hi) & ~np.isnan(losses)  # NaN: no prediction
        label = f"{lo}-{hi - 1}" if math.isfinite(hi) else f"{lo}+"
        out[label] = float(losses[mask].mean()) if mask.any() else math.nan
    return out


@torch.inference_mode()
def context_losses(
    model,
    ids: np.ndarray,
    full: np.ndarray,
    contexts: Sequence[int] = CONTEXTS,
    positions: int = PROBE_POSITIONS,
    seed: int = 0,
    starts: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean loss at sampled positions when the model sees only the last k characters, and ("full")
    with the whole of its document before them. A position is sampled only where the longest
    context and the target lie in one document (`starts`), so no context crosses a boundary."""
    model.eval()
    k_max = max(contexts)
    candidates = np.arange(k_max - 1, len(ids) - 1)
    if starts is not None and len(starts) > 1:
        doc = np.searchsorted(np.asarray(starts), np.arange(len(ids)), side="right")
        candidates = candidates[doc[candidates - k_max + 1] == doc[candidates + 1]]
    if len(candidates) == 0:
        return {}
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(candidates, size=min(positions, len(candidates)), replace=False))
    target = torch.from_numpy(ids[pos + 1].astype(np.int64))
    out = {}
    for k in contexts:
        windows = np.stack([ids[p - k + 1 : p + 1] for p in pos]).astype(np.int64)  # (P, k)
        logits, _ = model(torch.from_numpy(windows))  # (P, k, V), from a zero state
        out[str(k)] = float(F.cross_entropy(logits[:, -1].float(), target))
    out["full"] = float(full[pos].mean())
    return out


def copy_text(delay: int, n_chars: int = COPY_CHARS, seed: int = 0) -> str:
    """Lines ``k + "." * delay + "=" + k``: the character after "=" repeats the line's key."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(list(COPY_KEYS), size=max(2, n_chars // (delay + 4)))
    return "".join(f"{k}{'.' * delay}={k}\n" for k in keys)


def copy_config(cell: str, hidden: int, text: Path, budget: float, seed: int) -> RunConfig:
    """A small model on the copy text, windows long enough to hold every delay asked for."""
    return RunConfig().replace(
        text=str(text),
        dataset=None,
        cell=cell,
        hidden_size=hidden,
        num_layers=1,
        embedding_size=16,
        dropout=0.0,
        embedding_dropout=0.0,
        weight_drop=0.0,
        ema=0.0,
        batch_size=32,
        seq_len=128,
        lr=3e-3,
        schedule="constant",
        max_time=budget,
        eval_interval=100,
        early_stopping=0,
        sample_every=0,
        threads=1,
        seed=seed,
        precision="fp32",
    )


def recall_loss(run_dir: Path) -> float:
    """Mean loss on the recalled characters (after "=") of the copy text's validation split."""
    from charlstm.config import from_dict
    from charlstm.data.loading import prepare_data
    from charlstm.generate.textmodel import load

    model = load(run_dir, device="cpu")
    data = prepare_data(from_dict(model.meta["config"]), model.vocab)
    ids = data.val_ids.astype(np.int64)
    losses = char_losses(model.model, ids, starts=data.val_starts)
    return float(losses[ids[:-1] == model.vocab.char_to_idx["="]].mean())


# ---------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    cell: str
    seed: int
    hidden_size: int
    parameters: int
    best_val: float
    steps: int
    seconds: float
    chars_per_s: float
    curve: list[tuple[float, float]]  # (seconds, validation loss)
    lines: dict[str, float] = field(default_factory=dict)
    contexts: dict[str, float] = field(default_factory=dict)


def _train_one(config: RunConfig, run_dir: str) -> None:
    """Train one run, logging to a file beside it (a worker process's entry point)."""
    from charlstm.training.orchestrate import train

    run_dir = Path(run_dir)
    (run_dir.parent / f"{run_dir.name}.done").unlink(missing_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w", encoding="utf-8") as fh:
        train(
            config.replace(auto="off"),  # the same settings for every cell: a fair comparison
            run_dir,
            force=True,
            progress=False,
            log=lambda msg: (fh.write(msg + "\n"), fh.flush()),
        )
    (run_dir.parent / f"{run_dir.name}.done").write_text("ok\n")


def _read_run(
    run_dir: Path, cell: str, seed: int, hidden: int, params: int, probe: bool
) -> RunResult:
    from charlstm.data.loading import prepare_data
    from charlstm.generate.textmodel import load
    from charlstm.runs.folder import RunFolder

    folder = RunFolder(run_dir)
    curve = [(r["time"], r["val_loss"]) for r in folder.read_metrics()]
    last = folder.read_checkpoint("last")
    m = last.meta["metrics"]
    result = RunResult(
        cell,
        seed,
        hidden,
        params,
        float(m["best_val_loss"]),
        int(last.meta["step"]),
        float(m["elapsed"]),
        m["chars"] / max(m["elapsed"], 1e-9),
        curve,
    )
    if probe:
        model = load(run_dir, device="cpu")
        data = prepare_data(last.run_config, model.vocab)
        ids = data.val_ids.astype(np.int64)
        starts = data.val_starts
        losses = char_losses(model.model, ids, starts=starts)
        newline = model.vocab.char_to_idx.get("\n")
        result.lines = line_buckets(losses, line_distance(ids, newline, starts))
        result.contexts = context_losses(model.model, ids, losses, starts=starts)
    return result


@dataclass
class Comparison:
    dataset: str
    budget: float
    sizes: dict[str, tuple[int, int]]
    runs: list[RunResult]
    files: dict[str, Path] = field(default_factory=dict)
    copy: dict[str, dict[str, float]] = field(default_factory=dict)  # cell -> delay -> recall loss

    def cells(self) -> list[str]:
        return list(dict.fromkeys(r.cell for r in self.runs))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per cell: mean, sample standard deviation, min and max over seeds; the probes' means."""
        out = {}
        for cell in self.cells():
            runs = [r for r in self.runs if r.cell == cell]
            vals = np.array([r.best_val for r in runs])
            out[cell] = {
                "hidden_size": runs[0].hidden_size,
                "parameters": runs[0].parameters,
                "seeds": len(runs),
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                "min": float(vals.min()),
                "max": float(vals.max()),
                "steps": float(np.mean([r.steps for r in runs])),
                "chars_per_s": float(np.mean([r.chars_per_s for r in runs])),
                "lines": _mean_dicts([r.lines for r in runs]),
                "contexts": _mean_dicts([r.contexts for r in runs]),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "budget": self.budget,
            "summary": self.summary(),
            "copy_task": self.copy,
            "runs": [r.__dict__ for r in self.runs],
        }


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for d in dicts for k in d)
    out = {}
    for k in keys:
        values = [d[k] for d in dicts if math.isfinite(d.get(k, math.nan))]
        out[k] = float(np.mean(values)) if values else math.nan  # nan: no character in that bucket
    return out


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else "–"


def markdown(result: Comparison) -> str:
    """The comparison as markdown: the main table, then the two probes."""
    s = result.summary()
    out = [
        (
            f"**{result.dataset}**, {result.budget:g} s per run, best validation loss (nats/char) "
            f"over {max(v['seeds'] for v in s.values())} seeds"
        ),
        "",
        "| cell | hidden | parameters | mean ± std | min – max | steps | k chars/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell, v in s.items():
        out.append(
            f"| {cell.upper()} | {v['hidden_size']} | {v['parameters']:,} | {v['mean']:.4f} ± "
            f"{v['std']:.4f} | {v['min']:.4f} – {v['max']:.4f} | {v['steps']:.0f} | "
            f"{v['chars_per_s'] / 1000:.1f} |"
        )
    lines = [k for v in s.values() for k in v["lines"]]
    if lines:
        keys = [
            k
            for k in dict.fromkeys(lines)
            if any(math.isfinite(v["lines"].get(k, math.nan)) for v in s.values())
        ]  # no empty buckets
        out += [
            "",
            "Loss by characters since the last newline:",
            "",
            "| cell | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for cell, v in s.items():
            out.append(
                f"| {cell.upper()} | " + " | ".join(_fmt(v["lines"].get(k)) for k in keys) + " |"
            )
    contexts = [k for v in s.values() for k in v["contexts"]]
    if contexts:
        keys = list(dict.fromkeys(contexts))
        out += [
            "",
            (
                "Loss when the model sees only the last k characters (same positions; `full` = "
                f"the whole text before, carried state); gain = loss(k = {GAIN_FROM}) "
                f"− loss(full), what context older than {GAIN_FROM} characters is worth:"
            ),
            "",
            "| cell | "
            + " | ".join(f"k = {k}" if k != "full" else "full" for k in keys)
            + " | gain |",
            "|---" * (len(keys) + 2) + "|",
        ]
        for cell, v in s.items():
            c = v["contexts"]
            gain = c.get(GAIN_FROM, math.nan) - c.get("full", math.nan)
            out.append(
                f"| {cell.upper()} | "
                + " | ".join(_fmt(c.get(k)) for k in keys)
                + f" | {_fmt(gain, '+.3f')} |"
            )
    if result.copy:
        delays = list(dict.fromkeys(d for v in result.copy.values() for d in v))
        out += [
            "",
            (
                f"Copy task: loss on the key recalled after d filler characters (nats; a guess is "
                f"ln {len(COPY_KEYS)} = {math.log(len(COPY_KEYS)):.2f}, perfect recall 0):"
            ),
            "",
            "| cell | " + " | ".join(f"d = {d}" for d in delays) + " |",
            "|---" * (len(delays) + 1) + "|",
        ]
        for cell, v in result.copy.items():
            out.append(f"| {cell.upper()} | " + " | ".join(_fmt(v.get(d)) for d in delays) + " |")
    return "\n".join(out)


def plot_curves(result: Comparison, path: Path) -> Path:
    """Validation loss against training time, one colour per cell, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = {"lstm": "tab:blue", "gru": "tab:green", "rnn": "tab:red"}
    for cell in result.cells():
        for i, r in enumerate(x for x in result.runs if x.cell == cell):
            if r.curve:
                t, v = zip(*r.curve)
                ax.plot(
                    t,
                    v,
                    color=colours.get(cell),
                    alpha=0.8,
                    lw=1.2,
                    label=f"{cell.upper()} {r.hidden_size} ({r.parameters:,} params)"
                    if i == 0
                    else None,
                )
    finite = [v for r in result.runs for _, v in r.curve if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"{result.dataset}: equal parameters, {result.budget:g} s per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(
    base: RunConfig,
    *,
    cells: Sequence[str] = CELLS,
    seeds: int = 3,
    budget: float = 120.0,
    out_dir: str | Path = "runs/compare",
    jobs: int = 1,
    probe: bool = True,
    reuse: bool = True,
    copy_delays: Sequence[int] = (),
    copy_budget: float = 20.0,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Train every cell for `budget` seconds with `seeds` seeds at equal parameter counts; returns
    the comparison and writes ``comparison.json``, ``comparison.md`` and ``curves.png`` to
    `out_dir`.

    With `reuse`, runs that a previous call finished (same folder) are read, not trained again.
    `jobs` trains that many runs at once in separate processes. `copy_delays` adds the copy task:
    one small model per cell and delay, `copy_budget` seconds each.
    """
    from charlstm.atomic import atomic_write_text
    from charlstm.data.loading import prepare_data

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cells = list(dict.fromkeys(cells))
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        raise UserError(
            f"--cells takes a comma-separated list of {', '.join(CELLS)}, got {','.join(cells)!r}"
        )
    if seeds < 1 or jobs < 1:
        raise UserError("--seeds and --jobs must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = len(prepare_data(base).vocab)
    sizes = matched_hidden_sizes(base, cells, vocab_size)
    base_seed = base.train.seed
    plan = []
    for cell in cells:
        hidden, params = sizes[cell]
        for i in range(seeds):
            config = base.replace(
                cell=cell, hidden_size=hidden, seed=base_seed + i, max_time=budget
            )
            run_dir = out_dir / f"{cell}-seed{base_seed + i}"
            done = (out_dir / f"{run_dir.name}.done").is_file()
            plan.append((config, run_dir, cell, base_seed + i, hidden, params, reuse and done))
    log(
        "charlstm compare: "
        + ", ".join(f"{c.upper()} {h} ({p:,} params)" for c, (h, p) in sizes.items())
        + f"; {len(plan)} runs of {budget:g} s, {jobs} at a time; runs in {out_dir}"
    )
    todo = [(cfg, run_dir) for cfg, run_dir, *_, skip in plan if not skip]
    copy_runs = []
    if copy_delays:
        copy_sizes = matched_hidden_sizes(
            copy_config("lstm", 32, Path("-"), 1, 0), cells, len(COPY_KEYS) + 3
        )  # keys, ".", "=", "\n"
        for delay in copy_delays:
            text = out_dir / "copy" / f"copy-{delay}.txt"
            text.parent.mkdir(parents=True, exist_ok=True)
            text.write_text(copy_text(delay, seed=delay), encoding="utf-8")
            for cell in cells:
                run_dir = out_dir / "copy" / f"{cell}-d{delay}"
                copy_runs.append((cell, delay, run_dir))
                if not (reuse and (run_dir.parent / f"{run_dir.name}.done").is_file()):
                    todo.append(
                        (
                            copy_config(cell, copy_sizes[cell][0], text, copy_budget, base_seed),
                            run_dir,
                        )
                    )
        log(
            f"charlstm compare: copy task at delays {', '.join(map(str, copy_delays))}, "
            f"{copy_budget:g} s per cell and delay"
        )
    _train_all(todo, jobs, log)
    runs = [
        _read_run(run_dir, cell, seed, hidden, params, probe)
        for _, run_dir, cell, seed, hidden, params, _ in plan
    ]
    result = Comparison(dataset_label(base), budget, sizes, runs)
    for cell, delay, run_dir in copy_runs:
        result.copy.setdefault(cell, {})[str(delay)] = recall_loss(run_dir)
    result.files["json"] = out_dir / "comparison.json"
    atomic_write_text(result.files["json"], json.dumps(result.to_json(), indent=1))
    result.files["table"] = out_dir / "comparison.md"
    atomic_write_text(result.files["table"], markdown(result) + "\n")
    result.files["plot"] = plot_curves(result, out_dir / "curves.png")
    return result


def _train_all(todo: list[tuple[RunConfig, Path]], jobs: int, log: Callable[[str], None]) -> None:
    from tqdm import tqdm

    with tqdm(
        total=len(todo), unit="run", file=sys.stderr, dynamic_ncols=True, disable=not todo
    ) as bar:
        if jobs == 1:
            for config, run_dir in todo:
                bar.set_postfix_str(run_dir.name)
                _train_one(config, str(run_dir))
                bar.update(1)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per worker, not a fork of a process running torch threads
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(_train_one, config, str(run_dir)): run_dir for config, run_dir in todo
            }
            for future in as_completed(futures):
                future.result()
                bar.set_postfix_str(futures[future].name)
                bar.update(1)
