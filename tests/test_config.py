"""The run configuration: types checked by pydantic, one-line errors, TOML, and derived defaults."""

from __future__ import annotations

import dataclasses
import math
import pickle
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from charlstm.config import (
    CELLS,
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    apply_cli_overrides,
    cli_overrides,
    dataset_label,
    default_run_folder,
    field_index,
    field_specs,
    from_dict,
    load_toml,
    to_toml,
)
from charlstm.errors import UserError

# The defaults every existing preset, run folder and checkpoint relies on.
DEFAULTS = {
    "data": {
        "dataset": "byron-ru",
        "text": None,
        "prepared": None,
        "encoding": "utf-8",
        "val_fraction": 0.1,
        "test_fraction": 0.0,
        "skip_bad_files": False,
        "batching": "stream",
        "batch_size": 8,
        "seq_len": 32,
    },
    "model": {
        "cell": "lstm",
        "embedding_size": 64,
        "hidden_size": 256,
        "num_layers": 2,
        "dropout": 0.5,
        "embedding_dropout": 0.2,
        "weight_drop": 0.6,
        "locked_dropout": False,
        "vocab_size": 0,
    },
    "optim": {
        "lr": 3e-3,
        "weight_decay": 0.0,
        "amsgrad": False,
        "grad_clip": 1.0,
        "schedule": "plateau",
        "plateau_factor": 0.5,
        "plateau_patience": 5,
        "warmup_steps": 0,
        "min_lr": 1e-5,
        "decay_steps": None,
        "ema": 0.999,
    },
    "train": {
        "auto": "on",
        "max_steps": None,
        "max_time": 300.0,
        "eval_interval": 50,
        "early_stopping": 10,
        "sample_every": 5,
        "sample_length": 200,
        "sample_temperature": 0.5,
        "seed": 1337,
        "device": "auto",
        "precision": "auto",
        "threads": None,
        "skip_nonfinite": 0,
        "eval_streams": 8,
        "eval_chars": 16384,
        "base": "auto",
        "base_sha256": None,
        "init_from": None,
        "freeze_layers": 0,
        "pretrain": None,
        "pretrain_time": 300.0,
        "pretrain_config": None,
        "report": False,
        "tensorboard": None,
    },
}


def _error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_field_names_and_defaults_are_unchanged():
    """Sections, field names and defaults are those of every stored run folder."""
    assert RunConfig().to_dict() == DEFAULTS


def test_every_field_has_a_one_line_description():
    """The CLI's help for each flag is the field's description: present, one line, a sentence."""
    for name, spec in field_specs().items():
        assert spec.description, name
        assert "\n" not in spec.description and spec.description.endswith("."), name
        assert spec.description == field_index()[name][1].metadata["description"]


def test_fixed_choices_are_literals():
    specs = field_specs()
    assert specs["cell"].choices == CELLS == ("lstm", "gru", "rnn")
    assert specs["batching"].choices == ("stream", "random")
    assert specs["schedule"].choices == ("plateau", "cosine", "constant")
    assert specs["precision"].choices == ("auto", "fp32", "bf16")
    assert specs["device"].choices == ("auto", "cpu", "cuda")
    assert specs["max_steps"].kind is int and specs["max_steps"].optional
    assert specs["max_time"].kind is float and specs["locked_dropout"].kind is bool


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().model.hidden_size = 3  # type: ignore[misc]


def test_ints_become_floats_where_floats_are_due():
    config = RunConfig().replace(max_time=10, lr=1, dropout=0)
    assert config.train.max_time == 10.0 and isinstance(config.train.max_time, float)
    assert isinstance(config.optim.lr, float) and isinstance(config.model.dropout, float)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"hidden_size": True}, "config key 'hidden_size' must be int, got True"),
        ({"amsgrad": 1}, "config key 'amsgrad' must be bool, got 1"),
        ({"hidden_size": 3.0}, "config key 'hidden_size' must be int, got 3.0"),
        ({"hidden_size": "64"}, "config key 'hidden_size' must be int, got '64'"),
        ({"lr": "0.01"}, "config key 'lr' must be float, got '0.01'"),
        ({"max_time": True}, "config key 'max_time' must be float, got True"),
        ({"text": 3}, "config key 'text' must be str or tuple, got 3"),
        ({"lr": math.nan}, "config key 'lr' must be a finite number, got nan"),
        ({"max_time": math.inf}, "config key 'max_time' must be a finite number, got inf"),
        ({"hidden_size": None}, "config key 'hidden_size' cannot be empty"),
        ({"cell": "transformer"}, "cell must be one of lstm, gru, rnn, got 'transformer'"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda, got 'tpu'"),
        ({"hiden_size": 3}, "unknown config key 'hiden_size' (did you mean 'hidden_size'?)"),
        ({"hidden_size": 0}, "hidden_size must be positive, got 0"),
    ],
)
def test_wrong_values_are_one_line_errors(overrides, words):
    """Bools are not ints, strings are not numbers, NaN is not a setting: one line names the key."""
    assert words in _error(lambda: RunConfig().replace(**overrides))


