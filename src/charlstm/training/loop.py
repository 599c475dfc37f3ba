"""The training loop: a `Run` (model, optimizer, batcher, state) and `fit`, which trains it.

`fit` runs Adam on the cross-entropy of next-character prediction until a budget (steps or seconds),
early stopping, a signal or a numerical fault ends it. Every `eval_interval` steps it measures the
validation loss on a fixed slice of the split (`eval_chars` characters in short stretches spread
over it, `evaluation.spread_slice`: the same characters every time, so the figures compare, and
cheap on any corpus), feeds the plateau schedule and early stopping, keeps the best weights in
``best/`` and everything needed to resume in ``last/``. When training ends, the final weights and
best/'s are measured on the whole split, best/ keeps whichever is better, and the final metrics
record and best/ carry those full-pass figures. Every record says which it carries
(``val_scope``: "slice" or "full").

Exact resume: the ``last/`` checkpoint holds the weights, Adam's moments, the schedule, the torch
RNG, the batcher's position and RNG, the carried hidden state and the parts of `state.RunState`. A
run interrupted at step N and resumed to 2N ends with the same weights as a run that went straight
to 2N (same seed, same thread count, CPU). A stop in the middle only *reports* a validation loss; it
never feeds the schedule or early stopping, which must see exactly the evaluations an uninterrupted
run sees.

What a job is made of (pre-training, many processes, a report) is decided above, in orchestrate.py;
a distributed run (distributed.py) overrides the few methods marked as such below.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.config import RunConfig
from charlstm.data.batching import IGNORE, make_batcher
from charlstm.data.loading import PreparedData
from charlstm.errors import CheckpointError, NonFiniteLoss, TrainingStopped, UserError
from charlstm.generate.engine import generate_stream
from charlstm.generate.sampling import SamplingParams, stream_seeds
from charlstm.hardware import autocast, pick_device, pick_precision, set_threads
from charlstm.model import CharRNN, detach_hidden, hidden_from_tensors, hidden_tensors
from charlstm.model.evaluation import (
    Stretches,
    evaluate_ids,
    full_pass,
    reset_rows,
    spread_slice,
    stream_heads,
    streams_for,
)
from charlstm.runs.checkpoint import Checkpoint
from charlstm.runs.folder import RunFolder
from charlstm.training.optimizer_state import load_optimizer, optimizer_tensors
from charlstm.training.schedule import Plateau, budget_progress, learning_rate
from charlstm.training.signals import SignalGuard
from charlstm.training.state import RunState, is_number
from charlstm.training.tensorboard import BoardWriter

# What a run's scheduled evaluations read when the split is larger than their slice: "spread", short
# stretches over the whole split (`spread_slice`), or "heads", the first columns of every stream
# (`stream_heads`), the slice of run folders written before it. last/ records it (a last/ that
# names none is such an older run), and a resumed run keeps its own, so that early stopping and
# best/ compare its new figures with figures of the same characters.
SLICES = ("spread", "heads")
# ---------------------------------------------------------------------------------------- the run


class Run:
    """One training run: its folder, model, optimizer, batcher and state.

    A distributed run (distributed.py) replaces the methods under "what a distributed run changes"
    and extends `train_step` (DDP's wrapper, a peer's failure named) and `restore` (its own rows of
    the hidden state, its own generator); the loop is the same on one process and on many."""

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
        # corpus the averaged weights generalise better than the noisy last iterate. Its decay
        # warms up (`ema_decay`), so that it never lags far behind a short run.
        self.ema = None
        if o.ema > 0:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(o.ema))
        d = self.config.data
        self.batcher = make_batcher(
            d.batching, data.train_ids, d.batch_size, d.seq_len, t.seed, data.train_starts
        )
        self.val_streams = streams_for(len(data.val_ids), t.eval_streams)  # the split's layout
        self.slice = SLICES[0]  # what scheduled evaluations read (a resumed run: what it read)
        self.hidden = None
        self.state = RunState()
        self.loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self.train_model: torch.nn.Module = self.model  # what a step calls (DDP's wrapper, or this)
        self.writer = True  # whether this process writes the run folder (rank 0 only, under DDP)
        self.tensorboard: BoardWriter | None = None  # --tensorboard's writer (orchestrate opens it)
        self.last_saved_step: int | None = None
        # A copy of best/'s weights (on the CPU), so that the end of the run can measure them on the
        # whole split on every process without reading back a file only rank 0 writes.
        self.best_tensors: dict[str, torch.Tensor] | None = None
        self.best_kind = "ema" if self.ema is not None else "raw"  # which weights best/ holds
        self.final_record: dict[str, Any] | None = None  # the final full-pass figures, once known

    # -- checkpoints ---------------------------------------------------------------------------

    def _meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": asdict(self.config.model),
            "vocab": self.data.vocab.to_list(),
            "config": self.config.to_dict(),
            "step": self.state.progress.step,
            "metrics": metrics,
            "source": self.data.source,
        }

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated, sampled and kept as best (the average with `ema`)."""
        return self.ema.module if self.ema is not None else self.model

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.eval_model.state_dict().items()}

    def _check_finite(self) -> None:
        """Refuse to write weights that `read_checkpoint` would refuse: that would replace the last
        good checkpoint with one that can never be loaded."""
        models = [self.model] + ([self.eval_model] if self.eval_model is not self.model else [])
        if not all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters()):
            raise NonFiniteLoss(
                f"the weights became non-finite by step {self.state.progress.step}; the last good "
                "checkpoint "
                "is kept: lower --lr or raise --grad-clip, then resume or train again"
            )

    def weights_kind(self, model: torch.nn.Module) -> str:
        """Which weights `model` holds: the average ("ema") or the optimizer's own ("raw")."""
        return "ema" if self.ema is not None and model is self.ema.module else "raw"

    def save_best(
        self, val_loss: float, model: torch.nn.Module | None = None, write: bool = True
    ) -> None:
        """Keep `model`'s weights (default: the evaluated ones) as best/; `val_loss` is theirs, on
        the scheduled slice. Without `write` the caller writes best/ itself (`write_best`)."""
        model = self.eval_model if model is None else model
        self._check_finite()  # on every process, so that all stop together
        self.state.best.kept(val_loss, self.state.progress.step)
        self.best_tensors = _cpu_copy(model)
        self.best_kind = self.weights_kind(model)
        if write:
            metrics = {"val_loss": val_loss, "val_scope": self.val_scope}
            self.write_best(self.best_tensors, self.state.progress.step, metrics)

    def best_weights(self) -> dict[str, torch.Tensor] | None:
        """best/'s weights: the copy kept when they were saved, or (a resumed run that has not
        improved on them yet) best/ as the earlier session left it; None before the first save."""
        if self.best_tensors is None and self.state.best.best_step >= 0:
            ck = self.folder.read_checkpoint("best")
            self.best_tensors = ck.model_state()
            self.best_kind = (ck.meta.get("metrics") or {}).get("weights", self.best_kind)
        return self.best_tensors

    def write_best(self, tensors: dict[str, torch.Tensor], step: int, metrics: dict) -> None:
        """Write `tensors` (the weights of `step`) as best/ with `metrics` and their kind."""
        if self.writer:
            meta = self._meta({**self._progress_metrics(), "weights": self.best_kind, **metrics})
            meta["step"] = step
            self.folder.save_checkpoint("best", {f"model.{k}": v for k, v in tensors.items()}, meta)

    def save_last(self) -> None:
        """Everything exact resume needs, in last/."""
        self._check_finite()
        hidden = self.global_hidden()  # collectives first, on every process
        extra = self.extra_tensors()
        if self.writer:
            self.folder.save_checkpoint("last", *self._last_checkpoint(hidden, extra))
        self.last_saved_step = self.state.progress.step

    def _last_checkpoint(self, hidden, extra: dict[str, torch.Tensor]):
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt_tensors, opt_info = optimizer_tensors(self.opt)
        tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if hidden is not None:
            for i, h in enumerate(hidden_tensors(hidden)):
                tensors[f"hidden.{i}"] = h
        tensors.update(extra)
        meta = self._meta(self._progress_metrics())
        meta["resume"] = {
            "counters": self.state.state_dict(),
            "optimizer": opt_info,
            "plateau": self.plateau.state_dict(),
            "batcher": self.batcher.state_dict(),
            "threads": self.threads,
            "slice": self.slice,
        }
        return tensors, meta

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
                f"{ck.path} holds damaged training state ({exc}); resume from an intact copy of "
                "the run folder, or start a new run"
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
            and all(is_number(v) for v in plateau.values())
        ):
            raise ValueError("the plateau schedule's state is malformed")
        self.plateau.load_state_dict(plateau)
        self.batcher.load_state_dict(info["batcher"])  # checks the position against the text
        kind = info.get("slice", "heads")  # older run folders record none: they read the heads
        if kind not in SLICES:
            raise ValueError(f"the validation slice {kind!r} is none of {', '.join(SLICES)}")
        self.slice = kind
        state = RunState()
        state.load_state_dict(info["counters"])  # checks the keys and their types
        self.state = state
        self.last_saved_step = state.progress.step
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
        p, best = self.state.progress, self.state.best
        return {
            "elapsed": round(p.elapsed, 3),
            "chars": p.chars,
            "best_val_loss": best.best_saved_val,
            "best_step": best.best_step,
            "device": self.device.type,
            "precision": self.precision,
        }

    # -- what a distributed run changes ---------------------------------------------------------

    def sync_step(self, guard: SignalGuard) -> bool:
        """Before each step: whether to stop now. A distributed run agrees here on the elapsed time
        and on stop signals, and every process must then take the same decision."""
        return guard.requested is not None

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss the step logs and tests for finiteness (a distributed run's global mean)."""
        return loss

    def global_hidden(self):
        """The carried hidden state of all B streams, for last/ (a distributed process holds only
        its own rows)."""
        return self.hidden

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """More state for last/ (a distributed run adds every process's random generators)."""
        return {}

    def eval_slice(self) -> Stretches | None:
        """What a scheduled evaluation reads of the validation split; None: the whole split (a
        split no larger than the slice, or ``eval_chars`` 0), so its figures are full passes."""
        n, chars = len(self.data.val_ids), self.config.train.eval_chars
        if self.slice == "heads":
            return stream_heads(n, self.val_streams, chars)
        return spread_slice(n, chars)

    @property
    def val_scope(self) -> str:
        """What a scheduled evaluation's figure is of: "slice" or "full" (the whole split)."""
        return "full" if self.eval_slice() is None else "slice"

    def eval_reading(self, full: bool) -> Stretches:
        """The stretches an evaluation reads: the slice, or with `full` (or no slice) all of it."""
        part = None if full else self.eval_slice()
        return full_pass(len(self.data.val_ids), self.val_streams) if part is None else part

    def evaluate(self, model: torch.nn.Module | None = None, *, full: bool = False) -> float:
        """The validation loss of `model` (default: the evaluated weights) on the slice scheduled
        evaluations read, or with `full` on the whole split."""
        return evaluate_ids(
            self.eval_model if model is None else model,
            self.data.val_ids,
            device=self.device,
            precision=self.precision,
            reading=self.eval_reading(full),
            starts=self.data.val_starts,
        )

    def test_figures(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """The test split's loss with `tensors` (best/'s weights), a full pass, measured once
        when training ends; {} without a test split. It is reported, never used: early stopping,
        the schedule and best/'s choice have all been decided by then. (Every process of a
        distributed run measures it whole: it is cheap, and needs no collective.)"""
        if self.data.test_ids is None:
            return {}
        scratch = copy.deepcopy(self.model)
        scratch.load_state_dict(tensors)
        loss = evaluate_ids(
            scratch,
            self.data.test_ids,
            n_streams=streams_for(len(self.data.test_ids), self.config.train.eval_streams),
            device=self.device,
            precision=self.precision,
            starts=self.data.test_starts,
        )
        return {"test_loss": loss, "test_bpc": loss / math.log(2)}

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

    # -- one step ----------------------------------------------------------------------------------

    def train_step(self, batch) -> float | None:
        """One optimisation step; returns the loss, or None for a skipped non-finite step."""
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        hidden = None if batch.reset else self.hidden
        if hidden is not None and batch.reset_rows is not None:  # rows that start a document
            hidden = reset_rows(hidden, batch.reset_rows)
        p = self.state.progress
        lr = learning_rate(
            p.step,
            budget_progress(p.step, p.elapsed, self.config.train),
            self.plateau.scale,
            self.config.optim,
        )
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):
            logits, hidden = self.train_model(x, hidden)
        loss = F.cross_entropy(  # padded targets (a document's last window) are IGNORE
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE
        )
        if self.loss_hook is not None:
            loss = self.loss_hook(p.step, loss)
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
            p.nonfinite += 1
            allowed = self.config.train.skip_nonfinite
            if p.nonfinite > allowed:
                raise NonFiniteLoss(
                    f"the loss or gradient became non-finite at step {p.step} "
                    f"({p.nonfinite} time(s), {allowed} allowed); the last good checkpoint "
                    "is kept: lower --lr, raise --grad-clip, or allow skips with --skip-nonfinite N"
                )
            self.log(
                f"warning: non-finite loss at step {p.step}, step skipped ({p.nonfinite}/{allowed})"
            )
            return None
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.hidden = detach_hidden(hidden) if self.config.data.batching == "stream" else None
        return float(loss.detach())


class _Window:
    """The training loss and speed since the last evaluation (what a metrics record reports)."""

    def __init__(self, now: float) -> None:
        self.losses: list[float] = []
        self.chars = 0
        self.start = now

    def add(self, loss: float, chars: int) -> None:
        self.losses.append(loss)
        self.chars += chars

    def speed(self, now: float) -> float:
        return self.chars / max(now - self.start, 1e-9)


class _Eta:
    """The progress bar's postfix: the last evaluation's figures and, with a budget, the time
    left. Seconds per step are measured over the last steps (two evaluation intervals, so that
    the evaluations' own time is counted at their share), not since the start."""

    def __init__(self, eval_interval: int) -> None:
        self.times: deque[float] = deque(maxlen=max(100, 2 * eval_interval) + 1)
        self.status = ""  # the last evaluation's figures

    def seconds_per_step(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def postfix(self, seconds_left: float | None) -> str:
        if seconds_left is None:
            return self.status
        eta = f"ETA {_clock(seconds_left)}"
        return f"{self.status} | {eta}" if self.status else eta


def _clock(seconds: float) -> str:
    """A duration as a clock shows it: 1:02:03, 2:03 or 0:09."""
    s = int(seconds + 0.5)
    h, m = s // 3600, s // 60 % 60
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _loop(run: Run, guard: SignalGuard, on_eval: Callable[[int, float], None] | None) -> str:
    from tqdm import tqdm

    t = run.config.train
    p = run.state.progress
    base_elapsed, start = p.elapsed, time.monotonic()
    window = _Window(start)
    bar = tqdm(
        total=t.max_steps or None,
        initial=p.step if t.max_steps else 0,
        disable=not run.progress,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        leave=False,
    )
    eta = _Eta(t.eval_interval)
    has_budget = bool(t.max_steps or t.max_time)
    last_val: float | None = None
    try:
        while True:
            p.elapsed = base_elapsed + (time.monotonic() - start)
            if run.sync_step(guard):
                raise guard.stop_error()
            if reason := p.budget_spent(t):
                break
            batch = run.batcher.next()
            loss = run.train_step(batch)
            if loss is None:  # a skipped non-finite step
                continue
            p.step += 1
            p.chars += batch.targets
            window.add(loss, batch.targets)
            bar.update(1)
            if run.progress and has_budget:
                now = time.monotonic()
                eta.times.append(now)
                p.elapsed = base_elapsed + (now - start)
                left = p.time_left(t, eta.seconds_per_step())
                bar.set_postfix_str(eta.postfix(left), refresh=False)
            if p.step % t.eval_interval:
                continue
            # -- a scheduled evaluation: it feeds the schedule, early stopping and best/ ----------
            last_val = val = _scheduled_evaluation(run, window, base_elapsed, start, bar, eta)
            window = _Window(time.monotonic())
            if on_eval is not None:
                on_eval(p.step, val)
            if t.sample_every and p.evals % t.sample_every == 0 and run.writer:
                text = run.sample(seed=t.seed + p.step)
                run.folder.append_sample(f"--- step {p.step}, val {val:.3f}\n{text}\n")
                if run.tensorboard is not None:
                    run.tensorboard.sample(p.step, text)
                bar.write(f"--- step {p.step}, val {val:.3f} ---\n{text}\n", file=sys.stderr)
            if run.state.early.should_stop(t.early_stopping):
                reason = f"early stopping: no improvement in {t.early_stopping} evaluations"
                break
    except TrainingStopped:
        _finish(run, last_val, report_only=True)
        run.log(
            f"charlstm: saved at step {p.step}; continue with: charlstm train --resume {run.out}"
        )
        raise
    finally:
        bar.close()
    _finish(run, last_val, report_only=False)
    return reason


def _scheduled_evaluation(
    run: Run, window: _Window, base_elapsed: float, start: float, bar, eta: _Eta
) -> float:
    """Evaluate, log the record, feed the schedule and early stopping, save best/ and last/."""
    p = run.state.progress
    val = run.evaluate()
    if not math.isfinite(val):
        raise NonFiniteLoss(
            f"the validation loss became non-finite at step {p.step}; the last good checkpoint "
            "is kept: lower --lr or raise --grad-clip, then resume or train again"
        )
    p.evals += 1
    now = time.monotonic()
    p.elapsed = base_elapsed + (now - start)
    speed = window.speed(now)
    record = {
        "step": p.step,
        "time": round(p.elapsed, 3),
        "train_loss": float(np.mean(window.losses)),
        "val_loss": val,
        "val_bpc": val / math.log(2),
        "val_scope": run.val_scope,
        "lr": run.opt.param_groups[0]["lr"],
        "chars_per_s": round(speed, 1),
    }
    if run.writer:
        run.folder.append_metrics(record)
        if run.tensorboard is not None:
            run.tensorboard.record(record)
    if run.config.optim.schedule == "plateau":
        run.plateau.update(val)
    run.state.early.update(val)
    if run.state.best.improves(val):
        run.save_best(val)
    run.save_last()
    eta.status = (
        f"train {record['train_loss']:.3f} val{' (slice)' * (run.val_scope == 'slice')} "
        f"{val:.3f} ({val / math.log(2):.2f} bpc) "
        f"lr {record['lr']:.2e} {speed / 1000:.1f}k ch/s"
    )
    bar.set_postfix_str(eta.postfix(None), refresh=False)
    return val


def _finish(run: Run, last_val: float | None, report_only: bool) -> None:
    """Save the final state. An evaluation of the last step on the slice (when it was not
    scheduled) can improve best/; at a normal end the full pass (`_final_figures`) then decides
    best/. Neither touches the state that drives the schedule, so resume stays exact. A stop by
    signal skips the full pass: the user asked to stop, and the resumed run will make it."""
    p = run.state.progress
    unscheduled = bool(p.step) and (
        last_val is None or bool(p.step % run.config.train.eval_interval)
    )
    if unscheduled:
        val = run.evaluate()
        if math.isfinite(val) and run.state.best.improves(val):
            run.save_best(val)
    if p.step and not report_only:
        _final_figures(run, to_board=unscheduled)
    run.save_last()


def _final_figures(run: Run, to_board: bool) -> None:
    """Measure the final weights and best/'s on the whole split, keep the better in best/ (with
    its full-pass figure in its meta) and append the final metrics record.

    The slice chose best/ during the run; the whole split has the last word, so a final iterate
    that the slice ranked lower but the full pass ranks higher replaces it. The figures a resumed
    run compares against stay slice figures (`state.best`), so the units never mix. TensorBoard
    draws slice figures apart from full ones (`tensorboard.SCALARS`); it gets the whole record
    only `to_board` (a step no scheduled record has drawn), else its full-pass figure alone, and
    that only where the scheduled figures were slices: one point a step on each curve."""
    p, best = run.state.progress, run.state.best
    whole = run.eval_slice() is None  # the slice is the whole split: figures are full
    final_val = run.evaluate(full=True)
    candidates = []  # (full-pass loss, order, what, step, tensors-or-None for the final weights)
    kept = run.best_weights()
    if kept is not None:
        if best.best_step == p.step:  # saved at this very step: the final weights themselves
            best_val = final_val
        elif whole:
            best_val = best.best_saved_val
        else:
            scratch = copy.deepcopy(run.model)
            scratch.load_state_dict(kept)
            best_val = run.evaluate(scratch, full=True)
        candidates.append((best_val, 0, "best", best.best_step, kept))
    candidates.append((final_val, 1, run.weights_kind(run.eval_model), p.step, None))
    raw_val = None
    if run.ema is not None:  # the average is usually better, but not always (a short run)
        raw_val = run.evaluate(run.model, full=True)
        candidates.append((raw_val, 2, "raw", p.step, None))
    finite = [c for c in candidates if math.isfinite(c[0])]
    if not finite:
        raise NonFiniteLoss(
            f"the validation loss became non-finite at step {p.step}; the last good checkpoint "
            "is kept: lower --lr or raise --grad-clip, then resume or train again"
        )
    chosen_val, _, what, chosen_step, tensors = min(finite, key=lambda c: c[:2])
    if what != "best":  # the final weights (the average or the raw ones) replace best/
        model = run.model if what == "raw" else run.eval_model
        slice_val = chosen_val if whole else run.evaluate(model)  # state.best holds slice figures
        run.save_best(slice_val, model, write=False)
        tensors = run.best_tensors
    test = run.test_figures(tensors)  # {} without a test split; nothing above ever reads it
    metrics = {"val_loss": chosen_val, "val_scope": "full"}
    metrics.update({"best_val_loss": chosen_val, "best_step": chosen_step})
    metrics.update(test)
    run.write_best(tensors, chosen_step, metrics)
    record = {
        "step": p.step,
        "time": round(p.elapsed, 3),
        "val_loss": final_val,
        "val_bpc": final_val / math.log(2),
        "val_scope": "full",
        "best_val_loss": chosen_val,
        "best_step": chosen_step,
        "weights": run.best_kind,
        **({} if raw_val is None else {"raw_val_loss": raw_val}),
        "lr": run.opt.param_groups[0]["lr"],
        **test,
        "final": True,
    }
    run.final_record = record
    if run.writer:
        run.folder.append_metrics(record)
        if run.tensorboard is not None and to_board:
            run.tensorboard.record(record)
        elif run.tensorboard is not None and not whole:
            run.tensorboard.record(
                {k: record[k] for k in ("step", "val_loss", "val_bpc", "val_scope")}
            )


def ema_decay(ema: float, n: int) -> float:
    """The weight average's decay after `n` updates: `ema`, but at most (1 + n) / (10 + n).

    A fixed decay of 0.999 averages over the last ~1000 steps and starts from the initial
    weights, so a run of a few thousand steps is judged on weights that lag far behind what it
    has learned. Warming the decay up (0.18, 0.55, 0.92, 0.99 after 1, 10, 100, 1000 updates, as
    TensorFlow's ExponentialMovingAverage does with num_updates) lets the average follow the
    weights early and reach `ema` only after ~10 / (1 - ema) steps."""
    return min(ema, (1.0 + n) / (10.0 + n))


def ema_update(ema: float):
    """The `multi_avg_fn` of torch's AveragedModel for `ema_decay`. AveragedModel copies the
    weights at its first update and passes how many updates it holds (n_averaged, which last/
    stores) to every later one, so a resumed run continues the same decays."""

    @torch.no_grad()
    def update(averaged: list, current: list, n_averaged: torch.Tensor | int) -> None:
        decay = ema_decay(ema, int(n_averaged))
        torch._foreach_lerp_(averaged, current, 1.0 - decay)

    return update


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(run: Run, on_eval: Callable[[int, float], None] | None = None) -> str:
    """Train `run` until its budget, early stopping, a signal or a fault ends it, saving as it goes;
    returns why it stopped. Raises `TrainingStopped` after a SIGINT/SIGTERM (having saved)."""
    with SignalGuard(run.log) as guard:
        return _loop(run, guard, on_eval)
