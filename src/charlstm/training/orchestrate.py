"""One training job from start to end: what `charlstm train` and `charlstm.train` run.

This is the layer above the loop. It decides what a job is made of (pre-training then fine-tuning,
one process or many under torchrun, a report at the end) and composes the pieces: the run folder,
the data, a `Run` (or a `DistributedRun`), transfer of another run's weights, and the loop. Nothing
below imports it, so the loop stays a loop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from charlstm.config import RunConfig, from_dict, load_toml, to_toml
from charlstm.data.corpus import Corpus, load_documents, split_points
from charlstm.data.loading import prepare_data
from charlstm.data.sources import is_glob
from charlstm.errors import UserError
from charlstm.hardware import pick_device, pick_precision, set_threads
from charlstm.model import count_parameters
from charlstm.runs.folder import RunFolder
from charlstm.training import autoconfig, bases, distributed, tensorboard, transfer
from charlstm.training.loop import Run, fit
from charlstm.training.schedule import resumed_decay_steps

# Adam moves each weight by about lr per step: far above 1 a run can only diverge, and from about
# 3e37 Adam's own step overflows float32 (a RuntimeError deep inside torch).
MAX_LR = 10.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """The log of every process but the first in a distributed job."""


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> RunConfig:
    """The stored configuration of `run_dir`, with budget-like overrides applied; a new
    ``max_time`` stretches the cosine's ``decay_steps`` with it (`resumed_decay_steps`) unless
    ``decay_steps`` is among the overrides."""
    ck = RunFolder(Path(run_dir)).resume_checkpoint()
    config = from_dict(ck.meta["config"])
    changed_model = {
        k
        for k in overrides
        if k in asdict(config.model) and overrides[k] != getattr(config.model, k)
    }
    if changed_model:
        raise UserError(
            f"cannot change the model's {', '.join(sorted(changed_model))} when resuming; "
            "train a new run or fine-tune with --init-from"
        )
    resumed = config.replace(**overrides)
    if "decay_steps" in overrides:  # given again: as given
        return resumed
    return resumed.replace(decay_steps=resumed_decay_steps(config, resumed))


def train(
    config: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    explicit: set[str] | None = None,
) -> Path:
    """Train a model as `config` says and write the run to `out`; returns the run folder.

    With ``train.auto = "on"`` (the default), a new run's model, batch, regularisation, schedule
    and evaluation cadence are chosen from the text, the budget and this machine (autoconfig.py),
    except the fields in `explicit` (the flags and preset keys the user gave; None: those that
    differ from the defaults). The choice is logged and stored in config.toml with auto off, so
    that ``--config RUN/config.toml`` repeats the run exactly.

    ``init_from`` starts from another run's weights, ``pretrain`` makes that run first.
    `on_eval(step, val_loss)` is called after each scheduled evaluation, once the run is saved; an
    exception it raises (a tuner pruning the trial) ends the run and propagates. `loss_hook(step,
    loss)` may replace each step's loss (tests use it to inject faults).

    With ``resume=True``, `out` must hold a run; it continues from its ``last/`` checkpoint (the
    caller passes the stored configuration, see `resume_config`). Raises `UserError` for bad input,
    `TrainingStopped` after a SIGINT/SIGTERM (having saved), `NonFiniteLoss` on a numerical fault.
    """
    log = log or _stderr
    out = Path(out)
    if config.optim.lr > MAX_LR:
        raise UserError(
            f"lr {config.optim.lr:g} is far beyond any rate Adam trains with (each step "
            f"moves every weight by about lr); use at most {MAX_LR:g}, e.g. 3e-3"
        )
    if config.train.pretrain and not resume:  # two runs: <out>-pretrain, then `out` from it
        return pretrain_then_finetune(
            config, out, force=force, progress=progress, log=log, on_eval=on_eval
        )
    if config.train.tensorboard:  # on every process, before anything is written
        tensorboard.check(config.train.tensorboard, out, resume=resume, force=force)
    ctx = distributed.setup(config.train.device)  # None unless started by torchrun
    writer = ctx is None or ctx.rank == 0
    if not writer:
        log, progress = _quiet, False
    folder = RunFolder(out)
    if writer:
        if not resume:
            folder.start_new(force)
        folder.remove_stale_temps()
    last_ckpt = folder.read_checkpoint("last") if resume else None
    source = None
    decision = None
    corpus = None  # the text as the base's probe read it, for `prepare_data` to take
    if config.train.init_from and last_ckpt is None:
        _refuse_prepared_fine_tuning(config)
        source = transfer.read_source(config.train.init_from)
        transfer.check_architecture(config, source)
    elif last_ckpt is None:
        keep = autoconfig.explicit_fields(config) if explicit is None else set(explicit)
        decision, corpus = _base_decision(config, keep)
        if decision.used or decision.probes:  # silent when no base was even considered
            log(f"charlstm: base: {decision.reason}")
        config = config.replace(
            base=decision.name or (str(decision.path) if decision.path else "none"),
            base_sha256=decision.sha256,
        )
        if decision.used:
            source = transfer.read_source(decision.path)
            config = transfer.adopt_architecture(config, source, keep)
    data = prepare_data(
        config,
        last_ckpt.vocab
        if last_ckpt
        else transfer.union_vocabulary(config, source, corpus.text if corpus else None)
        if source
        else None,
        corpus,
    )
    spent, why = 0.0, None
    if config.train.auto == "on" and last_ckpt is None:
        keep = autoconfig.explicit_fields(config) if explicit is None else set(explicit)
        if source is not None:  # a fine-tuned model has its source's shape
            keep |= set(transfer.ARCHITECTURE)
        chosen, why, spent = _auto_choice(config, keep, data, ctx)
        if decision is not None and decision.used:
            # The fine-tuning settings depend on the passes the first choice expects; chosen
            # again around them (the speeds are cached by then), the choice and its line agree.
            settings = _finetune_settings(chosen, keep, len(data.train_ids))
            tuned = config.replace(**settings)
            chosen, why, more = _auto_choice(tuned, keep | set(settings), data, ctx)
            spent += more
            why += f"; fine-tuning the base at lr {chosen.optim.lr:.2g}"
        config = chosen
        log(f"charlstm: auto: {why}")
    run = (
        Run(config, folder, data, log, progress)
        if ctx is None
        else distributed.DistributedRun(config, folder, data, log, progress, ctx)
    )
    run.loss_hook = loss_hook
    if last_ckpt is not None:
        run.restore(last_ckpt)
        if writer:
            folder.keep_metrics_up_to(run.state.progress.step)
    elif source is not None:
        transfer.initialise(run.model, data.vocab, source, log)
    transfer.freeze(run.model, config.train.freeze_layers)
    if writer and config.train.tensorboard:
        run.tensorboard = tensorboard.BoardWriter(
            config.train.tensorboard,
            out,
            resume_step=run.state.progress.step if last_ckpt is not None else None,
        )
    if spent:  # the calibration counts against the budget
        run.state.progress.elapsed += spent
    if writer:
        note = f"# chosen by --auto on: {why}\n" if why else ""
        folder.write_config(note + to_toml(run.config))
    log(
        f"charlstm: {data.source}: {len(data.train_ids):,} train / {len(data.val_ids):,} "
        f"validation characters, vocabulary {len(data.vocab)}; {run.config.model.cell.upper()} "
        f"{run.config.model.num_layers}×{run.config.model.hidden_size}, "
        f"{count_parameters(run.model):,} parameters; {run.device.type}, {run.precision}, "
        f"{run.threads} threads"
    )
    try:
        reason = fit(run, on_eval)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
    if ctx is not None:
        distributed.finish()
    final = run.final_record or {}  # the full-pass figures (slice figures if there were none)
    best = final.get("best_val_loss", run.state.best.best_saved_val)
    scope = "full pass" if final or run.val_scope == "full" else "validation slice"
    log(
        f"charlstm: stopped ({reason}) at step {run.state.progress.step}; best validation loss "
        f"{best:.4f} nats/char ({best / math.log(2):.3f} bits/char, {scope}) at step "
        f"{final.get('best_step', run.state.best.best_step)}; run folder {out}"
    )
    if "test_loss" in final:  # the held-out test split, measured once with best/'s weights
        test = final["test_loss"]
        log(
            f"charlstm: test loss {test:.4f} nats/char ({test / math.log(2):.3f} bits/char) on "
            f"{len(data.test_ids):,} held-out characters, best/'s weights"
        )
    if run.config.train.report and writer:
        from charlstm.analysis.report import report_run  # matplotlib: only when a report is asked

        paths = report_run(out, log=log)
        log(f"charlstm: wrote {paths['html']} and {paths['md']}")
    return out


def _auto_choice(config: RunConfig, explicit: set[str], data, ctx) -> tuple[RunConfig, str, float]:
    """The automatic choice (autoconfig.choose) for this text and machine, with auto turned off
    in the result so that the stored config repeats it. Under torchrun, rank 0 chooses (its
    calibration) and every process takes its choice: all must train the same model."""
    device = pick_device(config.train.device)
    precision = pick_precision(config.train.precision, device)
    threads = set_threads(config.train.threads)
    if ctx is None or ctx.rank == 0:
        choice = autoconfig.choose(
            config,
            explicit,
            len(data.train_ids),
            len(data.val_ids),
            len(data.vocab),
            device,
            precision,
            threads,
        )
        found = [choice.config.to_dict(), choice.explanation, choice.seconds]
    else:
        found = [None, None, 0.0]
    if ctx is not None:
        found = distributed.broadcast_json(found, ctx)
    chosen, why, seconds = found
    return from_dict(chosen).replace(auto="off"), why, seconds


def _base_decision(config: RunConfig, explicit: set[str]) -> tuple[bases.Decision, Corpus | None]:
    """Whether the run starts from a base model, and which (training/bases.py), with the text
    where the decision read it (the run then takes it rather than reading it again). Under --base
    auto, a run with --auto off, with an architecture the user set, or on a prepared corpus trains
    from scratch."""
    t, d = config.train, config.data
    if t.base == "auto":
        given = sorted(explicit & set(transfer.ARCHITECTURE))
        if t.auto == "off":
            why = "none: --auto off trains the settings as given"
            return bases.Decision(None, None, None, why), None
        if d.prepared:
            why = "none: a prepared corpus is trained from scratch"
            return bases.Decision(None, None, None, why), None
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            why = f"none: {flags} given (a base has its shape)"
            return bases.Decision(None, None, None, why), None
    elif t.base != "none":
        _refuse_prepared_fine_tuning(config)
    if t.base == "none":
        return bases.decide(config, "", 0), None
    corpus = load_documents(d.dataset, d.text, d.encoding, skip_bad_files=d.skip_bad_files)
    n_train = split_points(len(corpus.text), d.val_fraction, d.test_fraction)[0]
    decision = bases.decide(config, corpus.text, n_train)
    bases.check_recorded(config, decision)
    return decision, corpus


def _finetune_settings(config: RunConfig, explicit: set[str], n_train: int) -> dict[str, Any]:
    """The fine-tuning rate, regularisation and weight average (bases.finetune_settings) for the
    passes over the text that `config` (an automatic choice) expects, where the user set none."""
    d, o, t = config.data, config.optim, config.train
    steps = o.decay_steps or t.max_steps
    epochs = steps * d.batch_size * d.seq_len / max(n_train, 1) if steps else math.inf
    return {k: v for k, v in bases.finetune_settings(epochs).items() if k not in explicit}


def _refuse_prepared_fine_tuning(config: RunConfig) -> None:
    """Fine-tuning trains on the union of the source's vocabulary and the new text's, and a
    prepared corpus's ids are fixed to its own vocabulary: the two do not mix (yet)."""
    if config.data.prepared:
        raise UserError(
            f"--init-from and --pretrain cannot fine-tune on a prepared corpus "
            f"({str(config.data.prepared)!r} is encoded with its own vocabulary); give its text "
            "with --text instead"
        )


