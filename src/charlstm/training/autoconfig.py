"""The automatic configuration: the model, batch and schedule chosen from the text and the budget.

A fixed default suits one size of text. A 12 k-character poem collection wants a small batch, many
passes and heavy regularisation; a 1 M-character play wants a wide layer, a large batch and none; a
100 MB source tree wants the largest model the budget can feed. What decides is how many characters
the run will get through (the budget × this machine's measured speed for a shape, see
calibration.py) against how many there are to learn from. Two quantities follow:

- **characters per parameter** the run will see: a model with too many parameters for its budget
  ends undertrained; the largest width whose budget gives it at least `CHARS_PER_PARAM` characters
  per parameter is chosen (as compute-optimal scaling rules do for language models);
- **epochs**, passes over the training text: many passes memorise, so the dropouts, DropConnect and
  the weight average rise with them (`REGULARISATION`), and a small text gets small batches so that
  it still gets many updates.

The constants come from a sweep over texts of 11 k to 6 M characters and budgets of 30 s to 120 s
on one core (benchmarks/autoconfig_sweep.py; its rows are in benchmarks/data/autoconfig_sweep.jsonl
and docs/benchmarks.md explains how each constant was read off them), from the first pass of
benchmarks/defaults_vs_presets.py, and (the rate and the heavy-regularisation threshold, rules v5
and v6) from side-by-side runs, benchmarks/autoconfig_ab.py. Explicit settings always win: a
field the user set (a flag, a preset's key, a Python argument) is never changed, and the choice
around it is made with it (a given --hidden-size still gets its batch and dropouts chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from charlstm.config import RunConfig
from charlstm.model.evaluation import streams_for
from charlstm.training.calibration import MEASURE_SECONDS, Calibration, Shape

# ------------------------------------------------------------------------------- the fitted rules

# Bumped whenever a constant below changes, and recorded with every sweep row, so that the rows
# each version was judged by stay apart (benchmarks/data/autoconfig_sweep.jsonl).
# Version 7 made a time budget's cosine decay over the expected steps (`decay_steps`).
RULES_VERSION = 7

# Widths the choice moves between (one layer above TWO_LAYERS_BELOW characters, two below).
WIDTHS = (128, 192, 256, 384, 512, 768, 1024, 1536)
# The least number of characters per parameter the budget must let a width see.
CHARS_PER_PARAM = 4.5
# What share of the calibrated step speed a run gets overall (evaluation, dropout masks, the weight
# average and checkpoints take the rest): 0.72-0.82 in the sweep's runs.
EFFICIENCY = 0.75
# Below this many training characters the network has two layers (small texts gain from depth
# with dropout between the layers; large ones from the width a single layer affords).
TWO_LAYERS_BELOW = 200_000
# On a small text the width is capped: beyond it, more width only memorises faster.
SMALL_TEXT_WIDTH = ((50_000, 256), (200_000, 384))
# Characters per step: at most 1/MIN_STEPS_PER_EPOCH of the text, so that a small text still gets
# many updates a pass, and at most 1/MIN_STEPS of what the budget processes.
MIN_STEPS_PER_EPOCH = 40
MIN_STEPS = 1000
STEP_CHARS = (256, 512, 1024, 2048, 4096, 8192)
# Regularisation, as (dropout, embedding dropout, weight drop, locked, ema), by the passes over the
# text the budget allows and the text's size. In the sweep (rules v2) a text seen fewer than 8
# times wanted none; a mid-sized text (onegin, 137 k) seen 48 times wanted LIGHT by 4% over MEDIUM
# and 9% over HEAVY; only the small text (byron, 11 k, 70 passes) wanted HEAVY, by 0.9%, and at
# 17-20 passes too (rules v3, defaults_vs_presets: LIGHT 1.4% behind the HEAVY byron-tuned preset).
# MEDIUM never won a cell, and is kept as the sweep's neighbour between the two. Rules v5 moved
# SMALL_TEXT from 50 k to 20 k: GPL-3 (32 k characters, 43 s, 2×256, 17.6 passes) reached 1.837
# with LIGHT, 1.858 with MEDIUM and 1.906 with HEAVY, while byron (11 k) still wanted HEAVY (2.391
# against 2.440 with LIGHT at 2×256).
NONE = (0.0, 0.0, 0.0, False, 0.0)
LIGHT = (0.2, 0.05, 0.1, True, 0.0)
MEDIUM = (0.4, 0.1, 0.3, True, 0.0)
HEAVY = (0.5, 0.2, 0.6, False, 0.9998)
REGULARISATION = (NONE, LIGHT, MEDIUM, HEAVY)  # from lightest to heaviest
FEW_PASSES = 8.0
SMALL_TEXT = 20_000  # characters: below this, HEAVY once the text is seen FEW_PASSES times
# Adam's rate. Rules v5 doubled it from 3e-3: at 6e-3 every text and width measured did better,
# tinyshakespeare 1×512 at 64×64 for 72 s by 6.0% (1.524 against 1.622), at 16×64 by 3.0%, 1×192
# for 36 s by 1.5%, onegin 2×192 by 1.6%, byron 2×128 by 0.7%, GPL-3 2×256 by 0.6%; 1e-2 was
# within 0.5% of 6e-3 either way. Rules v6 keep 3e-3 from 512 units up: in the benchmark's 216 s
# runs, 1×512 at 64×64 did worse with 6e-3, by 1.1% on tinyshakespeare (1.4748 against 1.4592) and
# 1.3% on the Linux C files (1.8683 against 1.8441), though 6e-3 won the 72 s runs above. So the
# widths the longer budgets choose keep the rate that was measured good for them.
LR = 6e-3
LR_WIDE = 3e-3  # for WIDE_FROM units and more
WIDE_FROM = 512
# What share of the calibrated speed (over the time left after evaluations) a run reaches, for the
# steps a time budget's cosine decays over (`decay_steps`): lower than its real share, so that the
# decay is done by the deadline, not far lower, since the rate idles at its floor after it. In
# the benchmark's runs (defaults_vs_presets) a regularised run reached 0.66-0.78 of it (its
# DropConnect and masks are not in the calibrated step) and an unregularised one 1.00-1.17.
DECAY_EFFICIENCY = 0.65
DECAY_EFFICIENCY_PLAIN = 0.95
EVAL_SHARE = 0.1  # the most of the time scheduled evaluations may take
# The most of a budget that measuring may take on a machine seen for the first time: past it, the
# search stops at the widest width known to fit (a 3 s run must still train).
CALIBRATION_SHARE = 0.05
# An open-ended run (no --max-time, no --max-steps) is sized as if it had an hour.
OPEN_ENDED_SECONDS = 3600.0


@dataclass(frozen=True)
class Choice:
    """What the automatic configuration chose, and the sentence that says why."""

    config: RunConfig
    explanation: str
    seconds: float  # spent measuring (counted against the budget)


class _Fastest:
    """The speed of a shape on all cores or on one thread, whichever is faster (and which).

    A small model's step is too short to share between cores: on a 2-core Xeon a 2×128 LSTM at
    16×64 trained at 13 k chars/s on two threads and 175 k on one (OpenMP's passive waiting, set on
    import, wakes the second thread for every small operation). So every shape is measured both
    ways, once, and the run takes the faster thread count for the shape it trains."""

    def __init__(self, calib, threads: int, single) -> None:
        self.calib, self.threads, self.single = calib, threads, single

    def speed(self, shape: Shape) -> float:
        many = self.calib.speed(shape)
        return max(many, self.single.speed(shape)) if self.single is not None else many

    def threads_for(self, shape: Shape) -> int:
        if self.single is not None and self.single.speed(shape) > self.calib.speed(shape):
            return 1
        return self.threads

    @property
    def seconds(self) -> float:
        return self.calib.seconds + (self.single.seconds if self.single is not None else 0.0)

    @property
    def measured(self) -> list[str]:
        return self.calib.measured + (self.single.measured if self.single is not None else [])


def explicit_fields(config: RunConfig) -> set[str]:
    """The fields of `config` that differ from the built-in defaults: what a Python caller who
    passes a RunConfig has set (the CLI knows its flags and preset keys exactly instead)."""
    default = RunConfig()
    found = set()
    for section in ("data", "model", "optim", "train"):
        mine, base = getattr(config, section), getattr(default, section)
        for f in fields(mine):
            if getattr(mine, f.name) != getattr(base, f.name):
                found.add(f.name)
    return found


def parameters(cell: str, hidden: int, layers: int, embedding: int, vocab: int) -> int:
    """Parameters of the network (embedding, recurrent layers with both biases, output layer)."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    total = vocab * embedding + hidden * vocab + vocab
    for layer in range(layers):
        fan_in = embedding if layer == 0 else hidden
        total += gates * hidden * (fan_in + hidden + 2)
    return total


