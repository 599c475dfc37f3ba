"""Hyperparameter search with Optuna: TPE sampling, pruning on validation loss, a resumable study.

Each trial is an ordinary training run (``<out>/trial-NNN``) with a time budget, so a trial's result
is "the best validation loss this configuration reaches in N seconds on this machine": big models
are judged by what they learn in the time, not by what they could learn given forever.

Pruning needs trials to report at comparable points. Budgets are in seconds and configurations
differ wildly in steps per second, so the tuner reports the best validation loss so far at each
tenth of the budget (resource 1..10) rather than at a step number; a median or Hyperband pruner
stops a trial that is behind the others at the same fraction of its time.

The study lives in a SQLite file. Finished trials (complete or pruned) are never lost: killing the
tuner loses only the trial in flight. A trial interrupted by Ctrl-C or SIGTERM is queued to run
again with the same parameters; one whose process was killed outright is noticed by its stale
heartbeat and queued again in the same way when the study resumes.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charlstm.config import RunConfig, to_toml
from charlstm.errors import CheckpointError, NonFiniteLoss, TrainingStopped, UserError

PRUNERS = ("median", "hyperband", "none")
# Reports per trial: the budget is cut into this many equal slices of time.
RESOURCES = 10

# The search space; `suggest` reads it. Categorical lists rather than ranges where only a few values
# are worth a trial (layer widths, batch shapes), so that TPE does not spread trials too thin.
SPACE: dict[str, Any] = {
    "cell": ["lstm", "gru", "rnn"],
    "num_layers": (1, 3),
    "hidden_size": [64, 128, 192, 256, 384, 512],
    "embedding_size": [16, 32, 64, 128],
    "dropout": (0.0, 0.7),
    "embedding_dropout": (0.0, 0.5),
    "weight_drop": (0.0, 0.8),
    "lr": (3e-4, 2e-2),
    "schedule": ["plateau", "cosine", "constant"],
    "ema": [0.0, 0.99, 0.995, 0.998, 0.999, 0.9995],
    "batch_size": [4, 8, 16, 32, 64],
    "seq_len": [16, 32, 64, 128],
}

# The fields every trial records and the results table shows, whatever space was searched.
SHOWN = tuple(SPACE)


def suggest(trial, space: dict[str, Any] | None = None) -> dict[str, Any]:
    """One point of `space` (default `SPACE`) for an Optuna trial, as flat config overrides."""
    params: dict[str, Any] = {}
    for name, choices in (space or SPACE).items():
        if isinstance(choices, list):
            params[name] = trial.suggest_categorical(name, choices)
        elif name == "lr":
            params[name] = trial.suggest_float(name, *choices, log=True)
        elif isinstance(choices[0], int):
            params[name] = trial.suggest_int(name, *choices)
        else:
            params[name] = trial.suggest_float(name, *choices, step=0.05)
    return params


def _flat(config: RunConfig) -> dict[str, Any]:
    return {k: v for section in config.to_dict().values() for k, v in section.items()}


def space_point(config: RunConfig, space: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values of `config` for the searched fields, to queue it as a trial; a value outside the
    space is left out (that parameter is then sampled)."""
    flat = _flat(config)
    point = {}
    for name, choices in (space or SPACE).items():
        value = flat[name]
        if value in choices if isinstance(choices, list) else choices[0] <= value <= choices[1]:
            point[name] = value
    return point


# ---------------------------------------------------------------------------------------- storage


# A study name becomes a file and a folder name under runs/tune/: letters, digits, '.', '_' and '-',
# starting with a letter or digit, so that it can neither leave that folder (no separator, no "..")
# nor change a database URL ("?", "#", "%").
STUDY_NAME = re.compile(r"[^\W_][\w.-]{0,99}")


def check_study_name(name: str) -> None:
    if not STUDY_NAME.fullmatch(name):
        raise UserError(
            f"study name {name!r} may hold only letters, digits, '.', '_' and '-', start with a "
            "letter or digit and be at most 100 characters long; e.g. --study byron-small"
        )


def default_storage(study: str, root: str | Path = "runs/tune") -> str:
    return str(Path(root) / f"{study}.db")


def storage_url(storage: str) -> str:
    """The database URL of `--storage`: a URL as given, or the SQLite file at exactly that path
    (the URL is built by SQLAlchemy, so '?', '#' or '%' in the path stay part of the path)."""
    from sqlalchemy.engine import URL, make_url

    if "://" in storage:
        return storage
    path = str(Path(storage).resolve())
    url = URL.create("sqlite", database=path).render_as_string(hide_password=False)
    if make_url(url).database != path:  # SQLAlchemy releases that do not quote the path
        raise UserError(
            f"the study file {storage!r} cannot be named in a database URL by this SQLAlchemy; "
            "choose a --storage path without '?', '#' or '%'"
        )
    return url


