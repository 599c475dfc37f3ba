"""The `charlstm` command: a thin layer that parses options and calls library functions.

The configuration flags of `charlstm train`, `tune` and `compare` are generated from the
configuration dataclasses (`config.field_specs`): a new field is a new flag, its help is the field's
description and a fixed choice is a `click.Choice`, with no second list to keep in sync. Derived
defaults (the output folder, the dataset label) come from the library so that every command agrees.
Errors meant for the user (`UserError`) are printed as one line on stderr with exit status 2; Ctrl-C
during training exits 130 (SIGTERM 143) after saving. docs/cli.md is generated from these commands
(`python tools/cli_md.py`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from charlstm.config import (
    DEVICES,
    RunConfig,
    cli_overrides,
    default_run_folder,
    field_specs,
    load_toml,
    toml_keys,
)
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


NOT_FLAGS = ("vocab_size", "base_sha256")  # filled when training starts, not settings
REPEATABLE = ("text",)  # flags given many times: their values form a list
METAVARS = {
    "dataset": "NAME",
    "text": "FILE|DIR|GLOB",
    "prepared": "DIR",
    "init_from": "RUN",
    "pretrain": "NAME|FILE",
    "pretrain_config": "FILE",
    "tensorboard": "DIR",
}


DURATIONS = ("max_time", "pretrain_time")  # budgets: 90, 60s, 10m, 1.5h or 1m30s


class Duration(click.ParamType):
    """Seconds, given as a number or with a unit (`config.parse_duration`): `--max-time 10m`."""

    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        from charlstm.config import parse_duration

        try:
            return parse_duration(value)
        except UserError as exc:
            self.fail(str(exc), param, ctx)


class ConfigOption(click.Option):
    """A flag that overrides one configuration field (`section` is its TOML table). Its value is
    None unless given, so that a preset's value stays; the help shows `shown_default` instead."""

    def __init__(self, *args: Any, section: str, shown_default: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section
        self.shown_default = shown_default

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if self.shown_default:
            extra["default"] = self.shown_default
        return extra


def _shown(name: str, value: Any) -> str:
    """A field's default as the help shows it (a flag's name for a boolean, as click does)."""
    if value is None:
        return ""  # no default: the description says what happens without the flag
    if isinstance(value, bool):
        return ("" if value else "no-") + name.replace("_", "-")
    return str(value)


def _config_options(**command_defaults: Any):
    """Add one --flag per configuration field. Its default is None (keep the preset's value); the
    help shows the field's default, or `command_defaults`' where the command sets its own."""

    def decorate(func):
        for spec in reversed(list(field_specs().values())):
            if spec.name in NOT_FLAGS:
                continue
            flag = "--" + spec.name.replace("_", "-")
            common = {
                "cls": ConfigOption,
                "section": spec.section,
                "shown_default": _shown(spec.name, command_defaults.get(spec.name, spec.default)),
                "default": None,
                "help": spec.description,
            }
            if spec.kind is bool:
                decls = [f"{flag}/--no-{spec.name.replace('_', '-')}", spec.name]
                func = click.option(*decls, **common)(func)
            elif spec.name in REPEATABLE:  # not given: None, not (), so a preset's value stays
                func = click.option(
                    flag,
                    spec.name,
                    type=str,
                    metavar=METAVARS.get(spec.name),
                    multiple=True,
                    callback=lambda ctx, param, value: value or None,
                    **common,
                )(func)
            else:
                kind = click.Choice(spec.choices) if spec.choices else spec.kind
                if spec.name in DURATIONS:
                    kind = Duration()
                metavar = METAVARS.get(spec.name)
                func = click.option(flag, spec.name, type=kind, metavar=metavar, **common)(func)
        return func

    return decorate


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
        if param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
            continue
        args += [param.opts[0], repr(value) if isinstance(value, float) else str(value)]
    return args


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML preset (e.g. configs/byron.toml) to start from; flags override its keys.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder to write (default runs/<the text's name>); give one per experiment.",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue the run in this folder from its last checkpoint (after Ctrl-C or a crash).",
)
@click.option(
    "--force", is_flag=True, help="Replace a run already in --out instead of refusing to."
)
@click.option(
    "--no-progress", is_flag=True, help="No progress bar, log lines only (for logs and CI)."
)
@click.option(
    "--nproc",
    type=int,
    help="Train as N processes under torchrun (one per GPU on CUDA), splitting --batch-size.",
)
@_config_options()
def train(config_path, out, resume_dir, force, no_progress, nproc, **fields) -> None:
    """Train a model on --dataset NAME, --text FILE or --prepared DIR and write a run folder.

    Every configuration flag is also a key of a TOML preset (--hidden-size is hidden_size, in the
    [data], [model], [optim] or [train] table); flags override the preset.
    """
    from charlstm.training.orchestrate import resume_config
    from charlstm.training.orchestrate import train as train_run

    if nproc is not None and nproc != 1:
        from charlstm.training.distributed import launch

        sys.exit(launch(nproc, _command_args(click.get_current_context(), skip=("nproc",))))
    overrides = cli_overrides(fields)
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
        from charlstm.training.transfer import adopt_architecture, read_source

        # A fine-tuned model has the pre-trained one's shape; a shape the user asked for must agree.
        config = adopt_architecture(
            config, read_source(config.train.init_from), set(overrides) | toml_keys(config_path)
        )
    if out is None:
        out = str(default_run_folder(config))
    given = set(overrides) | toml_keys(config_path)
    if config_path and "auto" not in given:
        # A preset is a whole recipe, tuned on the fixed defaults for the keys it leaves out: it
        # trains as it did when it was made, unless it (or --auto on) asks for the choice.
        config = config.replace(auto="off")
    train_run(config, out, force=force, progress=not no_progress, explicit=given)


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


def _read_start_file(path: str, encoding: str) -> str:
    """The text of --start-file, as written (a final newline included: the samples then start on
    a new line). Missing, a folder, unreadable, empty or mis-encoded is a UserError; characters
    the model never saw are refused (or skipped) later, as in a --start-text."""
    from charlstm.data.corpus import decode_text, read_file_bytes

    data = read_file_bytes(path, "start file", "--start-file")
    return decode_text(data, encoding, source=f"start file {path!r}")


@main.command()
@click.argument("run", type=click.Path())
@click.option(
    "--start-text",
    default=" ",
    show_default=True,
    help="Text the samples continue (a title, a first line); it starts each sample.",
)
@click.option(
    "--start-file",
    type=click.Path(),
    help="Read the start text from this file instead (a long prompt, char-rnn's -primetext).",
)
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    help="Codec of the --start-file (any Python codec); e.g. cp1251.",
)
@click.option(
    "--length", default=200, show_default=True, type=int, help="Characters to generate per sample."
)
@click.option(
    "--temperature",
    default=0.3,
    show_default=True,
    type=float,
    help="Randomness: 0 is greedy, 0.3-0.5 stays close to the text, 1 and above wanders.",
)
@click.option(
    "--temperatures",
    help="Comma-separated temperatures: one sample per value, side by side, to compare them.",
)
@click.option(
    "--top-k", type=int, help="Draw only from the k most likely characters; cuts rare misspellings."
)
@click.option(
    "--top-p",
    type=float,
    help="Nucleus sampling: draw from the likeliest characters holding this much probability.",
)
@click.option(
    "--repetition-penalty",
    default=1.0,
    show_default=True,
    type=float,
    help="Divide the odds of recently seen characters by this; raise it (1.2) if samples loop.",
)
@click.option(
    "--num-samples",
    default=1,
    show_default=True,
    type=int,
    help="Independent samples to generate (seeds SEED, SEED+1, ...).",
)
@click.option("--seed", type=int, help="Seed for reproducible samples (default: a fresh draw).")
@click.option("--stop", multiple=True, help="Stop a sample at this string (repeatable).")
@click.option("--max-lines", type=int, help="Stop a sample after this many lines.")
@click.option(
    "--max-stanzas", type=int, help="Stop a sample after this many blank-line-separated stanzas."
)
@click.option(
    "--unknown",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="What to do with start-text characters the model never saw: refuse, or drop them.",
)
@click.option("--stream", is_flag=True, help="Print the text as it is produced.")
@click.option(
    "--which",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Checkpoint: the best on validation, or the weights training ended with.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where to generate: auto takes a CUDA GPU when there is one.",
)
@click.option(
    "--engine",
    type=click.Choice(["charlstm", "onnx"]),
    default="charlstm",
    show_default=True,
    help="charlstm: PyTorch and the compiled kernels. onnx: ONNX Runtime on the CPU, from a folder "
    "of `charlstm export --format onnx` (or a graph built in memory from a run folder).",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the samples to this file.")
@click.pass_context
def generate(
    ctx,
    run,
    start_text,
    start_file,
    encoding,
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
    engine,
    out,
) -> None:
    """Generate text from a trained RUN folder (or, with --engine onnx, an ONNX export folder)."""
    if start_file is not None:
        if ctx.get_parameter_source("start_text") is not click.core.ParameterSource.DEFAULT:
            raise UserError("give --start-text or --start-file, not both")
        start_text = _read_start_file(start_file, encoding)
    if engine == "onnx":
        from charlstm.export.onnx import load_onnx

        if device == "cuda":
            raise UserError(
                "--engine onnx runs on the CPU (ONNX Runtime's CPU provider); drop --device cuda "
                "or use --engine charlstm"
            )
        model = load_onnx(run, which=which)
    else:
        from charlstm.api import load

        if (Path(run) / "model.onnx").is_file():
            raise UserError(
                f"{run!r} is an ONNX export (charlstm export --format onnx), not a run folder; "
                "generate from it with --engine onnx"
            )
        model = load(run, which=which, device=device)
    extra = {
        "repetition_penalty": repetition_penalty,
        "stop": stop,
        "max_lines": max_lines,
        "max_stanzas": max_stanzas,
        "unknown": unknown,
    }
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
@click.option(
    "--text",
    "text_path",
    multiple=True,
    metavar="FILE|DIR|GLOB",
    help="Evaluate on this text instead: a file, a folder (every file under it) or a quoted glob; "
    "repeatable. Each file is one document, as in training.",
)
@click.option("--dataset", help="Evaluate on the validation split of this named dataset.")
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    help="Codec of the --text file (any Python codec); e.g. cp1251.",
)
@click.option(
    "--unknown",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="What to do with characters the model never saw: refuse, or leave them out.",
)
@click.option(
    "--which",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Checkpoint: the best on validation, or the weights training ended with.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def evaluate(run, text_path, dataset, encoding, unknown, which, as_json) -> None:
    """Loss (nats/char), bits/char and perplexity of RUN on a text (default: its validation
    split, and its test split if it holds one out)."""
    from charlstm.api import load
    from charlstm.config import from_dict
    from charlstm.data.corpus import load_corpus, load_documents, split_points
    from charlstm.data.loading import documents

    model = load(run, which=which)
    cfg = from_dict(model.meta["config"])
    splits = {}
    if text_path:
        corpus = load_documents(None, text_path, encoding)
        texts = documents(corpus.text, corpus.starts)
        result = {"source": corpus.source, **model.evaluate(texts, unknown=unknown)}
    elif dataset:  # cut where a run of this config would cut it
        full, source = load_corpus(dataset, None)
        begin, end = split_points(len(full), cfg.data.val_fraction, cfg.data.test_fraction)
        figures = model.evaluate(full[begin:end], unknown=unknown)
        result = {"source": f"{source} (validation split)", **figures}
    else:  # the run's own held-out splits, cut by the data layer exactly as training cut them
        from charlstm.model.evaluation import split_metrics

        for split in ("validation", "test") if cfg.data.test_fraction else ("validation",):
            splits[split] = split_metrics(
                model.model, cfg, split, model.vocab, device=model.device, unknown=unknown
            )
        result = {**splits["validation"]}
        if "test" in splits:
            result["test"] = splits["test"]
    if as_json:
        click.echo(json.dumps(result))
        return
    for figures in splits.values() or [result]:
        click.echo(
            f"{figures['source']}: {figures['loss']:.4f} nats/char, "
            f"{figures['bits_per_char']:.4f} bits/char, perplexity {figures['perplexity']:.3f} "
            f"over {figures['characters']:,} characters"
        )


# ---------------------------------------------------------------------------------------- export


@main.command()
@click.argument("run", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "web", "base"]),
    required=True,
    help="onnx: one step of the model as an ONNX graph (model.onnx) with its vocabulary and "
    "sampling defaults (model.json). web: a static page that generates in the browser. base: a "
    "run trained on a base corpus as a base model to ship (fp16 weights and a model card).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write the export to."
)
@click.option(
    "--which",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Checkpoint: the best on validation, or the weights training ended with.",
)
@click.option("--force", is_flag=True, help="Replace an earlier export of this format in --out.")
@click.option("--name", help="With --format base: the base's name (default: its language).")
def export(run, fmt, out, which, force, name) -> None:
    """Export RUN to run without charlstm: an ONNX graph, or a web page; or as a base model.

    --format onnx writes one step of the model (model.onnx) for ONNX Runtime and other ONNX tools,
    with its vocabulary in model.json; generate from it with `charlstm generate OUT --engine onnx`
    or examples/onnx_generate.py. --format web writes a static page that generates in the browser,
    with no server and no network. --format base writes base.safetensors and card.md (a run
    trained with configs/base-LANG.toml), for src/charlstm/bases/NAME/."""
    if fmt == "base":
        from charlstm.export.base import export_base

        result = export_base(run, out, name=name, which=which, force=force)
        click.echo(
            f"wrote {result['path']} ({result['size']:,} bytes, sha256 {result['sha256']}) and "
            f"its card; pin both in charlstm/runs/bases.py"
        )
    elif fmt == "onnx":
        from charlstm.export.onnx import export_onnx

        result = export_onnx(run, out, which=which, force=force)
        click.echo(
            f"wrote {result['onnx']} and {result['json']} (largest logit difference from PyTorch "
            f"over {result['check_steps']} steps: {result['max_abs_diff']:.1e})"
        )
    else:
        from charlstm.export.web import export_web

        paths = export_web(run, out, which=which, force=force)
        click.echo(f"wrote {len(paths)} files to {out}; open {Path(out) / 'index.html'}")


