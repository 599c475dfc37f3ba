"""How fast this machine trains a given model shape: measured once, then read from a cache.

The automatic configuration (autoconfig.py) sizes the model to what the time budget lets it see, so
it needs the training speed of each shape it considers, on this machine, with this thread count and
number type, and, for the steps its cosine decays over, the speed of the configuration it chose
with its dropouts, DropConnect and weight average. A measurement is a few real training steps
(forward, backward, Adam) on random ids; it takes a fraction of a second to a second or two.
Measurements are cached per machine and shape in ``$XDG_CACHE_HOME/charlstm/calibration.json``
(``CHARLSTM_CACHE`` overrides the folder), so the second run on a machine spends nothing on it, and
two runs with the same config and seed choose the same model: the choice depends on the cached
figure, not on how busy the machine was the second time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from charlstm.atomic import atomic_write_text
from charlstm.config import ModelConfig
from charlstm.hardware import autocast, cpu_name

CACHE_VERSION = 1
# How long one shape is timed for at most (after a warm-up step); a short budget asks for less.
MEASURE_SECONDS = 0.3
# Before all threads are timed, PROBE_PRODUCTS of the recurrent layer's product for one time step
# ((batch, hidden) × (hidden, 4·hidden) for an LSTM) on one thread, then on all: where all take
# STALL times as long, they wait on each other (another process holds a core, or the step is too
# small to share), and no step of theirs is timed. On the 2-core Xeon, busy with other jobs, one
# warm-up step of a 2×256 LSTM on both threads took 12.3 s (167 characters/s, against 10 k on
# one thread).
PROBE_PRODUCTS = 20
STALL = 2.0
# The least rounds (a step of the regularised and of the plain configuration each) the own step's
# ratio is timed over: it is one figure, and a step or two of a wide model are noise.
RELATIVE_ROUNDS = 4


@dataclass(frozen=True)
class Shape:
    """What the speed of a training step depends on. The search over widths times plain steps;
    the regularisation (dropouts, DropConnect, the weight average's decay) is set only to time
    the chosen configuration's own step: a wide model at a large batch loses 5-11% of its speed to
    it, a small one a fifth to a quarter."""

    cell: str
    hidden_size: int
    num_layers: int
    embedding_size: int
    vocab_size: int
    batch_size: int
    seq_len: int
    dropout: float = 0.0
    embedding_dropout: float = 0.0
    weight_drop: float = 0.0
    locked_dropout: bool = False
    ema: float = 0.0

    @property
    def regularised(self) -> bool:
        return bool(self.dropout or self.embedding_dropout or self.weight_drop or self.ema)

    def plain(self) -> Shape:
        """The same step without regularisation."""
        return replace(
            self, dropout=0.0, embedding_dropout=0.0, weight_drop=0.0, locked_dropout=False, ema=0.0
        )

    def key(self) -> str:
        key = (
            f"{self.cell}-{self.num_layers}x{self.hidden_size}-e{self.embedding_size}"
            f"-v{self.vocab_size}-b{self.batch_size}x{self.seq_len}"
        )
        if self.regularised:  # a plain step keeps the key caches have always had
            key += f"-d{self.dropout:g}/{self.embedding_dropout:g}/{self.weight_drop:g}"
            key += ("l" if self.locked_dropout else "") + (f"-ema{self.ema:g}" if self.ema else "")
        return key


def _openmp_waiting() -> str:
    """How OpenMP's idle threads wait, where it is not charlstm's passive default (set on import):
    spinning threads make several threads a different machine, 1.5 times faster on a quiet one
    (benchmarks/thread_wait.py), so their speeds are cached apart."""
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE").strip().upper()
    spin = os.environ.get("GOMP_SPINCOUNT")
    parts = ([] if policy == "PASSIVE" else [policy.lower()]) + ([f"spin {spin}"] if spin else [])
    return f"|wait {' '.join(parts)}" if parts else ""


def machine_key(device: torch.device, precision: str, threads: int) -> str:
    """The machine part of a cache key: the processor, the thread count (and, for several CPU
    threads, how they wait when it is not the default), the number type, torch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    waiting = _openmp_waiting() if device.type == "cpu" and threads > 1 else ""
    return f"{device.type}:{name}|{threads}t{waiting}|{precision}|torch {torch.__version__}"


def cache_path() -> Path:
    folder = os.environ.get("CHARLSTM_CACHE")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "charlstm")
    return Path(folder) / "calibration.json"


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    """The cached speeds; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
        return {}
    machines = doc.get("machines")
    return machines if isinstance(machines, dict) else {}


def _write_cache(path: Path, machines: dict[str, dict[str, float]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            path, json.dumps({"version": CACHE_VERSION, "machines": machines}, indent=1)
        )
    except OSError:
        pass  # a read-only home only costs the next run a new measurement


def measure(
    shape: Shape,
    device: torch.device,
    precision: str,
    seconds: float = MEASURE_SECONDS,
    steps: int = 10,
    deadline: float | None = None,
) -> float:
    """Characters per second of real training steps of `shape`: one warm-up step, then steps
    until `seconds` have passed or `steps` were taken (at least one: a wide shape's step can
    take longer than `seconds`, and the warm-up has already paid for its first). No step starts
    after `deadline` (a `time.perf_counter()` value): a warm-up that ends past it gives its own
    speed, a low figure (it pays for first-call set-up), which is what a machine that busy or
    that slow earns."""
    return _train_steps(shape, device, precision, seconds, steps, deadline)


def _trainer(shape: Shape, device: torch.device, precision: str) -> Callable[[], None]:
    """One real training step of `shape` (forward, backward, clipping, Adam, the weight average)
    on random ids, as a function to call repeatedly."""
    cfg = ModelConfig(
        cell=shape.cell,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        embedding_size=shape.embedding_size,
        vocab_size=shape.vocab_size,
        dropout=shape.dropout,
        embedding_dropout=shape.embedding_dropout,
        weight_drop=shape.weight_drop,
        locked_dropout=shape.locked_dropout,
    )
    from charlstm.model import CharRNN, detach_hidden

    gen = torch.Generator().manual_seed(0)
    model = CharRNN(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), generator=gen)
    y = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), generator=gen)
    x, y = x.to(device), y.to(device)
    hidden = None
    # The weight average as the loop keeps it (a lerp of every weight a step), from a copy.
    average = [p.detach().clone() for p in model.parameters()] if shape.ema else None

    def step() -> None:
        nonlocal hidden
        with autocast(device, precision):
            logits, hidden = model(x, hidden)
        loss = F.cross_entropy(logits.float().reshape(-1, shape.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(average, list(model.parameters()), 1.0 - shape.ema)
        hidden = detach_hidden(hidden)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _timed_steps(
    steps_of: list[Callable[[], None]],
    seconds: float,
    steps: int,
    deadline: float | None,
    least: int = 1,
) -> list[float]:
    """Seconds each of `steps_of` took over the same rounds: a warm-up step of each, then rounds
    of one step of each in turn until `seconds` have passed or `steps` rounds were taken (at
    least `least`), none started after `deadline` (a warm-up that ends past it is the timing)."""
    warm = []
    for step in steps_of:
        start = time.perf_counter()
        step()
        warm.append(time.perf_counter() - start)
    if deadline is not None and time.perf_counter() >= deadline:
        return warm
    spent, done = [0.0] * len(steps_of), 0
    while done < least or (done < steps and sum(spent) < seconds):
        for i, step in enumerate(steps_of):
            start = time.perf_counter()
            step()
            spent[i] += time.perf_counter() - start
        done += 1
        if deadline is not None and time.perf_counter() >= deadline:
            break
    return [t / done for t in spent]


@contextmanager
def _rng_kept() -> Iterator[None]:
    """Measuring must not change the run's random stream (weights drawn, masks, ids)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _train_steps(
    shape: Shape,
    device: torch.device,
    precision: str,
    seconds: float,
    steps: int,
    deadline: float | None,
) -> float:
    """`measure`'s work (tests replace `measure`; `start_up` must take a real step)."""
    with _rng_kept():
        step = _trainer(shape, device, precision)
        (step_seconds,) = _timed_steps([step], seconds, steps, deadline)
    return shape.batch_size * shape.seq_len / max(step_seconds, 1e-9)


