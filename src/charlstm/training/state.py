"""The small parts of a run that keep state between steps, each saved and restored on its own.

Exact resume means restoring every part as it was: `Progress` (the budget counters), `EarlyStopping`
(the best scheduled validation loss and how many evaluations since it improved) and `BestWeights`
(the loss and step of the weights in ``best/``). Each has `state_dict`/`load_state_dict`; the loop
asks them questions ("stop now?", "is this loss worth keeping?") instead of doing their arithmetic.

In a checkpoint their states are stored together as one flat table, ``resume.counters``, the
layout run folders have always had, so old runs still resume. `load_state_dict` checks the keys and
types it is given: a damaged table is an error before the first step, never a crash inside one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from charlstm.config import TrainConfig

# A scheduled evaluation counts as an improvement for early stopping only when it beats the best so
# far by this fraction: noise-level gains must not keep a finished run alive.
MIN_RELATIVE_IMPROVEMENT = 1e-4


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Part:
    """`state_dict`/`load_state_dict` over a dataclass's fields, with type checks on load."""

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = state[f.name]
            if not is_number(value) or (f.type == "int" and not isinstance(value, int)):
                raise ValueError(f"counter {f.name} is {value!r}")
            setattr(self, f.name, value)


@dataclass
class Progress(_Part):
    """How far the run has come; the budget is checked against it."""

    step: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumes
    chars: int = 0
    evals: int = 0  # scheduled evaluations
    nonfinite: int = 0  # skipped non-finite steps

    def budget_spent(self, t: TrainConfig) -> str | None:
        """Why the budget ends the run now, or None while it lasts."""
        if t.max_steps and self.step >= t.max_steps:
            return f"max_steps {t.max_steps}"
        if t.max_time and self.elapsed >= t.max_time:
            return f"max_time {t.max_time:g}s"
        return None

    def time_left(self, t: TrainConfig, seconds_per_step: float | None) -> float | None:
        """Seconds until the budget ends (the progress bar's ETA): the time left, or the steps
        left at `seconds_per_step`, whichever ends first; None without a budget, or with only a
        step budget and no speed measured yet. Early stopping may end the run sooner."""
        left = []
        if t.max_time:
            left.append(max(0.0, t.max_time - self.elapsed))
        if t.max_steps and seconds_per_step is not None:
            left.append(max(0, t.max_steps - self.step) * seconds_per_step)
        return min(left) if left else None


@dataclass
class EarlyStopping(_Part):
    """Stop after `patience` scheduled evaluations without a real improvement (0: never)."""

    best_val: float = math.inf
    bad_evals: int = 0

    def update(self, val: float) -> None:
        if val < self.best_val * (1 - MIN_RELATIVE_IMPROVEMENT):
            self.best_val, self.bad_evals = val, 0
        else:
            self.bad_evals += 1

    def should_stop(self, patience: int) -> bool:
        return bool(patience) and self.bad_evals >= patience


@dataclass
class BestWeights(_Part):
    """The validation loss and step of the weights in ``best/``; a final evaluation may improve it
    too, so it is not the same as early stopping's best."""

    best_saved_val: float = math.inf
    best_step: int = -1

    def improves(self, val: float) -> bool:
        return val < self.best_saved_val

    def kept(self, val: float, step: int) -> None:
        self.best_saved_val, self.best_step = val, step


@dataclass
class RunState:
    """Every part, saved and restored together."""

    progress: Progress = dataclasses.field(default_factory=Progress)
    early: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    best: BestWeights = dataclasses.field(default_factory=BestWeights)

    def parts(self) -> tuple[_Part, ...]:
        return (self.progress, self.early, self.best)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part in self.parts() for k, v in part.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for part in self.parts() for f in dataclasses.fields(part)}  # type: ignore[arg-type]
        if set(state) != names:
            raise ValueError(f"the counters are {sorted(state)}, expected {sorted(names)}")
        for part in self.parts():
            part.load_state_dict(state)