def shown_storage(storage: str) -> str:
    """`storage` as it may be printed: a URL with its password replaced by ***."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return storage.split("://", 1)[0] + "://…"  # unparseable: show no part that may be secret


def _without_password(text: str, storage: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        password = make_url(storage).password if "://" in storage else None
    except (ArgumentError, ValueError):
        return text.replace(storage, shown_storage(storage))
    return text.replace(str(password), "***") if password else text


def open_storage(storage: str, grace_period: int):
    """The study's storage (a SQLite file or a database URL) with heartbeats, so that a killed
    tuner's trial is noticed and retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    if "://" not in storage:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
    try:
        url = storage_url(storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=max(1, grace_period // 4),
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                # Two tuners may share one study file; let a writer wait for the other's lock.
                engine_kwargs={"connect_args": {"timeout": 60}}
                if url.startswith("sqlite")
                else None,
            )
    except (optuna.exceptions.OptunaError, ValueError, ArgumentError, SQLAlchemyError) as exc:
        why = str(exc).split("\n")[0]
    except ImportError as exc:  # no driver for the URL's database
        why = f"no driver for it: {exc.__cause__ or exc}"
    raise UserError(
        f"cannot open the study storage {shown_storage(storage)!r} "
        f"({_without_password(why, storage)}); give another --storage"
    )


def _pruner(name: str):
    import optuna

    if name == "median":
        # Judge a trial only after 30% of its time: a big model starts slow and may still win.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=2, max_resource=RESOURCES, reduction_factor=3
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


# ---------------------------------------------------------------------------------------- trials


class _Reporter:
    """The `on_eval` callback of one trial: reports the best loss so far per slice of the budget."""

    def __init__(self, trial, budget: float) -> None:
        self.trial = trial
        self.budget = budget
        self.start = time.monotonic()
        self.best = math.inf
        self.reported = 0

    def __call__(self, step: int, val_loss: float) -> None:
        import optuna

        slice_ = min(RESOURCES, int(RESOURCES * (time.monotonic() - self.start) / self.budget))
        previous = self.best
        self.best = min(self.best, val_loss)
        # Slices passed without an evaluation hold the best of the evaluations before them.
        for resource in range(self.reported + 1, slice_ + 1):
            value = self.best if resource == slice_ else previous
            if math.isfinite(value):
                self.trial.report(value, resource)
                self.reported = resource
        if self.reported and self.trial.should_prune():
            raise optuna.TrialPruned(
                f"val {self.best:.4f} at {self.reported}/{RESOURCES} of the budget"
            )


def _run_summary(run_dir: Path) -> dict[str, Any]:
    """Steps, seconds, speed and parameter count of a finished (or stopped) trial's run folder."""
    from charlstm.runs.folder import RunFolder

    info: dict[str, Any] = {}
    try:
        last = RunFolder(run_dir).read_checkpoint("last")
    except (CheckpointError, UserError, OSError):  # stopped before its first checkpoint
        return info
    m = last.meta.get("metrics") or {}
    info["steps"] = last.meta.get("step")
    info["seconds"] = m.get("elapsed")
    info["best_val"] = m.get("best_val_loss")
    info["parameters"] = sum(t.numel() for t in last.model_state().values())
    if info["seconds"]:
        info["chars_per_s"] = round(m.get("chars", 0) / info["seconds"])
    return info


def _objective(
    base: RunConfig, budget: float, out_dir: Path, threads: int | None, space: dict[str, Any]
):
    def objective(trial) -> float:
        import optuna

        params = suggest(trial, space)
        config = base.replace(**params, max_time=budget, threads=threads)
        # What the trial trains with, searched or not (the table shows it).
        trial.set_user_attr("config", {k: v for k, v in _flat(config).items() if k in SHOWN})
        run_dir = out_dir / f"trial-{trial.number:03d}"
        log_path = out_dir / f"trial-{trial.number:03d}.log"
        with open(log_path, "w", encoding="utf-8") as log_file:

            def log(msg: str) -> None:
                log_file.write(msg + "\n")
                log_file.flush()

            try:
                train_run(config, run_dir, log, _Reporter(trial, budget))
            except NonFiniteLoss as exc:
                # A configuration that diverges is an answer too (a bad one), not a crash.
                trial.set_user_attr("error", str(exc))
                raise optuna.TrialPruned(f"diverged: {exc}") from None
            except UserError as exc:
                # E.g. batch × window longer than a small text allows: this point is infeasible.
                # (The text itself was checked before the study started.)
                trial.set_user_attr("error", str(exc))
                raise optuna.TrialPruned(f"infeasible: {exc}") from None
            except TrainingStopped:
                # Interrupted by the user: this point of the space has not been judged; run it
                # again when the study resumes.
                trial.study.enqueue_trial(trial.params, skip_if_exists=False)
                raise
            finally:
                for key, value in _run_summary(run_dir).items():
                    if value is not None:
                        trial.set_user_attr(key, value)
        best = trial.user_attrs.get("best_val")
        if best is None or not math.isfinite(best):
            raise optuna.TrialPruned("no finite validation loss")
        return float(best)

    return objective


def train_run(
    config: RunConfig,
    run_dir: Path,
    log: Callable[[str], None],
    on_eval: Callable[[int, float], None],
) -> None:
    from charlstm.training.orchestrate import train

    # A trial trains exactly the settings it drew (on the fixed defaults): the automatic choice
    # would move the fields the search holds fixed, differently from trial to trial.
    config = config.replace(auto="off")
    train(config, run_dir, force=True, progress=False, log=log, on_eval=on_eval)


# ---------------------------------------------------------------------------------------- results


@dataclass
class TuneResult:
    study: Any
    best_config: RunConfig | None
    table: str
    files: dict[str, Path]


def _finished(study) -> list:
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]


