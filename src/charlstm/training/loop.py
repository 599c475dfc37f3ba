"""The training loop, from a configuration to a run folder.

`train` reads the corpus, builds the vocabulary and the model, and runs Adam on the cross-entropy of
next-character prediction until a budget (steps or seconds), early stopping, a signal or a numerical
fault ends it. Every `eval_interval` steps it measures the validation loss, feeds the plateau schedule
and early stopping, keeps the best weights in ``best/`` and everything needed to resume in ``last/``.

Exact resume: the ``last/`` checkpoint holds the weights, Adam's moments, the schedule, the torch RNG,
the batcher's position and RNG, the carried hidden state and every counter. A run interrupted at step
N and resumed to 2N ends with the same weights as a run that went straight to 2N (same seed, same
thread count, CPU). A stop in the middle only *reports* a validation loss; it never feeds the
schedule or early stopping, which must see exactly the evaluations an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.config import RunConfig
from charlstm.data.batching import make_batcher
from charlstm.data.loading import PreparedData
from charlstm.errors import CheckpointError, NonFiniteLoss, TrainingStopped, UserError
from charlstm.generate.engine import generate_stream
from charlstm.generate.sampling import SamplingParams, stream_seeds
from charlstm.hardware import autocast, pick_device, pick_precision, set_threads
from charlstm.model import CharRNN, detach_hidden, hidden_from_tensors, hidden_tensors
from charlstm.model.evaluation import evaluate_ids
from charlstm.runs.checkpoint import Checkpoint
from charlstm.runs.folder import RunFolder
from charlstm.training.optimizer_state import load_optimizer, optimizer_tensors
from charlstm.training.schedule import Plateau, budget_progress, learning_rate
from charlstm.training.signals import SignalGuard

# ---------------------------------------------------------------------------------------- state


@dataclass
class Counters:
    """Everything about the run's progress that is not a tensor. Saved with every checkpoint."""

    step: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumes
    chars: int = 0
    evals: int = 0
    best_val: float = math.inf  # best of the scheduled evaluations (drives early stopping)
    best_step: int = -1
    bad_evals: int = 0
    best_saved_val: float = (
        math.inf
    )  # loss of the weights in best/ (may come from a final evaluation)
    nonfinite: int = 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------- the run


