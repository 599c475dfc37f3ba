"""Starting a run from a shipped base model: which base fits a text, whether fine-tuning it beats
training from scratch for this text and budget, and the settings it fine-tunes with.

Eleven thousand characters cannot teach a network a language; forty million can. A base model
(runs/bases.py) has read forty million, so on a small text it starts where a run from scratch could
never arrive. On a large text with a long budget a run from scratch catches up, with a shape chosen
for that text (autoconfig.py), and on a text in another language a base only gets in the way. So,
for `--base auto` (the default):

1. **Which base.** Each shipped base is probed: the share of the text's characters its vocabulary
   holds (`coverage`: a Russian base covers an English text's letters poorly, and a text in a script
   no base has is declined at once, at no cost), then its loss on a slice of the text (`PROBE_CHARS`
   characters in evenly spaced stretches; a first look at `PROBE_FIRST` is enough to turn away a
   text in another language). The base with the lowest loss is the candidate.
2. **Whether.** The candidate is declined when its loss says the text is not in its language
   (above `LANGUAGE_LOSS`), or when the text is large for the budget (`prefers_scratch`). The
   thresholds come from runs of the plain command against `--base none` over text sizes and
   budgets, same budget, same machine (benchmarks/base_vs_scratch.py; its rows are in
   benchmarks/data/base_vs_scratch.jsonl and docs/benchmarks.md).
3. **How.** A fine-tuned run keeps the base's shape and starts from its weights (transfer.py: the
   text's characters the base has never seen get fresh rows, their output bias at the rarest known
   character's). Its rate, regularisation and weight average come from `finetune_settings`; the
   batch, evaluation cadence and schedule length from the automatic configuration as for any run.

`--base none` trains from scratch; `--base NAME` takes that base without probing; `--base RUN_DIR`
starts from any run folder (as `--init-from` does). The decision and its reason are logged, and
the run's config.toml records the base's name and sha256, so that `--config RUN/config.toml`
repeats it with the very same weights.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlstm.config import RunConfig
from charlstm.data import basecorpus
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.model import CharRNN
from charlstm.model.evaluation import evaluate_ids
from charlstm.runs import bases as shipped
from charlstm.runs.checkpoint import Checkpoint

# ------------------------------------------------------------------------------- the fitted rules

# Bumped whenever a constant below changes, and recorded with every sweep row.
RULES_VERSION = 2
# The least share of the text's characters a base's vocabulary must hold: below it the text is
# in another script (or is mostly symbols the base never saw), and fresh rows would be most of it.
MIN_COVERAGE = 0.99
# Characters of the text the probe reads (evenly spaced stretches of PROBE_STRETCH): enough to
# separate a language from another (a base reads its own language at 1.3-2.3 nats/char, another
# in the same script at 3 and more), little enough to cost a fraction of a second.
PROBE_CHARS = 8192
PROBE_STRETCH = 1024
# Above this loss on the probe the text is not in the base's language.
LANGUAGE_LOSS = 2.6
# The first look: on 2,048 characters (in streams of 256, as the whole probe: a third of its time) a
# text in another language read at 3.30-4.55 (English and German under ru), one in the base's own
# at 1.70-2.05 (benchmarks/base_probe.py): above LANGUAGE_LOSS + FIRST_MARGIN the rest of the
# probe is not read.
PROBE_FIRST = 2048
FIRST_MARGIN = 0.5
# A run from scratch may catch up with a base when the text is large and the budget lets it see
# the text many times: past SCRATCH_CHARS training characters with a budget of more than
# SCRATCH_SECONDS_PER_MILLION seconds per million of them, the base is declined. Measured
# (benchmarks/base_vs_scratch.py, version 1 of these rules declined it there): tinyshakespeare,
# 1.0 M training characters, 521 s, fine-tuning en reached 1.4043 against 1.4600 from scratch, so
# the base wins at 521 s per million; the guard sits at about twice that, where nothing was
# measured yet, rather than at the measured point.
SCRATCH_CHARS = 500_000
SCRATCH_SECONDS_PER_MILLION = 1000.0


@dataclass(frozen=True)
class Probe:
    """What one base made of the text."""

    name: str
    coverage: float  # share of the text's characters in its vocabulary
    loss: float | None  # nats/char on the probe slice; None when not measured (low coverage)


@dataclass(frozen=True)
class Decision:
    """Whether to start from a base, which, and the sentence that says why."""

    name: str | None  # a shipped base's name, or None: from scratch (or a run folder: `path`)
    path: Path | None  # the checkpoint to start from
    sha256: str | None
    reason: str
    probes: tuple[Probe, ...] = field(default=())

    @property
    def used(self) -> bool:
        return self.path is not None


def coverage(vocab: Vocabulary, text: str) -> float:
    """The share of `text`'s characters that `vocab` holds."""
    if not text:
        return 0.0
    known = sum(n for ch, n in Counter(text).items() if ch in vocab.char_to_idx)
    return known / len(text)