def _step_chars(n_train: int, budget_chars: float | None) -> int:
    limit = n_train / MIN_STEPS_PER_EPOCH
    if budget_chars is not None:
        limit = min(limit, budget_chars / MIN_STEPS)
    fitting = [c for c in STEP_CHARS if c <= limit]
    return fitting[-1] if fitting else STEP_CHARS[0]


def _batch(step_chars: int) -> tuple[int, int]:
    """(batch size, window) for a number of characters per step: windows of 64, 32 for the
    smallest steps (a small text has few long-range patterns worth the shorter batch)."""
    seq = 32 if step_chars <= 256 else 64
    return step_chars // seq, seq


def _regularisation(epochs: float, n_train: int) -> tuple[float, float, float, bool, float]:
    if epochs < FEW_PASSES:
        return NONE
    if n_train < SMALL_TEXT:
        return HEAVY
    return LIGHT


def _fmt_chars(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.0f} k"
    return f"{n:.0f}"


def choose(
    config: RunConfig,
    explicit: set[str],
    n_train: int,
    n_val: int,
    vocab_size: int,
    device: torch.device,
    precision: str,
    threads: int,
    calibration: Calibration | None = None,
    single_thread: Calibration | None = None,
) -> Choice:
    """The configuration for this text, budget and machine; explicit fields are kept as given.
    `calibration` gives the speeds of shapes (by default measured here and cached), and
    `single_thread` their speeds on one thread (by default measured too, on a CPU with more)."""
    m, d, t = config.model, config.data, config.train
    cell = m.cell
    embedding = m.embedding_size
    budget = t.max_time if t.max_time else None
    if budget is None and not t.max_steps:
        budget = OPEN_ENDED_SECONDS
    # A search measures up to about eight shapes; on a short budget each is timed for less, so
    # that measuring stays within CALIBRATION_SHARE of it (a 20 s GRU run on a cold cache had
    # spent 2.9 s on six shapes timed for 0.3 s each).
    timed = (
        MEASURE_SECONDS if budget is None else min(MEASURE_SECONDS, budget * CALIBRATION_SHARE / 8)
    )
    if single_thread is None and calibration is None and device.type == "cpu" and threads > 1:
        single_thread = Calibration(device, precision, 1, timed)
    if "threads" in explicit or threads == 1:
        single_thread = None
    calib = _Fastest(
        calibration or Calibration(device, precision, threads, timed), threads, single_thread
    )
    usable = budget * (1 - EVAL_SHARE) if budget else None

    def given(name: str) -> bool:
        return name in explicit

    layers = m.num_layers if given("num_layers") else (2 if n_train < TWO_LAYERS_BELOW else 1)
    cap = WIDTHS[-1]
    for below, width in SMALL_TEXT_WIDTH:
        if n_train < below:
            cap = width
            break
    widths = [m.hidden_size] if given("hidden_size") else [w for w in WIDTHS if w <= cap]

    def step_shape(width: int, step_chars: int) -> Shape:
        batch, seq = _batch(step_chars)
        if given("batch_size"):
            batch = d.batch_size
        if given("seq_len"):
            seq = d.seq_len
        return Shape(cell, width, layers, embedding, vocab_size, batch, seq)

    def chars_in_budget(shape: Shape) -> float:
        if usable is not None:
            seen = calib.speed(shape) * EFFICIENCY * usable
            if t.max_steps:
                seen = min(seen, t.max_steps * shape.batch_size * shape.seq_len)
            return seen
        return t.max_steps * shape.batch_size * shape.seq_len

    def fits(width: int) -> bool:
        """Whether the budget feeds `width` enough characters, measured at the step the text
        alone would get (the budget may shrink the step below; that costs one more measurement,
        of the chosen width only)."""
        if budget is not None and calib.seconds > CALIBRATION_SHARE * budget:
            return False
        seen = chars_in_budget(step_shape(width, _step_chars(n_train, None)))
        return seen >= CHARS_PER_PARAM * parameters(cell, width, layers, embedding, vocab_size)

    # The largest width that fits; fitting shrinks as width grows, so a binary search measures
    # only about log2(len(widths)) shapes.
    lo, hi = 0, len(widths) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(widths[mid]):
            lo = mid
        else:
            hi = mid - 1
    width = widths[lo]
    shape = step_shape(width, _step_chars(n_train, None))
    refined = step_shape(width, _step_chars(n_train, chars_in_budget(shape)))
    shape, seen = refined, chars_in_budget(refined)
    chosen_threads = calib.threads_for(shape)
    epochs = seen / max(n_train, 1)
    dropout, emb_dropout, weight_drop, locked, ema = _regularisation(epochs, n_train)
    step_chars = shape.batch_size * shape.seq_len
    speed = seen / usable if usable else calib.speed(shape) * EFFICIENCY
    steps = seen / step_chars
    # Evaluation: a scheduled pass reads the validation slice (up to eval_chars) at about three
    # times the training speed (forward only); space them so that they take at most EVAL_SHARE.
    # A large split is read in more streams (`streams_for`, as every reader reads it); the slice
    # then gives each of them 512 characters, not 64.
    streams, slice_chars = streams_for(n_val, t.eval_streams), t.eval_chars
    if streams != t.eval_streams:
        slice_chars = max(t.eval_chars, streams * 512)
    eval_chars = min(n_val, slice_chars or n_val)
    eval_seconds = eval_chars / (3 * speed)
    step_seconds = step_chars / speed
    interval = max(25, math.ceil(eval_seconds / (EVAL_SHARE * step_seconds)))
    if budget is not None:  # and at least about 10 evaluations in the budget
        interval = max(1, min(interval, int(steps // 10) or 1))
    cosine = t.max_time is not None or t.max_steps is not None
    lr = LR if width < WIDE_FROM else LR_WIDE
    # A time budget's cosine decays over the steps the budget is expected to hold, not by the
    # clock (schedule.py): two runs with the same settings and seed then take the same steps (a
    # clock-driven rate made the same settings and seed end 2% apart on a 15 k-character text).
    # The expectation is at DECAY_EFFICIENCY, which the runs measured beat, by a little.
    schedule = config.optim.schedule if given("schedule") else "cosine" if cosine else "plateau"
    decay_steps = None
    if t.max_time and schedule == "cosine":
        regs = {"dropout": dropout, "embedding_dropout": emb_dropout, "weight_drop": weight_drop}
        plain = not any(getattr(m, k) if given(k) else v for k, v in regs.items())
        share = DECAY_EFFICIENCY_PLAIN if plain else DECAY_EFFICIENCY
        expected = calib.speed(shape) * share * t.max_time * (1 - EVAL_SHARE) / step_chars
        decay_steps = max(1, int(min(expected, t.max_steps or math.inf)))
    chosen: dict[str, Any] = {
        "hidden_size": width,
        "num_layers": layers,
        "batch_size": shape.batch_size,
        "seq_len": shape.seq_len,
        "dropout": dropout,
        "embedding_dropout": emb_dropout,
        "weight_drop": weight_drop,
        "locked_dropout": locked,
        "ema": ema,
        "lr": lr,
        "schedule": "cosine" if cosine else "plateau",
        "min_lr": (config.optim.lr if given("lr") else lr) / 10,
        "decay_steps": decay_steps,
        "warmup_steps": 50 if width >= 512 else 0,
        "eval_interval": interval,
        "eval_streams": streams,
        "eval_chars": slice_chars,
        "early_stopping": 20 if epochs >= 30 or not cosine else 0,
        "threads": chosen_threads if chosen_threads != threads else None,
    }
    chosen = {
        k: v for k, v in chosen.items() if v is not None or k not in ("threads", "decay_steps")
    }
    chosen = {k: v for k, v in chosen.items() if not given(k)}
    new = config.replace(**chosen)
    nm, no, nd = new.model, new.optim, new.data
    regs = (
        "no dropout"
        if nm.dropout == nm.embedding_dropout == nm.weight_drop == 0
        else f"dropout {nm.dropout:g}/{nm.embedding_dropout:g}, weight drop {nm.weight_drop:g}"
    )
    sched = f"cosine to {no.min_lr:.0e}" if no.schedule == "cosine" else no.schedule
    if no.schedule == "cosine" and no.decay_steps:
        sched += f" over {no.decay_steps:,} steps"
    budget_text = f"{t.max_time:g} s" if t.max_time else "open-ended"
    if t.max_steps:
        budget_text += f", {t.max_steps:,} steps"
    explanation = (
        f"{_fmt_chars(n_train)} characters, {budget_text}, {chosen_threads} "
        f"{'thread' if chosen_threads == 1 else 'threads'} at {_fmt_chars(speed)} chars/s "
        f"({epochs:.1f} passes) → {nm.num_layers}×{nm.hidden_size}, batch "
        f"{nd.batch_size}×{nd.seq_len}, {regs}"
        + (f", ema {no.ema:g}" if no.ema else "")
        + f", {sched}, eval every {new.train.eval_interval}"
    )
    if calib.measured:
        explanation += f" (calibrated {len(calib.measured)} shapes in {calib.seconds:.1f} s)"
    return Choice(new, explanation, calib.seconds)