class Run:
    """One training run: its folder, model, optimizer, batcher and counters."""

    def __init__(
        self,
        config: RunConfig,
        folder: RunFolder,
        data: PreparedData,
        log: Callable[[str], None],
        progress: bool,
    ) -> None:
        t = config.train
        self.folder = folder
        self.out = folder.path
        self.data = data
        self.log = log
        self.progress = progress
        self.threads = set_threads(t.threads)
        self.device = pick_device(t.device)
        self.precision = pick_precision(t.precision, self.device)
        self.config = replace(config, model=replace(config.model, vocab_size=len(data.vocab)))
        torch.manual_seed(t.seed)
        self.model = CharRNN(self.config.model).to(self.device)
        o = self.config.optim
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, amsgrad=o.amsgrad
        )
        self.plateau = Plateau(o.plateau_factor, o.plateau_patience)
        # With `ema`, evaluation, sampling and best/ use a moving average of the weights: on a tiny
        # corpus the averaged weights generalise better than the noisy last iterate.
        self.ema = None
        if o.ema > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(o.ema))
        d = self.config.data
        self.batcher = make_batcher(d.batching, data.train_ids, d.batch_size, d.seq_len, t.seed)
        self.hidden = None
        self.counters = Counters()
        self.loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        # Under torchrun (distributed.py) a step calls a DDP wrapper of the model and only rank 0
        # writes files; these are the two places a single process differs.
        self.train_model: torch.nn.Module = self.model
        self.writer = True

    # -- checkpoints ---------------------------------------------------------------------------

    def _meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": asdict(self.config.model),
            "vocab": self.data.vocab.to_list(),
            "config": self.config.to_dict(),
            "step": self.counters.step,
            "metrics": metrics,
            "source": self.data.source,
        }

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated, sampled and kept as best: the average when `ema` is on."""
        return self.ema.module if self.ema is not None else self.model

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.eval_model.state_dict().items()}

    def _check_finite(self) -> None:
        """Refuse to write weights that `read_checkpoint` would refuse: that would replace the last
        good checkpoint with one that can never be loaded."""
        models = [self.model] + ([self.eval_model] if self.eval_model is not self.model else [])
        if not all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters()):
            raise NonFiniteLoss(
                f"the weights became non-finite by step {self.counters.step}; the last good checkpoint "
                "is kept: lower --lr or raise --grad-clip, then resume or train again"
            )

    def save_best(self, val_loss: float) -> None:
        self._check_finite()
        meta = self._meta({"val_loss": val_loss, **self._progress_metrics()})
        self.folder.save_checkpoint("best", self._model_tensors(), meta)
        self.counters.best_saved_val = val_loss

    def save_last(self) -> None:
        self._check_finite()
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt_tensors, opt_info = optimizer_tensors(self.opt)
        tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.hidden is not None:
            for i, h in enumerate(hidden_tensors(self.hidden)):
                tensors[f"hidden.{i}"] = h
        tensors.update(self.extra_tensors())
        meta = self._meta(self._progress_metrics())
        meta["resume"] = {
            "counters": asdict(self.counters),
            "optimizer": opt_info,
            "plateau": self.plateau.state_dict(),
            "batcher": self.batcher.state_dict(),
            "threads": self.threads,
        }
        self.folder.save_checkpoint("last", tensors, meta)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """More state for last/ (a distributed run adds every process's random generators)."""
        return {}

    def restore(self, ck: Checkpoint) -> None:
        info = ck.meta.get("resume")
        if not isinstance(info, dict):
            raise UserError(
                f"{ck.path} holds no training state; resume from a run's last/ checkpoint"
            )
        # The schema check of the file covers the weights; the training state is checked here, so
        # that damage is reported before the first step instead of crashing somewhere inside it.
        try:
            self._restore_state(ck, info)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"{ck.path} holds damaged training state ({exc}); resume from an intact copy of the "
                "run folder, or start a new run"
            ) from None
        if info.get("threads") != self.threads:
            self.log(
                f"note: resuming with {self.threads} threads (the run used {info.get('threads')}); "
                "results will not be bitwise identical to an uninterrupted run"
            )

    def _restore_state(self, ck: Checkpoint, info: dict[str, Any]) -> None:
        self.model.load_state_dict(ck.model_state())
        if self.ema is not None:
            self.ema.load_state_dict(ck.group("ema"))
        load_optimizer(self.opt, ck.group("optim"), info["optimizer"])
        plateau = info["plateau"]
        if not (
            set(plateau) <= set(self.plateau.state_dict())
            and all(_is_number(v) for v in plateau.values())
        ):
            raise ValueError("the plateau schedule's state is malformed")
        self.plateau.load_state_dict(plateau)
        self.batcher.load_state_dict(info["batcher"])  # checks the position against the text
        names = {f.name for f in dataclasses.fields(Counters)}
        if set(info["counters"]) != names:
            raise ValueError(
                f"the counters are {sorted(info['counters'])}, expected {sorted(names)}"
            )
        counters = Counters(**info["counters"])
        for f in dataclasses.fields(Counters):
            value = getattr(counters, f.name)
            if not _is_number(value) or (f.type == "int" and not isinstance(value, int)):
                raise ValueError(f"counter {f.name} is {value!r}")
        self.counters = counters
        torch.set_rng_state(ck.tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in ck.tensors:
            torch.cuda.set_rng_state(ck.tensors["rng.cuda"], self.device)
        hidden = ck.group("hidden")
        if hidden:
            m, B = self.config.model, self.config.data.batch_size
            tensors = [hidden[str(i)].to(self.device) for i in range(len(hidden))]
            want = (m.num_layers, B, m.hidden_size)
            if len(tensors) != (2 if m.cell == "lstm" else 1) or any(
                tuple(h.shape) != want or not h.is_floating_point() for h in tensors
            ):
                raise ValueError(f"the carried hidden state does not have shape {want}")
            self.hidden = hidden_from_tensors(tensors, m.cell)

    def _progress_metrics(self) -> dict[str, Any]:
        c = self.counters
        return {
            "elapsed": round(c.elapsed, 3),
            "chars": c.chars,
            "best_val_loss": c.best_saved_val,
            "best_step": c.best_step,
            "device": self.device.type,
            "precision": self.precision,
        }

    # -- pieces of the loop --------------------------------------------------------------------

    def sync_step(self, guard: SignalGuard) -> bool:
        """Before each step: whether to stop now. A distributed run agrees here on the elapsed time
        and on stop signals, and every process must then take the same decision."""
        return guard.requested is not None

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss the step logs and tests for finiteness (a distributed run's global mean)."""
        return loss

    def evaluate(self) -> float:
        return evaluate_ids(
            self.eval_model,
            self.data.val_ids,
            n_streams=self.config.train.eval_streams,
            device=self.device,
            precision=self.precision,
        )

    def sample(self, seed: int) -> str:
        t = self.config.train
        vocab = self.data.vocab
        start = "\n" if "\n" in vocab else vocab.chars[0]
        chunks = generate_stream(
            self.eval_model,
            [vocab.encode(start)],
            t.sample_length,
            SamplingParams(temperature=t.sample_temperature),
            stream_seeds(seed, 1),
            vocab.decode,
            device=self.device,
        )
        text = "".join(o[0].text for o in chunks if 0 in o)
        self.model.train()
        return start + text

    def train_step(self, batch) -> float | None:
        """One optimisation step; returns the loss, or None when the step was non-finite and skipped."""
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        hidden = None if batch.reset else self.hidden
        lr = learning_rate(
            self.counters.step,
            budget_progress(self.counters.step, self.counters.elapsed, self.config.train),
            self.plateau.scale,
            self.config.optim,
        )
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):
            logits, hidden = self.train_model(x, hidden)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if self.loss_hook is not None:
            loss = self.loss_hook(self.counters.step, loss)
        loss = self.reduce_loss(loss)
        self.opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            clip = self.config.optim.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), clip if clip > 0 else math.inf
            )
            finite = bool(torch.isfinite(norm))
        if not finite:
            self.opt.zero_grad(set_to_none=True)
            self.hidden = None
            self.counters.nonfinite += 1
            allowed = self.config.train.skip_nonfinite
            if self.counters.nonfinite > allowed:
                raise NonFiniteLoss(
                    f"the loss or gradient became non-finite at step {self.counters.step} "
                    f"({self.counters.nonfinite} time(s), {allowed} allowed); the last good checkpoint "
                    "is kept: lower --lr, raise --grad-clip, or allow skips with --skip-nonfinite N"
                )
            self.log(
                f"warning: non-finite loss at step {self.counters.step}, step skipped "
                f"({self.counters.nonfinite}/{allowed})"
            )
            return None
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.hidden = detach_hidden(hidden) if self.config.data.batching == "stream" else None
        return float(loss.detach())