# ---------------------------------------------------------------------------------------- datasets


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (for scripts).")
def datasets(as_json) -> None:
    """List the named corpora and whether a verified local copy exists: the single texts, the
    collections the base corpora are built from (address, sha256, size, licence) and the base
    corpora themselves."""
    from charlstm.data import basecorpus
    from charlstm.data import datasets as ds

    rows = ds.status() + basecorpus.status()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for row in rows:
        state = row["local"] or "not cached (downloaded on first use)"
        click.echo(f"{row['name']:<16} {row['description']}\n{'':<16} {state}")
        for key in ("url", "sha256", "size", "licence"):
            if row.get(key) and row.get("kind") == "collection":
                value = f"{row[key]:,} bytes" if key == "size" else row[key]
                click.echo(f"{'':<16} {key}: {value}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (for scripts).")
def bases(as_json) -> None:
    """List the base models shipped in the package: language, corpus, validation loss, and
    whether the file is intact (`charlstm train --base NAME`; the default, --base auto, decides)."""
    from charlstm.runs import bases as shipped

    rows = shipped.status()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for row in rows:
        click.echo(f"{row['name']:<6} {row['description']}\n{'':<6} {row['state']}")


# ---------------------------------------------------------------------------------------- serve


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 exposes the server to the network).",
)
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port to listen on.")
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
@click.option(
    "--max-connections",
    type=int,
    help="Most open connections; more are answered 503 (default: 2 × --max-concurrency + 64).",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="CHARLSTM_API_KEY",
    help="Require this key as `Authorization: Bearer KEY` on the API (repeat it, or separate "
    "keys with commas, for several). Prefer the CHARLSTM_API_KEY variable: other users of the "
    "machine can read command lines.",
)
@click.option(
    "--allowed-hosts",
    multiple=True,
    metavar="NAMES",
    help="Host names the server answers to besides localhost and IP addresses, separated by "
    "commas: name, *.domain, or * for any (DNS rebinding protection, docs/security.md).",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=int,
    help="Torch intra-op threads, for the reference path (GRU, RNN cells), whose small steps "
    "lose from more; an LSTM's compiled kernels step their rows on every core.",
)
@click.option(
    "--tick-seconds",
    type=float,
    help="About how long one engine call draws characters for every running stream; a new "
    "request joins the batch between calls. Longer ticks pay the call's fixed cost less often "
    "(throughput), shorter ones let requests join sooner (time to the first text). "
    "Default: the server's (docs/guide.md).",
)
@click.option(
    "--engine-threads",
    type=int,
    help="Engines per model, each stepping its share of the streams in a thread of its own, "
    "where the compiled kernels run (an LSTM on the CPU). Default: one per core.",
)
@click.option(
    "--chunk-seconds",
    type=float,
    help="How long a stream's text may wait to be sent after its first piece: fewer, larger "
    "events cost the server less; 0 sends every engine call's text at once. Default: the "
    "server's (docs/guide.md).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="The server's log detail; warning keeps it quiet, debug shows every request.",
)
def serve(
    runs,
    host,
    port,
    max_length,
    max_concurrency,
    max_batch,
    time_limit,
    max_connections,
    api_keys,
    allowed_hosts,
    threads,
    tick_seconds,
    engine_threads,
    chunk_seconds,
    log_level,
) -> None:
    """Serve RUNS over HTTP: a JSON and streaming API, its docs at /docs, and a page at /.

    It listens on 127.0.0.1 and answers to localhost names only; docs/security.md says how to
    expose it (API keys, --allowed-hosts, a reverse proxy for TLS)."""
    from charlstm.serve import app as server
    from charlstm.serve.security import split_list

    config = server.ServerConfig(
        max_length=max_length,
        max_concurrency=max_concurrency,
        max_batch=max_batch,
        time_limit=time_limit,
        max_connections=max_connections,
        api_keys=tuple(split_list(api_keys)),
        allowed_hosts=tuple(split_list(allowed_hosts)),
        **{
            name: value
            for name, value in (
                ("tick_seconds", tick_seconds),
                ("engine_threads", engine_threads),
                ("chunk_seconds", chunk_seconds),
            )
            if value is not None
        },
    )
    server.serve(runs, host=host, port=port, config=config, threads=threads, log_level=log_level)