def pretrain_out(out: Path) -> Path:
    """Where the pre-training phase of a run in `out` goes: beside it, ``<out>-pretrain``."""
    return Path(out).with_name(Path(out).name + "-pretrain")


def pretrain_then_finetune(
    config: RunConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> Path:
    """Pre-train on ``config.train.pretrain`` for ``pretrain_time`` seconds into ``<out>-pretrain``,
    then fine-tune on the run's own text from its best weights into `out`; returns `out`.

    The pre-training phase uses the run's settings with ``pretrain_config``'s on top, if given: a
    large text wants larger batches and a higher rate than a small one fine-tuned gently. The
    model's shape is the pre-training phase's. `on_eval` sees the fine-tuning phase only.
    """
    _refuse_prepared_fine_tuning(config)  # before the pre-training phase, not after it
    out = Path(out)
    t = config.train
    name = t.pretrain
    as_file = Path(name).exists() or is_glob(name)  # a file, a folder or a glob; else a dataset
    pre = load_toml(t.pretrain_config, base=config) if t.pretrain_config else config
    pre = pre.replace(
        dataset=None if as_file else name,
        text=name if as_file else None,
        max_time=t.pretrain_time,
        max_steps=None,
        init_from=None,
        pretrain=None,
        pretrain_config=None,
        freeze_layers=0,
    )
    pre_out = pretrain_out(out)
    train(pre, pre_out, force=force, progress=progress, log=log)
    fine = config.replace(
        pretrain=None,
        pretrain_config=None,
        init_from=str(pre_out),
        **{k: getattr(pre.model, k) for k in transfer.ARCHITECTURE},
    )
    return train(fine, out, force=force, progress=progress, log=log, on_eval=on_eval)
