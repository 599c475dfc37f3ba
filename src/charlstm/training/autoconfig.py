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
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from charlstm.config import RunConfig
from charlstm.model.evaluation import spread_slice, streams_for
from charlstm.training.calibration import MEASURE_SECONDS, Calibration, Shape

# ------------------------------------------------------------------------------- the fitted rules

# Bumped whenever a constant below changes, and recorded with every sweep row, so that the rows
# each version was judged by stay apart (benchmarks/data/autoconfig_sweep.jsonl).
# Version 7 made a time budget's cosine decay over the expected steps (`decay_steps`).
# Version 8 expects those steps from the chosen configuration's own step, timed with its dropouts,
# DropConnect and weight average (DECAY_EFFICIENCY_OWN): a regularised run's share of the plain
# step's speed (DECAY_EFFICIENCY) was fitted on small models (0.66-0.78), and a wide regularised
# one reached about 0.96, so its cosine ended at 70% of the README's ten-minute run and the rate
# idled at its floor after. It also spaces evaluations by what the slice reads now (its warm-ups
# too, `evaluation.spread_slice`), and keeps measuring within CALIBRATION_SHARE (`_Speeds`).
RULES_VERSION = 8

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
# the benchmark's runs (defaults_vs_presets) an unregularised run reached 1.00-1.17 of its step's
# speed (DECAY_EFFICIENCY_PLAIN). A regularised run's own step (DECAY_EFFICIENCY_OWN) is timed
# once its configuration is chosen; where measuring has no time left for it, its plain step's
# speed stands in at DECAY_EFFICIENCY, the share small regularised runs reached of it (0.66-0.78).
DECAY_EFFICIENCY = 0.65
DECAY_EFFICIENCY_PLAIN = 0.95
# Rules v8, on the busy 2-core Xeon: regularised runs took 0.94-1.44 of their own step's timed
# speed over the time left after evaluations (onegin-ru 0.94, byron-ru 1.18, a 1×768 run 1.41 and
# 1.44, whose short timing had read its own step at 0.73-0.77 of the plain one against 0.89 over
# twelve steps). So the own step gets the plain step's share: a run reaches its own step's speed,
# regularised or not, and the rate idling at its floor costs more than a cosine a few percent
# short of its end at the deadline (the clock takes over a tenth of the budget behind).
DECAY_EFFICIENCY_OWN = 0.95
EVAL_SHARE = 0.1  # the most of the time scheduled evaluations may take
# The most of a budget that measuring may take on a machine seen for the first time: a shape whose
# measurement would go past it is not measured (the search stops at the widest width known to
# fit; a 3 s run must still train). A 90 s run on a cold cache once spent 6.6 s (7%) measuring.
CALIBRATION_SHARE = 0.05
# A wider layer never trains faster per character than a narrower one at the same batch: a width
# that would not fit even at the speed of a narrower one (times this, for measurement noise) is
# not measured. Nor are all threads for a shape no larger than one where one thread was faster.
SPEED_NOISE = 1.15
# An open-ended run (no --max-time, no --max-steps) is sized as if it had an hour.
OPEN_ENDED_SECONDS = 3600.0


@dataclass(frozen=True)
class Choice:
    """What the automatic configuration chose, and the sentence that says why."""

    config: RunConfig
    explanation: str
    seconds: float  # spent measuring and starting torch up (counted against the budget)


