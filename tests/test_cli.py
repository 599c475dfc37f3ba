"""The CLI as a user meets it: end to end on a tiny corpus, every bad input as one line and exit 2,
and the help and docs/cli.md generated from the commands."""

import importlib.util
import json
from pathlib import Path

import click
import pytest

from charlstm.cli import ConfigOption, main
from charlstm.config import field_specs
from tests.helpers import invoke, one_line_error, tiny_flags

ROOT = Path(__file__).resolve().parents[1]

# The tiny model's flags (tests/helpers.py), without a step budget: each test gives its own.
TINY = [*tiny_flags(max_steps=None), "--no-progress"]
run = invoke


@pytest.fixture
def trained(corpus, tmp_path):
    out = tmp_path / "run"
    result = run("train", "--text", corpus, "--out", out, "--max-steps", 10, *TINY)
    assert result.exit_code == 0, result.output
    return out


def test_train_generate_evaluate_end_to_end(trained, corpus, tmp_path):
    """Train → generate (to stdout and to a file) → evaluate --json, on a corpus the test wrote."""
    result = run(
        "generate",
        trained,
        "--start-text",
        "Ты ",
        "--length",
        40,
        "--num-samples",
        2,
        "--seed",
        7,
        "--temperature",
        0.5,
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Ты ")
    again = run(
        "generate",
        trained,
        "--start-text",
        "Ты ",
        "--length",
        40,
        "--num-samples",
        2,
        "--seed",
        7,
        "--temperature",
        0.5,
    )
    assert again.output == result.output
    out_file = tmp_path / "samples.txt"
    assert run("generate", trained, "--length", 30, "--out", out_file).exit_code == 0
    assert out_file.read_text(encoding="utf-8").startswith(" ")
    held_out = tmp_path / "held.txt"
    held_out.write_text(corpus.read_text(encoding="utf-8")[:300], encoding="utf-8")
    ev = run("evaluate", trained, "--text", held_out, "--json")
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(ev.output)
    assert {"loss", "bits_per_char", "perplexity"} <= set(metrics) and metrics["loss"] > 0
    assert run("evaluate", trained).exit_code == 0  # default: the run's own validation split


def test_config_file_and_flags_override(corpus, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[model]\nhidden_size = 12\n[train]\nmax_steps = 5\n", encoding="utf-8")
    out = tmp_path / "run"
    result = run(
        "train",
        "--config",
        preset,
        "--text",
        corpus,
        "--out",
        out,
        "--max-steps",
        6,
        *tiny_flags(max_steps=None, hidden_size=None),
    )
    assert result.exit_code == 0, result.output
    cfg = (out / "config.toml").read_text(encoding="utf-8")
    assert "hidden_size = 12" in cfg and "max_steps = 6" in cfg


def test_resume_continues(trained):
    result = run("train", "--resume", trained, "--max-steps", 15, "--no-progress")
    assert result.exit_code == 0, result.output
    from charlstm.runs.checkpoint import read_checkpoint
    from charlstm.runs.folder import checkpoint_path

    assert read_checkpoint(checkpoint_path(trained, "last")).meta["step"] == 15


def test_datasets_lists_named_corpora():
    """The single texts, then the collections the base corpora are built from (each with its
    address, sha256, size and licence), then the base corpora."""
    result = run("datasets", "--json")
    rows = json.loads(result.output)
    names = [r["name"] for r in rows]
    assert names == [
        "byron-ru",
        "onegin-ru",
        "tinyshakespeare",
        "gutenberg-en",
        "ruslit",
        "base-ru",
        "base-ru-verse",
        "base-en",
    ]
    for row in rows[3:5]:
        assert row["url"].startswith("https://github.com/") and len(row["sha256"]) == 64
        assert row["size"] > 10_000_000 and "public domain" in row["licence"]


# -- bad input: one line naming the problem and the fix, exit code 2, nothing damaged --------------


def test_missing_file(tmp_path):
    one_line_error(
        run("train", "--text", tmp_path / "nope.txt", "--out", tmp_path / "r", *TINY),
        "does not exist",
    )


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    one_line_error(run("train", "--text", p, "--out", tmp_path / "r", *TINY), "empty")


def test_binary_file(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(bytes(range(256)) * 20)
    one_line_error(run("train", "--text", p, "--out", tmp_path / "r", *TINY), "--encoding")


def test_non_utf8_file_names_the_offset(tmp_path):
    p = tmp_path / "cp1251.txt"
    p.write_bytes("Мой дядя самых честных правил".encode("cp1251") * 100)
    one_line_error(
        run("train", "--text", p, "--out", tmp_path / "r", *TINY), "byte offset 0", "--encoding"
    )


def test_other_encoding_is_accepted(tmp_path):
    p = tmp_path / "cp1251.txt"
    p.write_bytes(
        ("Мой дядя самых честных правил,\nКогда не в шутку занемог\n" * 40).encode("cp1251")
    )
    result = run(
        "train",
        "--text",
        p,
        "--encoding",
        "cp1251",
        "--out",
        tmp_path / "r",
        "--max-steps",
        2,
        *TINY,
    )
    assert result.exit_code == 0, result.output


def test_corpus_shorter_than_a_window(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny text\n" * 5, encoding="utf-8")
    one_line_error(
        run("train", "--text", p, "--out", tmp_path / "r", *TINY), "needs at least", "--seq-len"
    )


def test_out_holding_another_run_is_refused(trained, corpus):
    before = (trained / "last" / "checkpoint.safetensors").read_bytes()
    one_line_error(run("train", "--text", corpus, "--out", trained, *TINY), "--resume", "--force")
    assert (trained / "last" / "checkpoint.safetensors").read_bytes() == before
    assert (
        run(
            "train", "--text", corpus, "--out", trained, "--force", "--max-steps", 2, *TINY
        ).exit_code
        == 0
    )


def test_unknown_config_key(tmp_path, corpus):
    preset = tmp_path / "bad.toml"
    preset.write_text("hiden_size = 3\n", encoding="utf-8")
    one_line_error(
        run("train", "--config", preset, "--text", corpus, "--out", tmp_path / "r"),
        "hiden_size",
        "hidden_size",
    )


def test_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    one_line_error(run("generate", tmp_path / "notarun"), "not a charlstm run")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "nan"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--length", "0"], "length"),
        (["--start-text", "☃"], "--unknown skip"),
    ],
)
def test_bad_generation_options(trained, args, needle):
    one_line_error(run("generate", trained, *args), needle)


def test_unknown_start_text_skip(trained):
    result = run("generate", trained, "--start-text", "Ты☃ ", "--unknown", "skip", "--length", 5)
    assert result.exit_code == 0 and result.stdout.startswith("Ты ")
    assert "charlstm: warning: dropping" in result.stderr


# -- help, choices and derived defaults -------------------------------------------------------


def _all_commands(group=main, prefix="charlstm"):
    for name, command in group.commands.items():
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from _all_commands(command, f"{prefix} {name}")


def test_every_option_has_one_line_of_help():
    """Every option of every command says what it does; config flags say it with their field's
    description, and fixed choices are choices, not free text."""
    specs = field_specs()
    for full, command in _all_commands():
        assert command.help, full
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and "\n" not in param.help, (full, param.name)
            if param.name in specs and isinstance(param, ConfigOption):
                spec = specs[param.name]
                assert param.help == spec.description
                if spec.choices:
                    assert isinstance(param.type, click.Choice)
                    assert tuple(param.type.choices) == spec.choices


def test_a_fixed_choice_is_checked_by_the_cli():
    result = run("train", "--cell", "transformer")
    assert result.exit_code == 2
    assert "'transformer' is not one of 'lstm', 'gru', 'rnn'" in result.output


def test_a_budget_takes_a_unit_as_the_readme_writes_it(corpus, tmp_path):
    """`--max-time 10m` (the README's quick start) is ten minutes; a bad unit is a usage error."""
    out = tmp_path / "run"
    result = run("train", "--text", corpus, "--out", out, *tiny_flags(), "--max-time", "1m30s")
    assert result.exit_code == 0, result.output
    assert "max_time = 90.0" in (out / "config.toml").read_text(encoding="utf-8")
    bad = run("train", "--text", corpus, "--max-time", "10x")
    assert bad.exit_code == 2
    assert "a duration looks like 90, 60s, 2m or 1h, got '10x'" in bad.output


def test_train_help_shows_descriptions_and_defaults():
    result = run("train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # as one line, whatever the terminal's width
    assert "--cell [lstm|gru|rnn]" in text and field_specs()["cell"].description in text
    assert "[default: byron-ru]" in text and "[default: 1337]" in text


def test_docs_cli_md_is_what_the_commands_say():
    """docs/cli.md is generated from the commands (python tools/cli_md.py) and must not drift."""
    spec = importlib.util.spec_from_file_location("cli_md", ROOT / "tools" / "cli_md.py")
    cli_md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_md)
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == cli_md.render(), (
        "docs/cli.md is out of date: run python tools/cli_md.py"
    )


@pytest.mark.slow
def test_compare_names_its_folder_and_table_after_the_prepared_corpus(
    corpus, tmp_path, monkeypatch
):
    """`compare --prepared DIR` trains on DIR and names the default output folder and the table
    after it, as `train --prepared` does (it used to say byron-ru, the default dataset)."""
    from charlstm.data import prepared

    prepared.prepare(corpus, tmp_path / "verses", progress=False)
    monkeypatch.chdir(tmp_path)
    result = run(
        "compare",
        "--prepared",
        tmp_path / "verses",
        "--cells",
        "lstm",
        "--seeds",
        1,
        "--budget",
        "10s",
        "--max-steps",
        2,
        "--no-probe",
        *tiny_flags(max_steps=None, eval_interval=None),
        "--eval-interval",
        1,
    )
    assert result.exit_code == 0, result.output
    assert "**verses**" in result.output and "byron-ru" not in result.output
    assert (tmp_path / "runs" / "compare" / "verses" / "comparison.json").is_file()
    assert not (tmp_path / "runs" / "compare" / "byron-ru").exists()