def measure_relative(
    shape: Shape,
    device: torch.device,
    precision: str,
    seconds: float = MEASURE_SECONDS,
    steps: int = 10,
    deadline: float | None = None,
) -> float:
    """How fast `shape` (with its regularisation) trains relative to its plain step (below 1:
    slower), their steps timed in turn, so that a machine whose load changes between two
    measurements does not skew it: on the busy Xeon a 1×768 step with its dropouts, timed a
    minute after the plain one, read 0.42 of it. At least RELATIVE_ROUNDS rounds (before the
    deadline): from one or two, the same step read 0.73-0.77 of the plain one, from twelve 0.89."""
    with _rng_kept():
        both = [_trainer(s, device, precision) for s in (shape, shape.plain())]
        own, plain = _timed_steps(both, seconds, steps, deadline, least=RELATIVE_ROUNDS)
    return plain / max(own, 1e-9)


_started = False  # whether this process has taken a training step (see `start_up`)


def start_up(device: torch.device, precision: str) -> float:
    """Take this process's first training step, on a tiny model, and return its seconds (0 when
    one was taken before). Adam's first step imports torch._dynamo, 1.5-9 s on the 2-core Xeon
    depending on how busy it is: a cost of starting torch that the run's own first step pays
    when nothing is measured, and that is no shape's speed."""
    global _started
    if _started:
        return 0.0
    start = time.perf_counter()
    _train_steps(Shape("lstm", 8, 1, 4, 8, 1, 2), device, precision, 0.0, 1, None)
    _started = True
    return time.perf_counter() - start