def results_table(study, top: int | None = None) -> str:
    """A markdown table of the finished trials, best first (complete trials, then pruned)."""
    from optuna.trial import TrialState

    trials = sorted(
        _finished(study),
        key=lambda t: (
            t.state != TrialState.COMPLETE,
            t.value if t.value is not None else math.inf,
            min(t.intermediate_values.values(), default=math.inf),
        ),
    )
    rows = [
        (
            "| # | state | val loss | cell | layers × hidden | emb | dropout / emb / weight | lr | "
            "schedule | ema | batch × seq | steps | params |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials[:top] if top else trials:
        u = t.user_attrs
        p = {**u.get("config", {}), **t.params}
        value = (
            t.value
            if t.state == TrialState.COMPLETE
            else min(t.intermediate_values.values(), default=None)
        )
        shown = (
            "–"
            if value is None
            else f"{value:.4f}" + ("" if t.state == TrialState.COMPLETE else "*")
        )
        rows.append(
            f"| {t.number} | {t.state.name.lower()} | {shown} | {p.get('cell')} | "
            f"{p.get('num_layers')} × {p.get('hidden_size')} | {p.get('embedding_size')} | "
            f"{p.get('dropout', 0):.2f} / {p.get('embedding_dropout', 0):.2f} / "
            f"{p.get('weight_drop', 0):.2f} | "
            f"{p.get('lr', 0):.2e} | {p.get('schedule')} | {p.get('ema')} | "
            f"{p.get('batch_size')} × {p.get('seq_len')} | {u.get('steps', '–')} | "
            f"{u.get('parameters', 0):,} |"
        )
    return "\n".join(rows)


def best_config(study, base: RunConfig, budget: float) -> RunConfig | None:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    # The preset trains for the budget it was tuned at and leaves the thread count to the machine.
    # Floats are rounded (0.6000000000000001 is 0.6; lr to 3 digits) so that the file reads well.
    params = {
        k: (float(f"{v:.3g}") if k == "lr" else round(v, 4)) if isinstance(v, float) else v
        for k, v in best.params.items()
    }
    return base.replace(**params, max_time=budget, threads=None)


def write_preset(config: RunConfig, path: Path, study, budget: float) -> None:
    from charlstm.atomic import atomic_write_text

    best = study.best_trial
    header = (
        f"# Tuned by `charlstm tune` (study {study.study_name!r}): trial {best.number} reached "
        f"{best.value:.4f} nats/char\n# on the validation split in {budget:g} s of training; "
        f"{len(_finished(study))} trials finished.\n"
    )
    atomic_write_text(path, header + to_toml(config))


def save_plots(study, out_dir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    files = {}
    plots = {
        "history": vis.plot_optimization_history,
        "importances": vis.plot_param_importances,
        "parallel": vis.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        path = out_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib plots experimental; matplotlib warns on flat axes.
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(11, 6)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files[name] = path
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # Importances need two complete trials that differ; a young study may not have them.
            log(f"charlstm tune: no {name} plot yet ({exc})")
    return files


# ---------------------------------------------------------------------------------------- tune


def tune(
    base: RunConfig,
    *,
    study_name: str,
    trials: int,
    budget: float,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    preset: str | Path | None = None,
    pruner: str = "median",
    sampler_seed: int | None = 0,
    threads: int | None = 1,
    enqueue_base: bool = True,
    plots: bool = True,
    progress: bool = True,
    space: dict[str, Any] | None = None,
    grace_period: int = 20,
    preset_defaults: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run (or resume) the study until it holds `trials` finished trials; returns its results.

    `base` supplies everything the search does not (the text, the evaluation cadence, early
    stopping, the seed; a `max_steps` caps each trial besides the time budget). With `enqueue_base`,
    a new study's first trial is `base` itself, so the tuned preset is never worse than the starting
    point on the tuning budget. A trial whose process died is retried once no heartbeat has come
    from it for `grace_period` seconds. `preset_defaults` are fields the preset should have instead
    of the base's (settings only the search wanted, such as no samples).
    """
    import optuna
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_study_name(study_name)
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    from charlstm.data.loading import prepare_data

    prepare_data(base)  # a missing text or dataset fails here, once, not in every trial
    storage = storage or default_storage(study_name)
    out_dir = (
        Path(out_dir)
        if out_dir
        else Path(storage).with_suffix("")
        if "://" not in storage
        else Path("runs/tune") / study_name
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space or SPACE
    study = optuna.create_study(
        storage=open_storage(storage, grace_period),
        study_name=study_name,
        direction="minimize",
        load_if_exists=True,
        pruner=_pruner(pruner),
    )
    old = study.get_trials(deepcopy=False)
    # Seeded by the trials already recorded: a resumed study must not redraw the points that the
    # first session's random start-up trials drew.
    study.sampler = optuna.samplers.TPESampler(
        seed=None if sampler_seed is None else sampler_seed + len(old),
        multivariate=True,
        n_startup_trials=max(5, min(10, trials // 4)),
    )
    if enqueue_base and not old:
        study.enqueue_trial(space_point(base, space))
    done = len(_finished(study))
    log(
        f"charlstm tune: study {study_name!r} in {shown_storage(storage)}: {done} of {trials} "
        "trials finished"
        + (f" ({len(old)} recorded)" if old else "")
        + f"; {budget:g} s each; runs in {out_dir}"
    )

    bar = tqdm(
        total=trials,
        initial=min(done, trials),
        disable=not progress,
        unit="trial",
        dynamic_ncols=True,
        file=sys.stderr,
    )

    def after(study, trial) -> None:
        from optuna.trial import TrialState

        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        bar.update(1)
        value = (
            trial.value
            if trial.value is not None
            else min(trial.intermediate_values.values(), default=math.nan)
        )
        p = {**trial.user_attrs.get("config", {}), **trial.params}
        bar.write(
            f"trial {trial.number}: {trial.state.name.lower():8s} {value:.4f}  {p['cell']} "
            f"{p['num_layers']}×{p['hidden_size']} emb {p['embedding_size']} lr {p['lr']:.1e} "
            f"{p['schedule']} ema {p['ema']} batch {p['batch_size']}×{p['seq_len']}",
            file=sys.stderr,
        )
        try:
            bar.set_postfix_str(f"best {study.best_value:.4f} (trial {study.best_trial.number})")
        except ValueError:
            pass

    try:
        if done < trials:
            study.optimize(
                _objective(base, budget, out_dir, threads, space),
                n_trials=trials - done,
                callbacks=[
                    after,
                    optuna.study.MaxTrialsCallback(
                        trials,
                        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
                    ),
                ],
                gc_after_trial=True,
            )
    finally:
        bar.close()
    return summarise(
        study, base.replace(**(preset_defaults or {})), budget, out_dir, preset, plots, log
    )


def summarise(
    study,
    base: RunConfig,
    budget: float,
    out_dir: Path,
    preset: str | Path | None,
    plots: bool,
    log: Callable[[str], None],
) -> TuneResult:
    """Write the results table, JSON, best preset and plots of a study."""
    from charlstm.atomic import atomic_write_text

    table = results_table(study)
    files: dict[str, Path] = {"table": out_dir / "results.md"}
    atomic_write_text(
        files["table"], table + "\n\n\\* pruned: the best loss it reported before it was stopped\n"
    )
    records = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "user_attrs": t.user_attrs,
            "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
        }
        for t in study.get_trials(deepcopy=False)
    ]
    files["json"] = out_dir / "results.json"
    atomic_write_text(
        files["json"],
        json.dumps({"study": study.study_name, "budget": budget, "trials": records}, indent=1),
    )
    config = best_config(study, base, budget)
    if config is not None:
        files["preset"] = Path(preset) if preset else out_dir / "best.toml"
        write_preset(config, files["preset"], study, budget)
    if plots and len(_finished(study)) >= 1:
        files.update(save_plots(study, out_dir, log))
    return TuneResult(study, config, table, files)