# ---------------------------------------------------------------------------------------- bench


@main.group()
def bench() -> None:
    """Measure speed against the lab's code, in one run on this machine."""


@bench.command("generate")
@click.argument("run", required=False, type=click.Path())
@click.option(
    "--temperature",
    default=0.5,
    show_default=True,
    type=float,
    help="Sampling temperature of the timed generation.",
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=int,
    help="Best of this many runs; raise it on a busy machine.",
)
@click.option(
    "--big/--no-big",
    default=True,
    show_default=True,
    help="Also time a 1 × 512 model against its memory-bandwidth bound.",
)
@click.option("--threads", type=int, help="Torch threads (default: PyTorch's, one per core).")
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
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML preset to measure (default: the default configuration).",
)
@click.option("--dataset", help="Named dataset to train on (overrides the preset's).")
@click.option("--budget", type=float, required=True, help="Seconds of training to measure.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Keep the run folder here (default: a temporary folder).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config field, e.g. --set precision=fp32 (repeatable).",
)
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
    "--text",
    "text_path",
    multiple=True,
    metavar="FILE|DIR|GLOB",
    help="The text to prepare: a file, a folder (every file under it) or a quoted glob such as "
    "'src/**/*.c'; repeatable. Each file is one document.",
)
@click.option("--dataset", help="A named corpus to prepare instead (see `charlstm datasets`).")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write ids.bin, vocab.json and meta.json to.",
)
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    help="Codec of the --text file (any Python codec); e.g. cp1251.",
)
@click.option(
    "--val-fraction",
    default=0.1,
    show_default=True,
    type=float,
    help="Recorded in meta.json; training cuts by its own --val-fraction.",
)
@click.option(
    "--skip-bad-files",
    is_flag=True,
    help="Leave out files of a folder or glob that are binary or not valid --encoding (counted), "
    "instead of stopping at the first.",
)
@click.option("--force", is_flag=True, help="Replace a prepared corpus already in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs and CI).")
def prepare(
    text_path, dataset, out, encoding, val_fraction, skip_bad_files, force, no_progress
) -> None:
    """Encode a corpus larger than memory once; then train on it with --prepared OUT."""
    from charlstm.data import datasets as ds
    from charlstm.data.prepared import describe
    from charlstm.data.prepared import prepare as prepare_corpus

    if bool(text_path) == bool(dataset):
        raise UserError("give exactly one of --text FILE or --dataset NAME")
    text_path = list(text_path)
    source = None
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
        skip_bad_files=skip_bad_files,
    )
    click.echo(describe(result), err=True)