class _Speeds:
    """The speeds the choice reads: of a shape on all cores or on one thread, whichever is faster
    (and which), measured within the time measuring may take.

    A small model's step is too short to share between cores: on a 2-core Xeon a 2×128 LSTM at
    16×64 trained at 13 k chars/s on two threads and 175 k on one (OpenMP's passive waiting, set on
    import, wakes the second thread for every small operation). So a shape is measured both ways,
    and the run takes the faster thread count for the shape it trains. Measuring costs time the
    run would train in, so: a shape no larger than one where one thread was faster is not timed
    on all (a larger step shares better, never worse), nor is any where a probe finds all threads
    waiting on each other (a busy machine); a shape whose measurement would take
    measuring past `allowance` seconds (its step predicted from a shape already read) is not
    measured at all (`speed` gives None), and one that runs past it all the same (all threads
    of a busy machine can be ten times slower than one, which nothing read predicts) stops after
    its step; and `bound` tells the search which widths cannot fit before they are measured."""

    def __init__(self, calib, threads: int, single, allowance: float | None) -> None:
        self.calib, self.threads, self.single = calib, threads, single
        self.allowance = allowance
        self.read: dict[str, tuple[Shape, float]] = {}  # what this choice read, by calib and key
        self.losers: list[Shape] = []  # shapes where one thread beat all
        self.stalled: bool | None = None  # all threads wait on each other (probed once)
        self.start_up = 0.0  # torch's first training step in this process, before measuring

    def _get(self, calib, shape: Shape, name: str, required: bool = False) -> float | None:
        key = f"{name}:{shape.key()}"
        if key in self.read:
            return self.read[key][1]
        value = calib.cached(shape)
        if value is None:
            if not required and not self._affordable(calib, shape, name):
                return None
            if not self.measured:
                self.start_up += calib.start_up()
            left = None if required or self.allowance is None else self.allowance - self.seconds
            value = calib.speed(shape, left)
        self.read[key] = (shape, value)
        return value

    def _affordable(self, calib, shape: Shape, name: str, times: int = 1) -> bool:
        """Whether measuring `shape` (`times` steps a round) should end within the allowance: a
        warm-up step and at most two more (a slow step is timed once), besides the time each
        measurement is given."""
        if self.allowance is None:
            return True
        known = [  # shapes already read with the same thread count, the one thread's otherwise
            (s, v) for key, (s, v) in self.read.items() if key.startswith(name + ":")
        ] or [(s, v) for key, (s, v) in self.read.items() if key.startswith("one:")]
        step = 0.0
        if known:
            ref, ref_speed = min(known, key=lambda sv: abs(sv[0].hidden_size - shape.hidden_size))
            step = _step_work(shape) / _step_work(ref) * _chars(ref) / ref_speed
        return self.seconds + calib.measure_seconds + 3 * times * step <= self.allowance

    def speed(self, shape: Shape, required: bool = False) -> float | None:
        """Characters per second of `shape` on the faster thread count; None where it would have
        to be measured and the allowance does not leave time for it (unless `required`: the
        shape the run trains must have a speed)."""
        one = self._get(self.single, shape, "one", required) if self.single is not None else None
        if self.single is not None and one is None:
            return None
        # Not timed on all threads: a step within one where one thread won, or a busy machine.
        skip = one is not None and f"all:{shape.key()}" not in self.read
        if skip and (
            any(_within(shape, loser) for loser in self.losers)
            or (self.calib.cached(shape) is None and self._stalls(shape))
        ):
            return one
        many = self._get(self.calib, shape, "all", required and one is None)
        if one is not None and (many is None or one > many):
            self.losers.append(shape)
            return one
        return many

    def _stalls(self, shape: Shape) -> bool:
        """Whether all threads are too slow to time now (`Calibration.stalls`, probed once)."""
        if self.stalled is None:
            self.stalled = self.calib.stalls(shape)
        return self.stalled

    def threads_for(self, shape: Shape) -> int:
        """The faster thread count for `shape`, which `speed` has read: one thread where it was
        faster, or where all were not timed (a step within one where one thread won)."""
        if self.single is None:
            return self.threads
        one, many = (self.read.get(f"{name}:{shape.key()}") for name in ("one", "all"))
        if many is None or (one is not None and one[1] > many[1]):
            return 1
        return self.threads

    def bound(self, shape: Shape) -> float | None:
        """The most `shape` can train at: the speed of a narrower layer read so far at the same
        batch (None: none was read)."""
        speeds = [
            v
            for s, v in self.read.values()
            if s.hidden_size < shape.hidden_size and s == replace(shape, hidden_size=s.hidden_size)
        ]
        return max(speeds) if speeds else None

    def own(self, shape: Shape, threads: int) -> float | None:
        """The speed of the chosen configuration's own step (`shape` with its regularisation) on
        `threads` (`Calibration.own_speed`); None where the allowance leaves no time for it."""
        one = threads == 1 and self.single is not None
        calib, name = (self.single, "one") if one else (self.calib, "all")
        key = f"{name}:{shape.key()}"
        if key in self.read:
            return self.read[key][1]
        value = calib.cached(shape)
        if value is None:
            # Its own and its plain step, in turn: about twice a plain measurement.
            if not self._affordable(calib, shape, name, 2):
                return None
            left = None if self.allowance is None else self.allowance - self.seconds
            value = calib.own_speed(shape, left)
        self.read[key] = (shape, value)
        return value

    @property
    def seconds(self) -> float:
        return self.calib.seconds + (self.single.seconds if self.single is not None else 0.0)

    @property
    def measured(self) -> list[str]:
        return self.calib.measured + (self.single.measured if self.single is not None else [])


def _chars(shape: Shape) -> int:
    return shape.batch_size * shape.seq_len


def _step_work(shape: Shape) -> float:
    """What a step's time grows with: its characters times the parameters each passes through."""
    cell, h, n, e, v = (
        shape.cell,
        shape.hidden_size,
        shape.num_layers,
        shape.embedding_size,
        shape.vocab_size,
    )
    return _chars(shape) * parameters(cell, h, n, e, v)


