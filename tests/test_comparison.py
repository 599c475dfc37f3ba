"""LSTM vs GRU vs RNN: matched sizes, the probes' bookkeeping, and a tiny comparison end to end."""

import dataclasses
import json
import math

import numpy as np
import pytest

from charlstm.config import RunConfig
from charlstm.experiments import comparison
from charlstm.model import CharRNN
from charlstm.model.evaluation import char_losses
from tests.helpers import invoke, one_line_error, tiny_config, tiny_flags


@pytest.mark.parametrize("layers, hidden", [(2, 256), (1, 384), (3, 128)])
def test_matched_sizes_have_the_lstms_parameter_count(layers, hidden):
    config = RunConfig().replace(num_layers=layers, hidden_size=hidden)
    sizes = comparison.matched_hidden_sizes(config, ["lstm", "gru", "rnn"], vocab_size=74)
    target = sizes["lstm"][1]
    assert sizes["lstm"][0] == hidden
    for cell, (h, params) in sizes.items():
        assert abs(params - target) / target < 0.02, cell
    assert sizes["lstm"][0] < sizes["gru"][0] < sizes["rnn"][0]


def test_line_distance_counts_from_the_last_newline():
    ids = np.array([5, 5, 0, 5, 5, 5, 0, 5])  # 0 is the newline
    # prediction p predicts ids[p + 1] having seen this many characters of its line (the text's
    # start counts as a line start)
    assert comparison.line_distance(ids, 0).tolist() == [1, 2, 0, 1, 2, 3, 0]
    buckets = comparison.line_buckets(
        np.arange(7.0), comparison.line_distance(ids, 0), edges=(0, 1, 3)
    )
    assert buckets == {"0-0": np.mean([2, 6]), "1-2": np.mean([0, 1, 3, 4]), "3+": 5.0}


def test_copy_text_repeats_each_key_after_the_delay():
    text = comparison.copy_text(delay=3, n_chars=70, seed=1)
    lines = text.splitlines()
    assert len(lines) == 10 and all(len(x) == 6 and x[1:4] == "..." and x[4] == "=" for x in lines)
    assert all(x[0] == x[5] and x[0] in comparison.COPY_KEYS for x in lines)
    assert len({x[0] for x in lines}) > 1


def test_a_document_start_is_a_line_start_and_its_prediction_is_left_out():
    ids = np.array([5, 5, 0, 5, 5, 5, 5, 5])  # 0 is the newline; a document starts at 4
    distance = comparison.line_distance(ids, 0, np.array([0, 4]))
    # p = 3 predicts the document's first character (nothing is, across the start: NaN below);
    # p = 4 has seen that one character of the document's first line
    assert distance.tolist() == [1, 2, 0, 0, 1, 2, 3]
    losses = np.array([1.0, 1, 1, np.nan, 4, 4, 4])
    buckets = comparison.line_buckets(losses, distance, edges=(0, 1))
    assert buckets == {"0-0": 1.0, "1+": pytest.approx(14 / 5)}


def test_context_probes_never_cross_a_document_start(corpus):
    config = tiny_config(corpus)
    model = CharRNN(dataclasses.replace(config.model, vocab_size=30))
    ids = np.random.default_rng(0).integers(0, 30, size=700)
    starts = np.arange(0, 700, 70)  # documents of 70: 6 positions each have 64 characters inside
    full = char_losses(model, ids, starts=starts)
    probes = comparison.context_losses(
        model, ids, full, contexts=(4, 64), positions=700, starts=starts
    )
    # "full" would be NaN had a position whose target starts a document been drawn
    assert math.isfinite(probes["full"]) and set(probes) == {"4", "64", "full"}
    sixties = np.concatenate([np.arange(s + 63, s + 69) for s in starts])
    assert probes["full"] == pytest.approx(full[sixties].mean())
    shorter = np.arange(0, 700, 60)  # no document holds 64 characters and a target
    assert comparison.context_losses(model, ids, full, contexts=(64,), starts=shorter) == {}


@pytest.mark.slow
def test_compare_cli_prints_table_and_writes_json(corpus, tmp_path):
    """Two cells × two seeds on a tiny budget: a markdown table, JSON with every run, the plot."""
    out = tmp_path / "cmp"
    args = [
        *["compare", "--text", corpus, "--cells", "lstm,rnn", "--seeds", 2, "--budget", "20s"],
        *["--copy-delays", 3, "--copy-budget", "1s", "--out", out],
        *tiny_flags(max_steps=10),
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "| LSTM | 16 |" in result.output and "| RNN |" in result.output
    assert "k = 64" in result.output and "0-4" in result.output
    assert "| RNN | " in result.output.split("Copy task")[1]
    doc = json.loads((out / "comparison.json").read_text())
    assert len(doc["runs"]) == 4 and {r["seed"] for r in doc["runs"]} == {1337, 1338}
    assert set(doc["copy_task"]) == {"lstm", "rnn"} and "3" in doc["copy_task"]["rnn"]
    assert doc["summary"]["rnn"]["hidden_size"] > 16
    assert (out / "curves.png").stat().st_size > 0
    # A second call reuses the finished runs instead of training them again.
    stamp = (out / "lstm-seed1337" / "last" / "checkpoint.safetensors").stat().st_mtime_ns
    again = invoke(*args, "--no-probe")
    assert again.exit_code == 0, again.output
    assert (out / "lstm-seed1337" / "last" / "checkpoint.safetensors").stat().st_mtime_ns == stamp


def test_compare_rejects_unknown_cells(corpus):
    one_line_error(invoke("compare", "--text", corpus, "--cells", "lstm,transformer"), "--cells")