def _loop(run: Run, guard: SignalGuard, on_eval: Callable[[int, float], None] | None = None) -> str:
    from tqdm import tqdm

    t = run.config.train
    c = run.counters
    base_elapsed = c.elapsed
    start = time.monotonic()
    window_losses: list[float] = []
    window_chars, window_start = 0, start
    chars_per_step = run.config.data.batch_size * run.config.data.seq_len
    total = t.max_steps if t.max_steps else None
    bar = tqdm(
        total=total,
        initial=c.step if total else 0,
        disable=not run.progress,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        leave=False,
    )
    last_val: float | None = None
    reason = "budget"
    try:
        while True:
            c.elapsed = base_elapsed + (time.monotonic() - start)
            if run.sync_step(guard):
                raise guard.stop_error()
            if t.max_steps and c.step >= t.max_steps:
                reason = f"max_steps {t.max_steps}"
                break
            if t.max_time and c.elapsed >= t.max_time:
                reason = f"max_time {t.max_time:g}s"
                break
            loss = run.train_step(run.batcher.next())
            if loss is None:
                continue
            c.step += 1
            c.chars += chars_per_step
            window_losses.append(loss)
            window_chars += chars_per_step
            bar.update(1)
            if c.step % t.eval_interval:
                continue
            # -- a scheduled evaluation: it feeds the schedule, early stopping and best/ ----------
            val = run.evaluate()
            if not math.isfinite(val):
                raise NonFiniteLoss(
                    f"the validation loss became non-finite at step {c.step}; the last good checkpoint "
                    "is kept: lower --lr or raise --grad-clip, then resume or train again"
                )
            last_val = val
            c.evals += 1
            now = time.monotonic()
            c.elapsed = base_elapsed + (now - start)
            speed = window_chars / max(now - window_start, 1e-9)
            record = {
                "step": c.step,
                "time": round(c.elapsed, 3),
                "train_loss": float(np.mean(window_losses)),
                "val_loss": val,
                "val_bpc": val / math.log(2),
                "lr": run.opt.param_groups[0]["lr"],
                "chars_per_s": round(speed, 1),
            }
            if run.writer:
                run.folder.append_metrics(record)
            window_losses, window_chars, window_start = [], 0, now
            if run.config.optim.schedule == "plateau":
                run.plateau.update(val)
            if val < c.best_val * (1 - 1e-4):
                c.best_val, c.best_step, c.bad_evals = val, c.step, 0
            else:
                c.bad_evals += 1
            if val < c.best_saved_val:
                run.save_best(val)
            run.save_last()
            if on_eval is not None:
                on_eval(c.step, val)
            bar.set_postfix_str(
                f"train {record['train_loss']:.3f} val {val:.3f} "
                f"({val / math.log(2):.2f} bpc) lr {record['lr']:.2e} "
                f"{speed / 1000:.1f}k ch/s",
                refresh=False,
            )
            if t.sample_every and c.evals % t.sample_every == 0 and run.writer:
                text = run.sample(seed=t.seed + c.step)
                run.folder.append_sample(f"--- step {c.step}, val {val:.3f}\n{text}\n")
                bar.write(f"--- step {c.step}, val {val:.3f} ---\n{text}\n", file=sys.stderr)
            if t.early_stopping and c.bad_evals >= t.early_stopping:
                reason = f"early stopping: no improvement in {t.early_stopping} evaluations"
                break
    except TrainingStopped:
        _finish(run, last_val, report_only=True)
        run.log(
            f"charlstm: saved at step {run.counters.step}; continue with: "
            f"charlstm train --resume {run.out}"
        )
        raise
    finally:
        bar.close()
    _finish(run, last_val, report_only=False)
    return reason


def _finish(run: Run, last_val: float | None, report_only: bool) -> None:
    """Save the final state. A final evaluation (when the last step was not evaluated) can improve
    best/ but never touches the counters that drive the schedule, so resume stays exact."""
    c = run.counters
    if c.step and (last_val is None or c.step % run.config.train.eval_interval):
        val = run.evaluate()
        if val < c.best_saved_val:
            run.save_best(val)
            c.best_step = c.step
        if not report_only and run.writer:
            run.folder.append_metrics(
                {
                    "step": c.step,
                    "time": round(c.elapsed, 3),
                    "val_loss": val,
                    "val_bpc": val / math.log(2),
                    "lr": run.opt.param_groups[0]["lr"],
                    "final": True,
                }
            )
    run.save_last()


def fit(run: Run, on_eval: Callable[[int, float], None] | None = None) -> str:
    """Train `run` until its budget, early stopping, a signal or a fault ends it, saving as it goes;
    returns why it stopped. Raises `TrainingStopped` after a SIGINT/SIGTERM (having saved)."""
    with SignalGuard(run.log) as guard:
        return _loop(run, guard, on_eval)