def _time_products(h: torch.Tensor, w: torch.Tensor, device: torch.device, limit: float) -> float:
    """Seconds for PROBE_PRODUCTS products h @ w after one untimed one, or the time taken so far
    once it passes `limit`."""

    def product() -> None:
        h @ w
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    product()
    start = time.perf_counter()
    for _ in range(PROBE_PRODUCTS):
        product()
        if time.perf_counter() - start > limit:
            break
    return time.perf_counter() - start


class Calibration:
    """Training speeds of shapes on one machine, measured on first use and cached on disk."""

    def __init__(
        self, device: torch.device, precision: str, threads: int, seconds: float = MEASURE_SECONDS
    ) -> None:
        self.device, self.precision, self.threads = device, precision, threads
        self.measure_seconds = seconds  # how long one shape is timed for (a short budget: less)
        self.machine = machine_key(device, precision, threads)
        self.path = cache_path()
        self.measured: list[str] = []  # the shapes measured now (not from the cache)
        self.seconds = 0.0  # time spent measuring

    def start_up(self) -> float:
        """`start_up` on this calibration's device: torch's first training step in the process."""
        return start_up(self.device, self.precision)

    def stalls(self, shape: Shape) -> bool:
        """Whether this calibration's threads compute `shape`'s recurrent product STALL times
        slower than one thread does right now (never cached: it is the machine's state, not its
        speed). The probe on all threads stops as soon as it is that slow, so a busy machine
        costs it a few of its products, a quiet one well under a millisecond."""
        if self.threads == 1:
            return False
        start = time.perf_counter()
        gates = {"lstm": 4, "gru": 3, "rnn": 1}.get(shape.cell, 4) * shape.hidden_size
        h = torch.randn(shape.batch_size, shape.hidden_size, device=self.device)
        w = torch.randn(shape.hidden_size, gates, device=self.device)
        before = torch.get_num_threads()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                torch.set_num_threads(1)
                one = _time_products(h, w, self.device, math.inf)
                torch.set_num_threads(self.threads)
                many = _time_products(h, w, self.device, STALL * one)
        finally:
            torch.set_num_threads(before)
            self.seconds += time.perf_counter() - start
        return many > STALL * one

    def own_speed(self, shape: Shape, seconds_left: float | None = None) -> float:
        """Characters per second of `shape` with its regularisation: its plain step's speed
        (`speed`, usually cached) times `measure_relative`, cached under its own key."""
        cached = self.cached(shape)
        if cached is not None:
            return cached
        spent = self.seconds
        plain = self.speed(shape.plain(), seconds_left)
        left = None if seconds_left is None else seconds_left - (self.seconds - spent)

        def relative(deadline: float | None) -> float:
            ratio = measure_relative(
                shape, self.device, self.precision, self.measure_seconds, deadline=deadline
            )
            return plain * ratio

        return self._timed(shape, left, relative)

    def cached(self, shape: Shape) -> float | None:
        """The speed of `shape` if it is known without measuring it."""
        value = _read_cache(self.path).get(self.machine, {}).get(shape.key())
        return float(value) if isinstance(value, int | float) and value > 0 else None

    def speed(self, shape: Shape, seconds_left: float | None = None) -> float:
        """Characters per second of training `shape` here; a measurement stops within about a
        step of `seconds_left` (see `measure`)."""
        cached = self.cached(shape)
        if cached is not None:
            return cached

        def plain(deadline: float | None) -> float:
            return measure(
                shape, self.device, self.precision, seconds=self.measure_seconds, deadline=deadline
            )

        return self._timed(shape, seconds_left, plain)

    def _timed(
        self, shape: Shape, seconds_left: float | None, how: Callable[[float | None], float]
    ) -> float:
        """`how(deadline)`'s figure for `shape`, measured on this calibration's thread count,
        counted in `seconds` and `measured`, and cached."""
        deadline = None if seconds_left is None else time.perf_counter() + seconds_left
        start = time.perf_counter()
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # measured with the thread count it is cached under
        try:
            value = how(deadline)
        finally:
            torch.set_num_threads(before)
        self.seconds += time.perf_counter() - start
        self.measured.append(shape.key())
        machines = _read_cache(self.path)  # another run may have written meanwhile
        machines.setdefault(self.machine, {})[shape.key()] = round(value, 1)
        _write_cache(self.path, machines)
        return value