def _within(shape: Shape, larger: Shape) -> bool:
    """Whether `shape` is `larger` or a smaller step of the same kind (width, batch, window)."""
    return (
        shape.plain() == shape
        and (shape.cell, shape.num_layers, shape.embedding_size, shape.vocab_size)
        == (larger.cell, larger.num_layers, larger.embedding_size, larger.vocab_size)
        and shape.hidden_size <= larger.hidden_size
        and shape.batch_size <= larger.batch_size
        and shape.seq_len <= larger.seq_len
    )


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
    speeds = _Speeds(
        calibration or Calibration(device, precision, threads, timed),
        threads,
        single_thread,
        None if budget is None else CALIBRATION_SHARE * budget,
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

    def chars_in_budget(shape: Shape, speed: float) -> float:
        if usable is not None:
            seen = speed * EFFICIENCY * usable
            if t.max_steps:
                seen = min(seen, t.max_steps * shape.batch_size * shape.seq_len)
            return seen
        return t.max_steps * shape.batch_size * shape.seq_len

    def fits(width: int) -> bool:
        """Whether the budget feeds `width` enough characters, measured at the step the text
        alone would get (the budget may shrink the step below; that costs one more measurement,
        of the chosen width only). A width that cannot fit even at a narrower one's speed, or
        whose measurement the allowance has no time for, does not."""
        shape = step_shape(width, _step_chars(n_train, None))
        need = CHARS_PER_PARAM * parameters(cell, width, layers, embedding, vocab_size)
        if usable is None:  # a step budget alone: no speed is needed
            return chars_in_budget(shape, 0.0) >= need
        bound = speeds.bound(shape)
        if bound is not None and chars_in_budget(shape, bound * SPEED_NOISE) < need:
            return False
        speed = speeds.speed(shape)
        return speed is not None and chars_in_budget(shape, speed) >= need

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
    step_speed = speeds.speed(shape, required=True)
    assert step_speed is not None  # required: measured whatever the allowance says
    refined = step_shape(width, _step_chars(n_train, chars_in_budget(shape, step_speed)))
    if refined != shape and (refined_speed := speeds.speed(refined)) is not None:
        shape, step_speed = refined, refined_speed
    seen = chars_in_budget(shape, step_speed)
    chosen_threads = speeds.threads_for(shape)
    epochs = seen / max(n_train, 1)
    dropout, emb_dropout, weight_drop, locked, ema = _regularisation(epochs, n_train)
    step_chars = shape.batch_size * shape.seq_len
    speed = seen / usable if usable else step_speed * EFFICIENCY
    steps = seen / step_chars
    # Evaluation: a scheduled pass reads the validation slice (`spread_slice`: eval_chars scored,
    # and the warm-ups before them) at about three times the training speed (forward only); space
    # them so that they take at most EVAL_SHARE. A large split is read in more streams
    # (`streams_for`, as every reader reads it) and is as varied as it is long: its slice holds
    # 512 characters for each of them.
    streams, slice_chars = streams_for(n_val, t.eval_streams), t.eval_chars
    if streams != t.eval_streams:
        slice_chars = max(t.eval_chars, streams * 512)
    reading = spread_slice(n_val, slice_chars) if n_val > 1 else None
    eval_chars = n_val if reading is None else len(reading.starts) * reading.length
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
    # The steps are expected from the run's own step, its regularisation included (one more
    # measurement, cached as the others), at a share the runs measured beat, by a little.
    schedule = config.optim.schedule if given("schedule") else "cosine" if cosine else "plateau"
    decay_steps = None
    if t.max_time and schedule == "cosine":
        regs = {
            "dropout": dropout,
            "embedding_dropout": emb_dropout,
            "weight_drop": weight_drop,
            "locked_dropout": locked,
            "ema": ema,
        }
        given_regs = {k: getattr(config.optim if k == "ema" else m, k) for k in regs if given(k)}
        own = replace(shape, **{**regs, **given_regs})
        rate, share = step_speed, DECAY_EFFICIENCY_PLAIN
        if own.regularised:
            own_speed = speeds.own(own, chosen_threads)
            rate = own_speed if own_speed is not None else step_speed
            share = DECAY_EFFICIENCY_OWN if own_speed is not None else DECAY_EFFICIENCY
        expected = rate * share * t.max_time * (1 - EVAL_SHARE) / step_chars
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
    if speeds.measured:
        explanation += f" (calibrated {len(speeds.measured)} shapes in {speeds.seconds:.1f} s"
        if speeds.start_up >= 0.05:
            explanation += f", after {speeds.start_up:.1f} s of starting torch"
        explanation += ")"
    return Choice(new, explanation, speeds.seconds + speeds.start_up)