# ------------------------------------------------------------------------------- analyze, report


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
    """Compare what RUN generates (or --text) with its training text: copies, real words, shape.

    Copies and novelty against the training text, the share of real words of its language, and
    the verse structure; for a run that started from a base model, the copies of the corpus the
    base learned from too, when that corpus is built on this machine.
    """
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
    overrides = cli_overrides(fields)
    config = load_toml(config_path) if config_path else RunConfig()
    return config.replace(**overrides), set(overrides)


@main.command()
@click.option(
    "--study", required=True, help="Study name; the same name resumes it after a stop or a crash."
)
@click.option(
    "--trials",
    default=20,
    show_default=True,
    type=int,
    help="Finished trials the study should hold (a resumed study runs only the rest).",
)
@click.option(
    "--budget-per-trial",
    default="60s",
    show_default=True,
    help="Training time per trial (60s, 2m); longer trials rank settings more reliably.",
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
    help="How trials behind the others are stopped early; none trains every trial to its budget.",
)
@click.option(
    "--sampler-seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the TPE sampler; change it for another search path.",
)
@click.option("--top", type=int, help="Rows of the results table to print (default all).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots (faster on a slow machine).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs and CI).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Base preset; the search replaces the searched fields.",
)
@_config_options(eval_interval=20, sample_every=0, threads=1)
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
    from charlstm.config import parse_duration
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
@click.option(
    "--cells",
    default="lstm,gru,rnn",
    show_default=True,
    help="Comma-separated cells to compare (of lstm, gru, rnn).",
)
@click.option(
    "--budget",
    default="120s",
    show_default=True,
    help="Training time per run (120s, 2m); every cell gets the same.",
)
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=int,
    help="Runs per cell (seeds SEED, SEED+1, ...).",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=int,
    help="Runs trained at once (processes); up to the number of cores.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder of the runs and results (default runs/compare/<the text's name>).",
)
@click.option(
    "--no-probe", is_flag=True, help="Skip the long-range probe (loss by distance into a line)."
)
@click.option("--copy-delays", help="Also run the copy task at these delays, e.g. 10,30,60.")
@click.option(
    "--copy-budget",
    default="20s",
    show_default=True,
    help="Training time per cell and delay of the copy task.",
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
@_config_options(sample_every=0, threads=1)
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
    result = run_compare(
        base,
        cells=[c.strip() for c in cells.split(",") if c.strip()],
        seeds=seeds,
        budget=parse_duration(budget),
        out_dir=out or default_run_folder(base, parent=Path("runs", "compare")),
        jobs=jobs,
        probe=not no_probe,
        reuse=not fresh,
        copy_delays=_int_list("--copy-delays", copy_delays),
        copy_budget=parse_duration(copy_budget),
    )
    click.echo(markdown(result))
    click.echo("\nfiles: " + ", ".join(str(p) for p in result.files.values()))