def test_direct_construction_is_checked_too():
    """A section built by hand (or by `dataclasses.replace`) gives the same one-line errors."""
    assert "must be int" in _error(lambda: ModelConfig(hidden_size="big"))
    assert "cell must be one of" in _error(
        lambda: dataclasses.replace(ModelConfig(), cell="transformer")
    )
    assert "did you mean 'dataset'" in _error(lambda: DataConfig(datset="x"))
    assert "hidden_size must be positive" in _error(
        lambda: RunConfig(model=ModelConfig(hidden_size=0))
    )


def test_toml_sections_and_flat_keys(tmp_path):
    sectioned = tmp_path / "a.toml"
    sectioned.write_text('[model]\nhidden_size = 12\n[optim]\nschedule = "cosine"\n')
    flat = tmp_path / "b.toml"
    flat.write_text('hidden_size = 12\nschedule = "cosine"\nmax_time = 60\n')
    a, b = load_toml(sectioned), load_toml(flat)
    assert a.model.hidden_size == b.model.hidden_size == 12
    assert a.optim.schedule == b.optim.schedule == "cosine"
    assert b.train.max_time == 60.0
    typo = tmp_path / "typo.toml"
    typo.write_text("[model]\nhiden_size = 3\n")
    assert "unknown key model.hiden_size" in _error(lambda: load_toml(typo))
    assert "did you mean 'hidden_size'" in _error(lambda: load_toml(typo))


def test_round_trips():
    """to_dict/from_dict, to_toml/load_toml and pickle give back an equal configuration."""
    config = RunConfig().replace(text="x.txt", dataset=None, max_steps=5, cell="gru", report=True)
    assert from_dict(config.to_dict()) == config
    assert pickle.loads(pickle.dumps(config)) == config


def test_to_toml_loads_back(tmp_path):
    config = RunConfig().replace(max_steps=5, threads=2, locked_dropout=True)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_toml(path) == config


def test_cli_overrides_drop_unset_flags_and_let_a_given_source_win():
    """Giving --text or --prepared clears the default dataset (and --dataset clears a preset's
    text), so that the text named on the command line is the one used."""
    assert cli_overrides({"hidden_size": None, "lr": 0.1}) == {"lr": 0.1}
    assert cli_overrides({"prepared": "p", "text": None}) == {
        "prepared": "p",
        "dataset": None,
        "text": None,
    }
    preset = RunConfig().replace(text="poems.txt", dataset=None)
    assert apply_cli_overrides(preset, {"dataset": "onegin-ru"}).data.text is None
    assert apply_cli_overrides(RunConfig(), {"text": "a.txt"}).data.dataset is None


@pytest.mark.parametrize(
    "overrides, label",
    [
        ({}, "byron-ru"),
        ({"text": "texts/poems.txt"}, "poems"),
        ({"prepared": "data/big"}, "big"),
        ({"prepared": "data/big/", "text": "poems.txt"}, "big"),
    ],
)
def test_dataset_label_and_default_run_folder(overrides, label):
    config = apply_cli_overrides(RunConfig(), overrides)
    assert dataset_label(config) == label
    assert default_run_folder(config) == Path("runs") / label
    assert default_run_folder(config, Path("runs", "compare")) == Path("runs/compare") / label


def test_a_field_of_any_type_gives_a_flag(monkeypatch):
    """A field whose type is not int/float/str/bool (here a tuple) still yields a CLI flag spec,
    parsed as text and validated by the configuration: adding one cannot break the CLI at import."""
    from pydantic import ConfigDict
    from pydantic.dataclasses import dataclass

    @dataclass(frozen=True, config=ConfigDict(strict=True))
    class Extra:
        widths: tuple[int, ...] = dataclasses.field(
            default=(1, 2), metadata={"description": "Some widths."}
        )
        mode: Literal["a", "b"] | None = dataclasses.field(
            default=None, metadata={"description": "A mode."}
        )

    monkeypatch.setitem(SECTIONS, "extra", Extra)
    field_specs.cache_clear()
    try:
        specs = field_specs()
        assert specs["widths"].kind is str and specs["widths"].choices is None
        assert specs["mode"].choices == ("a", "b") and specs["mode"].optional

        import click

        from charlstm.cli import _config_options

        command = _config_options()(click.command()(lambda **kw: None))
        names = {p.name for p in command.params}
        assert {"widths", "mode"} <= names
    finally:
        monkeypatch.undo()
        field_specs.cache_clear()


def test_annotations_resolve():
    """Every section's annotations resolve (pydantic validates against them)."""
    for cls in SECTIONS.values():
        hints: dict[str, Any] = typing.get_type_hints(cls)
        assert set(hints) == {f.name for f in dataclasses.fields(cls)}