def probe_slice(text: str, chars: int = PROBE_CHARS) -> str:
    """Up to `chars` characters of `text` in evenly spaced stretches of PROBE_STRETCH."""
    if len(text) <= chars:
        return text
    n = max(2, chars // PROBE_STRETCH)
    step = (len(text) - PROBE_STRETCH) / (n - 1)
    return "".join(text[round(i * step) : round(i * step) + PROBE_STRETCH] for i in range(n))


def model_of(ck: Checkpoint) -> CharRNN:
    """The network of a checkpoint, in float32, for evaluation."""
    model = CharRNN(ck.model_config)
    model.load_state_dict({k: v.float() for k, v in ck.model_state().items()})
    return model.eval()


def base_loss(ck: Checkpoint, text: str) -> float:
    """The base's loss (nats/char) on `text` laid out as the base's corpus is (`basecorpus.clean`:
    no indentation, one blank line between paragraphs), leaving out the characters it lacks. The
    question is whether the text is in the base's language, and an edition's layout is not
    language: Onegin's tab-indented verse read at 3.35 as it is and 1.9 laid out."""
    vocab = ck.vocab  # built anew on each access: once here, not once a character
    known = "".join(c for c in basecorpus.clean(text) if c in vocab.char_to_idx)
    ids = vocab.encode_array(known)
    if len(ids) < 2:
        return math.inf
    with torch.no_grad():  # streams of 256: the time goes with a stream's length, not their number
        return evaluate_ids(model_of(ck), ids, n_streams=max(1, len(ids) // 256))


def probe(name: str, text: str) -> Probe:
    """How much of `text` base `name` covers and, if enough, its loss on a slice of it: first on
    PROBE_FIRST characters, where a text in another language already reads far above
    LANGUAGE_LOSS (a quarter of the cost), then on PROBE_CHARS."""
    ck = shipped.read_base(name)
    cov = coverage(ck.vocab, text)
    if cov < MIN_COVERAGE:
        return Probe(name, cov, None)
    first = base_loss(ck, probe_slice(text, PROBE_FIRST))
    if first > LANGUAGE_LOSS + FIRST_MARGIN or len(text) <= PROBE_FIRST:
        return Probe(name, cov, first)
    return Probe(name, cov, base_loss(ck, probe_slice(text)))


def prefers_scratch(n_train: int, budget: float | None) -> bool:
    """Whether a run from scratch is expected to do at least as well as a fine-tuned base: a large
    text with a long budget (see the constants)."""
    if n_train < SCRATCH_CHARS:
        return False
    if budget is None:  # open-ended: as long as it takes, which favours a shape of its own
        return True
    return budget > SCRATCH_SECONDS_PER_MILLION * n_train / 1e6


def _budget(config: RunConfig) -> float | None:
    return config.train.max_time


def decide(config: RunConfig, text: str, n_train: int) -> Decision:
    """The base a run on `text` starts from, if any (see the module docstring). `text` is the
    run's whole text (its training part is what the probe reads), `n_train` its training
    characters."""
    choice = config.train.base
    if choice == "none":
        return Decision(None, None, None, "none (--base none): trained from scratch")
    if choice != "auto":
        return _named(choice)
    names = [b.name for b in shipped.available()]
    if not names:
        return Decision(None, None, None, "none: this installation ships no base model")
    train_text = text[:n_train]
    probes = tuple(probe(n, train_text) for n in names)
    measured = [p for p in probes if p.loss is not None]
    covers = ", ".join(f"{p.name} {p.coverage:.1%}" for p in probes)
    if not measured:
        return Decision(
            None,
            None,
            None,
            f"none: no base covers the text's characters ({covers}; at least "
            f"{MIN_COVERAGE:.0%} needed)",
            probes,
        )
    best = min(measured, key=lambda p: p.loss)
    losses = ", ".join(f"{p.name} {p.loss:.2f}" for p in measured)
    if best.loss > LANGUAGE_LOSS:
        return Decision(
            None,
            None,
            None,
            f"none: the text is in no base's language (loss on it {losses} nats/char; a base reads "
            f"its own below {LANGUAGE_LOSS:g})",
            probes,
        )
    if prefers_scratch(n_train, _budget(config)):
        return Decision(
            None,
            None,
            None,
            f"none: {best.name} reads the text at {best.loss:.2f} nats/char, but "
            f"{n_train / 1e6:.1f} M characters with {_budget_text(config)} train better from "
            "scratch, in a shape chosen for them",
            probes,
        )
    base = shipped.get_base(best.name)
    return Decision(
        base.name,
        base.path,
        base.sha256,
        f"{base.name} ({base.description}): it reads the text at {best.loss:.2f} nats/char before "
        f"any training (covers {best.coverage:.1%} of its characters); fine-tuned",
        probes,
    )


def _budget_text(config: RunConfig) -> str:
    t = config.train
    return f"{t.max_time:g} s" if t.max_time else "an open-ended budget"


def _named(choice: str) -> Decision:
    """`--base NAME` (a shipped base) or `--base RUN_DIR` (a run folder or checkpoint file)."""
    if choice in shipped.BASES:
        base = shipped.get_base(choice)
        shipped.verify(base)
        return Decision(base.name, base.path, base.sha256, f"{base.name} (--base {choice})")
    path = Path(choice)
    if path.exists():
        return Decision(None, path, None, f"the run {choice} (--base {choice})")
    shipped.get_base(choice)  # not a shipped base either: its error lists them
    raise AssertionError("unreachable")


def check_recorded(config: RunConfig, decision: Decision) -> None:
    """A run repeated from its config.toml must find the very base it started from."""
    want = config.train.base_sha256
    if want and decision.sha256 and want != decision.sha256:
        raise UserError(
            f"the run was trained from base {decision.name} with sha256 {want[:12]}…, and this "
            f"installation ships {decision.sha256[:12]}…; use the charlstm release that trained "
            "it, or --base none or auto"
        )


# ------------------------------------------------------------------------------- fine-tuning

# The fine-tuning settings (benchmarks/base_sweep rows in docs/benchmarks.md, "Base models"). The
# rate falls with the passes the budget makes over the text: a text seen a few times must move the
# base far and fast, one seen dozens of times must not be memorised. Measured in pairs on one
# thread each (2026-12-07, 2-core Xeon): onegin-ru (137 k characters, 260 s, about 2 passes at that
# speed) reached 1.784 at 1e-4, 1.489 at 5e-4, 1.475 at 1e-3 and 1.482 at 2e-3; byron-ru (11 k, 104
# s, about 13 passes) 1.7995 at 1e-4, 1.800 at 2e-4 and 1.875 at 5e-4 (with more dropout). So 1e-3
# up to FAST_PASSES passes, 1e-4 from SLOW_PASSES, and the rate in between on a log scale. Light
# dropout and an average of the weights beat heavier regularisation on byron (1.7995 against
# 1.813 with DropConnect 0.1 and dropout 0.2, 1.848 with dropout 0.3 and DropConnect 0.2) and
# freezing the lower layer did not help (1.863 against 1.875 at the same rate).
FINETUNE_LR = (1e-3, 1e-4)  # the rate at FAST_PASSES and at SLOW_PASSES passes
FAST_PASSES, SLOW_PASSES = 4.0, 40.0
FINETUNE_REGULARISATION = {
    "dropout": 0.1,
    "embedding_dropout": 0.0,
    "weight_drop": 0.0,
    "ema": 0.99,
}


def finetune_lr(epochs: float) -> float:
    """Adam's rate for fine-tuning a base over `epochs` passes of the text (see above)."""
    fast, slow = FINETUNE_LR
    if epochs <= FAST_PASSES:
        return fast
    if epochs >= SLOW_PASSES:
        return slow
    share = math.log(epochs / FAST_PASSES) / math.log(SLOW_PASSES / FAST_PASSES)
    return float(f"{fast * (slow / fast) ** share:.2g}")  # two digits: config.toml stays readable


def finetune_settings(epochs: float) -> dict[str, Any]:
    """The settings a base is fine-tuned with, for a budget that sees the text `epochs` times."""
    lr = finetune_lr(epochs)
    return {
        "lr": lr,
        "min_lr": lr / 10,
        "warmup_steps": 0,
        "locked_dropout": False,
        **FINETUNE_REGULARISATION,
    }


def probe_summary(probes: tuple[Probe, ...]) -> list[dict[str, Any]]:
    """The probes as JSON-ready rows (for meta.json and the benchmark)."""
    return [
        {"base": p.name, "coverage": round(p.coverage, 5), "loss": p.loss}
        for p in probes
        if p.loss is None or np.isfinite(p.loss)
    ]
