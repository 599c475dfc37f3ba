"""Learning-rate schedules as small pure functions and one tiny stateful plateau rule.

``plateau`` is the lab's rule (halve the rate when the monitored loss has not improved for 5
evaluations; factor and patience configurable), applied here to the validation loss. ``cosine``
decays from the base rate to ``min_lr`` over the run's budget, measured as the larger of the step
fraction and the time fraction, so a run with only ``--max-time`` still anneals. Such a rate
follows the clock, and no two runs are alike: the same settings and seed ended 2% apart on a small
text. So with ``decay_steps`` (the automatic configuration gives them: the steps it expects the
budget to hold, an expectation runs meet or beat) the cosine decays over those steps, and the
clock counts only when the run falls more than ``CLOCK_SLACK`` of its budget behind them (a
machine much slower than measured), so that it still anneals by the deadline. Two runs with the
same settings and seed then take the same steps. Past ``decay_steps`` the rate stays at
``min_lr``, so a run resumed with a larger ``--max-time`` gets them in proportion to its new
budget (`resumed_decay_steps`). ``constant`` keeps the base rate. All three share a linear
warm-up over ``warmup_steps``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from charlstm.config import OptimConfig, RunConfig, TrainConfig

# How far behind `decay_steps` (as a share of the budget) the clock lets a run fall before it
# decides the cosine's progress instead of the step.
CLOCK_SLACK = 0.1


@dataclass
class Plateau:
    """Multiply the rate by `factor` after `patience` evaluations without improvement."""

    factor: float
    patience: int
    min_scale: float = 0.0
    best: float = math.inf
    bad: int = 0
    scale: float = 1.0

    def update(self, loss: float) -> float:
        # A relative threshold (as torch's ReduceLROnPlateau), so that noise is not progress.
        if loss < self.best * (1 - 1e-4):
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.scale = max(self.scale * self.factor, self.min_scale)
                self.bad = 0
        return self.scale

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def budget_progress(step: int, elapsed: float, train: TrainConfig) -> float:
    """How far through its budget the run is, in [0, 1]."""
    fractions = []
    if train.max_steps:
        fractions.append(step / train.max_steps)
    if train.max_time:
        fractions.append(elapsed / train.max_time)
    return min(1.0, max(fractions)) if fractions else 0.0


def resumed_decay_steps(stored: RunConfig, resumed: RunConfig) -> int | None:
    """The steps a resumed run's cosine decays over: the stored ones, times the new time budget
    over the old one when the resumed run is given another ``--max-time``. The automatic choice
    expects steps in proportion to the budget, so these are what it would have given the new
    budget; kept as they were, a run resumed with twice the time would spend its second half at
    the floor rate. The step the run goes on from is then earlier in its decay: the rate rises to
    where the new budget puts it, as a clock-driven cosine's would. Capped by ``--max-steps``."""
    old, new = stored.train.max_time, resumed.train.max_time
    steps = resumed.optim.decay_steps
    if steps is None or not old or not new or old == new:
        return steps
    scaled = max(1, round(steps * new / old))
    return min(scaled, resumed.train.max_steps) if resumed.train.max_steps else scaled


def learning_rate(step: int, progress: float, plateau_scale: float, optim: OptimConfig) -> float:
    """The rate for the next step."""
    # 1) linear warm-up
    warm = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    # 2) the schedule proper
    if optim.schedule == "cosine":
        if optim.decay_steps:
            progress = min(1.0, max(step / optim.decay_steps, progress - CLOCK_SLACK))
        base = optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    elif optim.schedule == "plateau":
        base = max(optim.lr * plateau_scale, optim.min_lr)
    else:
        base = optim.lr
    return base * warm
