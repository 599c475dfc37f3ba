"""The `charlstm` command: a thin layer that parses options and calls library functions.

Every option of `charlstm train` is generated from the configuration dataclasses, so a new field is
a new flag with no second list to keep in sync. Errors meant for the user (`UserError`) are printed as
one line on stderr with exit status 2; Ctrl-C during training exits 130 (SIGTERM 143) after saving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from charlstm.config import RunConfig, _type_options, field_index, load_toml
from charlstm.errors import TrainingStopped, UserError


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"charlstm: error: {message}", err=True)
    sys.exit(code)


class CharlstmGroup(click.Group):
    """Turns library errors into one-line messages and exit codes instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _fail(str(exc), exc.exit_code)
        except TrainingStopped as exc:
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)


@click.group(cls=CharlstmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="charlstm")
def main() -> None:
    """Train a character-level LSTM on any text, generate from it, and see what it learned."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"charlstm: warning: {message}", err=True)

    warnings.showwarning = show


# ---------------------------------------------------------------------------------------- train


def _config_options(func):
    """Add one --flag per configuration field (default None = keep the preset's value)."""
    for name, (section, f) in reversed(list(field_index().items())):
        if name in ("vocab_size",):
            continue
        opts = _type_options(f.type)
        flag = "--" + name.replace("_", "-")
        help_text = f"[{section}] default: {f.default!r}"
        if bool in opts:
            func = click.option(
                f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text
            )(func)
        else:
            kind = float if float in opts else int if int in opts else str
            func = click.option(flag, name, type=kind, default=None, help=help_text)(func)
    return func


def _command_args(ctx, skip: tuple[str, ...] = ()) -> list[str]:
    """The arguments that give a click command the options it was called with (for relaunching)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None or not isinstance(param, click.Option):
            continue
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        args += [param.opts[0], repr(value) if isinstance(value, float) else str(value)]
    return args


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML preset; flags override it.",
)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Run folder to write (default runs/<dataset>)."
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue the run in this folder from its last checkpoint.",
)
@click.option("--force", is_flag=True, help="Replace the run files already in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option(
    "--nproc",
    type=int,
    help="Train as N processes of this machine under torchrun "
    "(one per GPU on CUDA); the global --batch-size is split between them.",
)
@_config_options
def train(config_path, out, resume_dir, force, no_progress, nproc, **fields) -> None:
    """Train a model on --dataset NAME or --text FILE and write a run folder."""
    from charlstm.training.orchestrate import resume_config
    from charlstm.training.orchestrate import train as train_run

    if nproc is not None and nproc != 1:
        from charlstm.training.distributed import launch

        sys.exit(launch(nproc, _command_args(click.get_current_context(), skip=("nproc",))))
    overrides = {k: v for k, v in fields.items() if v is not None}
    if overrides.get("text") or overrides.get("prepared"):
        overrides.setdefault("dataset", None)
    if resume_dir:
        if config_path:
            raise UserError(
                "--config cannot be combined with --resume; the run keeps its own config"
            )
        if out and Path(out) != Path(resume_dir):
            raise UserError(
                "--out cannot differ from --resume; the run continues in its own folder"
            )
        config = resume_config(Path(resume_dir), overrides)
        train_run(config, resume_dir, resume=True, progress=not no_progress)
        return
    config = load_toml(config_path) if config_path else RunConfig()
    config = config.replace(**overrides)
    if config.train.init_from:
        from charlstm.config import toml_keys
        from charlstm.training.transfer import adopt_architecture, read_source

        # A fine-tuned model has the pre-trained one's shape; a shape the user asked for must agree.
        config = adopt_architecture(
            config, read_source(config.train.init_from), set(overrides) | toml_keys(config_path)
        )
    if out is None:
        name = (
            Path(config.data.prepared).name
            if config.data.prepared
            else Path(config.data.text).stem
            if config.data.text
            else config.data.dataset
        )
        out = str(Path("runs") / str(name))
    train_run(config, out, force=force, progress=not no_progress)


# ---------------------------------------------------------------------------------------- generate


def _parse_temperatures(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--temperatures takes numbers separated by commas, got {value!r}"
        ) from None


def _write_output(out: str | None, text: str) -> None:
    if out is None:
        click.echo(text)
        return
    from charlstm.atomic import atomic_write_text

    atomic_write_text(Path(out), text)
    click.echo(f"wrote {out}", err=True)


@main.command()
@click.argument("run", type=click.Path())
@click.option("--start-text", default=" ", show_default=True, help="Text the samples continue.")
@click.option("--length", default=200, show_default=True, type=int, help="Characters to generate.")
@click.option("--temperature", default=0.3, show_default=True, type=float, help="0 = greedy.")
@click.option(
    "--temperatures", help="Comma-separated temperatures: one sample per value, side by side."
)
@click.option("--top-k", type=int, help="Keep the k most likely characters.")
@click.option("--top-p", type=float, help="Nucleus sampling threshold in (0, 1].")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--num-samples", default=1, show_default=True, type=int)
@click.option("--seed", type=int, help="Seed for reproducible samples.")
@click.option("--stop", multiple=True, help="Stop a sample at this string (repeatable).")
@click.option("--max-lines", type=int, help="Stop after this many lines.")
@click.option("--max-stanzas", type=int, help="Stop after this many blank-line-separated stanzas.")
@click.option(
    "--unknown",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="What to do with start-text characters the model never saw.",
)
@click.option("--stream", is_flag=True, help="Print text as it is produced.")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the samples to this file.")
def generate(
    run,
    start_text,
    length,
    temperature,
    temperatures,
    top_k,
    top_p,
    repetition_penalty,
    num_samples,
    seed,
    stop,
    max_lines,
    max_stanzas,
    unknown,
    stream,
    which,
    device,
    out,
) -> None:
    """Generate text from a trained RUN folder."""
    from charlstm.api import load

    model = load(run, which=which, device=device)
    extra = dict(
        repetition_penalty=repetition_penalty,
        stop=stop,
        max_lines=max_lines,
        max_stanzas=max_stanzas,
        unknown=unknown,
    )
    temps = _parse_temperatures(temperatures)
    if temps:
        from charlstm.textutil import side_by_side

        columns = []
        for temp in temps:
            text = model.generate(start_text, length, temp, top_k, top_p, 1, seed, **extra)[0]
            columns.append((f"temperature {temp:g}", text))
        _write_output(out, side_by_side(columns))
        return
    if stream and out is None:
        for i in range(num_samples):
            s = None if seed is None else seed + i
            for texts in model.stream(start_text, length, temperature, top_k, top_p, 1, s, **extra):
                click.echo(texts.get(0, ""), nl=False)
            click.echo("\n" if i < num_samples - 1 else "")
        return
    samples = model.generate(
        start_text, length, temperature, top_k, top_p, num_samples, seed, **extra
    )
    sep = "\n\n" + "-" * 40 + "\n\n"
    _write_output(out, sep.join(samples))


# ---------------------------------------------------------------------------------------- evaluate


@main.command()
@click.argument("run", type=click.Path())
@click.option("--text", "text_path", type=click.Path(), help="Evaluate on this file.")
@click.option("--dataset", help="Evaluate on the validation split of this named dataset.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--unknown", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(run, text_path, dataset, encoding, unknown, which, as_json) -> None:
    """Loss (nats/char), bits/char and perplexity of RUN on a text (default: its validation split)."""
    from charlstm.api import load
    from charlstm.config import from_dict
    from charlstm.data.corpus import load_corpus, read_text, split_text

    model = load(run, which=which)
    if text_path:
        text, source = read_text(text_path, encoding), text_path
    else:
        cfg = from_dict(model.meta["config"])
        if cfg.data.prepared and not dataset:  # trained from `charlstm prepare`'s memory-mapped ids
            from charlstm.data.prepared import decode_ids, open_prepared

            corpus = open_prepared(cfg.data.prepared)
            text = decode_ids(corpus.vocab, corpus.split(cfg.data.val_fraction)[1])
            source = cfg.data.prepared
        else:
            name = dataset or cfg.data.dataset
            path = None if dataset else cfg.data.text
            full, source = load_corpus(name, path, cfg.data.encoding)
            text = split_text(full, cfg.data.val_fraction)[1]
        source += " (validation split)"
    result = {"source": source, **model.evaluate(text, unknown=unknown)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"{source}: {result['loss']:.4f} nats/char, {result['bits_per_char']:.4f} bits/char, "
            f"perplexity {result['perplexity']:.3f} over {result['characters']:,} characters"
        )


# ---------------------------------------------------------------------------------------- datasets


@main.command()
@click.option("--json", "as_json", is_flag=True)
def datasets(as_json) -> None:
    """List the named corpora and whether a verified local copy exists."""
    from charlstm.data import datasets as ds

    rows = ds.status()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for row in rows:
        state = row["local"] or "not cached (downloaded on first use)"
        click.echo(f"{row['name']:<16} {row['description']}\n{'':<16} {state}")


# ---------------------------------------------------------------------------------------- serve


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 exposes the server to the network).",
)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--max-length",
    default=4000,
    show_default=True,
    type=int,
    help="Most characters one sample may ask for.",
)
@click.option(
    "--max-concurrency",
    default=64,
    show_default=True,
    type=int,
    help="Most streams generating at once; more are answered 429 with Retry-After.",
)
@click.option(
    "--max-batch",
    type=int,
    help="Most streams per model step (default: --max-concurrency); the rest wait.",
)
@click.option(
    "--time-limit",
    default=120.0,
    show_default=True,
    type=float,
    help="Seconds one generation may take before it ends with an error.",
)
@click.option("--threads", default=1, show_default=True, type=int, help="Torch intra-op threads.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(
    runs, host, port, max_length, max_concurrency, max_batch, time_limit, threads, log_level
) -> None:
    """Serve RUNS over HTTP: a JSON and streaming API, its docs at /docs, and a page at /."""
    from charlstm.serve.app import ServerConfig
    from charlstm.serve.app import serve as serve_runs

    config = ServerConfig(
        max_length=max_length,
        max_concurrency=max_concurrency,
        max_batch=max_batch,
        time_limit=time_limit,
    )
    serve_runs(runs, host=host, port=port, config=config, threads=threads, log_level=log_level)


# ---------------------------------------------------------------------------------------- bench


@main.group()
def bench() -> None:
    """Measure speed against the lab's code, in one run on this machine."""


@bench.command("generate")
@click.argument("run", required=False, type=click.Path())
@click.option("--temperature", default=0.5, show_default=True, type=float)
@click.option("--repeats", default=3, show_default=True, type=int, help="Best of this many runs.")
@click.option(
    "--big/--no-big",
    default=True,
    show_default=True,
    help="Also time a 1 × 512 model against its memory-bandwidth bound.",
)
@click.option("--threads", type=int, help="Threads (default: PyTorch's, one per core).")
def bench_generate(run, temperature, repeats, big, threads) -> None:
    """Characters/s of the lab's loop and of the library (1, 16, 256 streams) on RUN's model, or
    on a random lab-sized one (2 × 85 LSTM, vocabulary 74) without RUN; one JSON line at the end."""
    import torch

    from charlstm.api import load
    from charlstm.bench.generation import run as run_bench

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    model = load(run, device="cpu") if run else None
    result = run_bench(model, temperature=temperature, repeats=repeats, big=big, log=click.echo)
    click.echo(json.dumps(result))


@bench.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML preset.")
@click.option("--dataset", help="Named dataset (overrides the preset's).")
@click.option("--budget", type=float, required=True, help="Training seconds.")
@click.option("--out", type=click.Path(file_okay=False), help="Keep the run folder here.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
def bench_train(config_path, dataset, budget, out, sets) -> None:
    """Validation loss within a training budget, chars/s, GFLOP/s against this machine's measured
    matrix-multiply peak, and the library step against a bare PyTorch loop; one JSON line."""
    from charlstm.bench.training import main_config, parse_value, quality_per_time

    overrides = {}
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = parse_value(value)
    config = main_config(config_path, dataset, overrides)
    click.echo(json.dumps(quality_per_time(config, budget, out)))


# ---------------------------------------------------------------------------------------- prepare


@main.command()
@click.option(
    "--text", "text_path", type=click.Path(dir_okay=False), help="The text file to prepare."
)
@click.option("--dataset", help="A named corpus to prepare instead (see `charlstm datasets`).")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write ids.bin, vocab.json and meta.json to.",
)
@click.option("--encoding", default="utf-8", show_default=True)
@click.option(
    "--val-fraction",
    default=0.1,
    show_default=True,
    type=float,
    help="Recorded in meta.json; training cuts by its own --val-fraction.",
)
@click.option("--force", is_flag=True, help="Replace a prepared corpus already in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def prepare(text_path, dataset, out, encoding, val_fraction, force, no_progress) -> None:
    """Encode a corpus larger than memory once; then train on it with --prepared OUT."""
    from charlstm.data import datasets as ds
    from charlstm.data.prepared import describe
    from charlstm.data.prepared import prepare as prepare_corpus

    if bool(text_path) == bool(dataset):
        raise UserError("give exactly one of --text FILE or --dataset NAME")
    source = text_path
    if dataset:
        text_path, encoding, source = (
            ds.resolve(dataset, progress=not no_progress),
            "utf-8",
            dataset,
        )
    result = prepare_corpus(
        text_path,
        out,
        encoding=encoding,
        val_fraction=val_fraction,
        source=source,
        force=force,
        progress=not no_progress,
    )
    click.echo(describe(result), err=True)


# ---------------------------------------------------------------------------------------- analyze, report


def _analysis_options(func):
    """The options `charlstm analyze` and `charlstm report` share."""
    options = [
        click.option(
            "--samples",
            default=8,
            show_default=True,
            type=int,
            help="Samples generated at each temperature.",
        ),
        click.option(
            "--length", default=1000, show_default=True, type=int, help="Characters in each sample."
        ),
        click.option(
            "--temperatures",
            default="0.2,0.5,0.8,1.0",
            show_default=True,
            help="Comma-separated sampling temperatures.",
        ),
        click.option(
            "--text",
            "text_path",
            type=click.Path(),
            help="Analyse this file instead of generating.",
        ),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the samples."),
        click.option(
            "--which",
            type=click.Choice(["best", "last"]),
            default="last",
            show_default=True,
            help="Checkpoint: the weights training ended with, or the best on validation.",
        ),
        click.option(
            "--threads", type=int, help="Torch threads (default: PyTorch's, one per core)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_analysis(run, samples, length, temperatures, text_path, seed, which, threads) -> dict:
    from charlstm.analysis.report import analyze_run
    from charlstm.data.corpus import read_text

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    text = read_text(text_path) if text_path else None
    return analyze_run(
        run,
        samples=samples,
        length=length,
        temperatures=_parse_temperatures(temperatures) or [],
        text=text,
        text_label=str(text_path),
        seed=seed,
        which=which,
        log=lambda msg: click.echo(msg, err=True),
    )


@main.command()
@click.argument("run", type=click.Path())
@_analysis_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def analyze(run, samples, length, temperatures, text_path, seed, which, threads, as_json) -> None:
    """Compare what RUN generates (or --text) with its training text: copies, novelty, structure."""
    from charlstm.analysis.report import format_table

    analysis = _run_analysis(run, samples, length, temperatures, text_path, seed, which, threads)
    if as_json:
        click.echo(json.dumps(analysis, ensure_ascii=False))
    else:
        click.echo(format_table(analysis))


@main.command()
@click.argument("run", type=click.Path())
@_analysis_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder for report.html, report.md and report/ (default: the run folder).",
)
def report(run, samples, length, temperatures, text_path, seed, which, threads, out) -> None:
    """Write RUN's report: report.html (self-contained), report.md and the plots in report/."""
    from charlstm.analysis.report import report_folder, write_report

    folder = report_folder(run, out)
    analysis = _run_analysis(run, samples, length, temperatures, text_path, seed, which, threads)
    paths = write_report(analysis, folder)
    click.echo(f"wrote {paths['html']} and {paths['md']}")


# ---------------------------------------------------------------------------------------- tune


def _base_config(config_path: str | None, fields: dict[str, Any]) -> tuple[RunConfig, set[str]]:
    """The preset (or defaults) with the given flags applied, and the names the user set."""
    overrides = {k: v for k, v in fields.items() if v is not None}
    if overrides.get("text"):
        overrides.setdefault("dataset", None)
    config = load_toml(config_path) if config_path else RunConfig()
    return config.replace(**overrides), set(overrides)


@main.command()
@click.option("--study", required=True, help="Study name; the same name resumes it.")
@click.option(
    "--trials",
    default=20,
    show_default=True,
    type=int,
    help="Finished trials the study should hold (a resumed study runs only the rest).",
)
@click.option(
    "--budget-per-trial", default="60s", show_default=True, help="Training time per trial: 60s, 2m."
)
@click.option(
    "--storage", help="SQLite file of the study (default runs/tune/STUDY.db) or a database URL."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder of the trials' runs, table and plots (default runs/tune/STUDY).",
)
@click.option(
    "--preset",
    type=click.Path(dir_okay=False),
    help="Write the best configuration here as TOML (default OUT/best.toml).",
)
@click.option(
    "--pruner",
    type=click.Choice(["median", "hyperband", "none"]),
    default="median",
    show_default=True,
)
@click.option(
    "--sampler-seed", default=0, show_default=True, type=int, help="Seed of the TPE sampler."
)
@click.option("--top", type=int, help="Rows of the results table to print (default all).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--no-progress", is_flag=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Base preset; the search replaces the searched fields.",
)
@_config_options
def tune(
    study,
    trials,
    budget_per_trial,
    storage,
    out,
    preset,
    pruner,
    sampler_seed,
    top,
    no_plots,
    no_progress,
    config_path,
    **fields,
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning on validation loss, resumable SQLite study).

    Searched: cell, layers, hidden and embedding sizes, dropouts, lr, schedule, ema, batch and
    window sizes; a flag for one of them (e.g. --cell lstm) fixes it instead. Other flags
    (--dataset, --eval-interval, ...) set what every trial shares; trials use 1 thread unless
    --threads says otherwise. The first trial of a new study is the base configuration (--config
    and flags). Prints the results table and writes the best configuration as a TOML preset, the
    table, a JSON file and plots.
    """
    from charlstm.config import parse_duration, toml_keys
    from charlstm.experiments import tuning

    threads = fields.pop("threads") or 1
    preset_defaults = {}
    if fields.get("eval_interval") is None and "eval_interval" not in toml_keys(config_path):
        fields["eval_interval"] = 20  # a trial lasts seconds: evaluate often enough to prune
    if fields.get("sample_every") is None:
        fields["sample_every"] = 0  # nobody reads a trial's samples (the preset keeps the default)
        preset_defaults["sample_every"] = RunConfig().train.sample_every
    base, given = _base_config(config_path, fields)
    space = {k: v for k, v in tuning.SPACE.items() if k not in given}
    result = tuning.tune(
        base,
        study_name=study,
        trials=trials,
        budget=parse_duration(budget_per_trial),
        storage=storage,
        out_dir=out,
        preset=preset,
        pruner=pruner,
        sampler_seed=sampler_seed,
        threads=threads,
        plots=not no_plots,
        progress=not no_progress,
        space=space,
        preset_defaults=preset_defaults,
    )
    click.echo(result.table if not top else "\n".join(result.table.splitlines()[: top + 2]))
    if result.best_config is not None:
        best = result.study.best_trial
        click.echo(
            f"\nbest: trial {best.number}, {best.value:.4f} nats/char; "
            f"preset {result.files['preset']}"
        )
    click.echo("files: " + ", ".join(str(p) for k, p in result.files.items() if k != "preset"))


# ---------------------------------------------------------------------------------------- compare


def _int_list(flag: str, value: str | None) -> list[int]:
    """Positive whole numbers from "10,30,60" (none from an empty value)."""
    try:
        items = [int(v) for v in (value or "").split(",") if v.strip()]
    except ValueError:
        items = [0]
    if any(i < 1 for i in items):
        raise UserError(f"{flag} takes positive whole numbers separated by commas, got {value!r}")
    return items


@main.command()
@click.option("--cells", default="lstm,gru,rnn", show_default=True, help="Comma-separated cells.")
@click.option(
    "--budget", default="120s", show_default=True, help="Training time per run: 120s, 2m."
)
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=int,
    help="Runs per cell (seeds SEED, SEED+1, ...).",
)
@click.option(
    "--jobs", default=1, show_default=True, type=int, help="Runs trained at once (processes)."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder of the runs and results (default runs/compare/DATASET).",
)
@click.option("--no-probe", is_flag=True, help="Skip the long-range probe.")
@click.option("--copy-delays", help="Also run the copy task at these delays, e.g. 10,30,60.")
@click.option(
    "--copy-budget", default="20s", show_default=True, help="Training time per cell and delay."
)
@click.option(
    "--fresh", is_flag=True, help="Train every run again, even those a previous call finished."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Base preset; its LSTM sets the parameter count every cell matches.",
)
@_config_options
def compare(
    cells,
    budget,
    seeds,
    jobs,
    out,
    no_probe,
    copy_delays,
    copy_budget,
    fresh,
    config_path,
    **fields,
) -> None:
    """LSTM vs GRU vs RNN at equal parameters and equal time, over seeds, with a long-range probe.

    Prints a markdown table (mean ± std of the best validation loss) and writes comparison.json,
    comparison.md and curves.png (validation loss against time). Runs use 1 thread unless --threads
    says otherwise.
    """
    from charlstm.config import parse_duration
    from charlstm.experiments.comparison import compare as run_compare
    from charlstm.experiments.comparison import markdown

    if fields.get("threads") is None:
        fields["threads"] = 1
    if fields.get("sample_every") is None:
        fields["sample_every"] = 0
    base, given = _base_config(config_path, fields)
    fixed = sorted(given & {"cell", "max_time"})
    if fixed:
        raise UserError(
            f"{', '.join('--' + k.replace('_', '-') for k in fixed)} cannot be "
            "combined with compare: use --cells and --budget"
        )
    name = Path(base.data.text).stem if base.data.text else base.data.dataset
    result = run_compare(
        base,
        cells=[c.strip() for c in cells.split(",") if c.strip()],
        seeds=seeds,
        budget=parse_duration(budget),
        out_dir=out or Path("runs/compare") / str(name),
        jobs=jobs,
        probe=not no_probe,
        reuse=not fresh,
        copy_delays=_int_list("--copy-delays", copy_delays),
        copy_budget=parse_duration(copy_budget),
    )
    click.echo(markdown(result))
    click.echo("\nfiles: " + ", ".join(str(p) for p in result.files.values()))
