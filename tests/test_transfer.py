"""Fine-tuning from another run: the union vocabulary keeps shared rows, frozen layers stay put,
the pre-training shortcut runs both phases, and the CLI takes the pre-trained model's shape."""

import dataclasses

import pytest
import torch

from charlstm.errors import UserError
from charlstm.model import CharRNN
from charlstm.training import transfer
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import checkpoint, invoke, make_run, quiet, tiny_config, tiny_flags

OTHER = "Мой дядя самых честных правил,\nКогда не в шутку занемог,\nОн уважать себя заставил\n" * 30


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A run on a Russian-only text: the corpus fixture's English characters are new to it. Tests
    only read it."""
    folder = tmp_path_factory.mktemp("transfer")
    text = folder / "onegin.txt"
    text.write_text(OTHER, encoding="utf-8")
    return make_run(folder / "pre", text, num_layers=2, max_steps=10)


def test_union_vocabulary_keeps_shared_rows_and_adds_new(pretrained, corpus):
    """Shared characters keep their index and their embedding and output rows; the new text's other
    characters are appended with fresh rows."""
    source = transfer.read_source(pretrained)
    config = tiny_config(corpus, num_layers=2, init_from=str(pretrained))
    vocab = transfer.union_vocabulary(config, source)
    assert vocab.chars[: len(source.vocab)] == source.vocab.chars
    assert {"S", "h", "?"} <= set(vocab.chars[len(source.vocab) :])

    torch.manual_seed(0)
    model = CharRNN(dataclasses.replace(config.model, vocab_size=len(vocab)))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    added = transfer.initialise(model, vocab, source)
    state = model.state_dict()
    assert added == len(vocab) - len(source.vocab) > 0
    old = len(source.vocab)
    for name in ("encoder.weight", "fc.weight", "fc.bias"):
        assert torch.equal(state[name][:old], source.state[name])
    assert torch.equal(state["encoder.weight"][old:], fresh["encoder.weight"][old:])
    assert torch.equal(state["fc.weight"][old:], fresh["fc.weight"][old:])
    assert torch.equal(state["rnn.weight_hh_l1"], source.state["rnn.weight_hh_l1"])


def test_init_from_trains_on_the_union(pretrained, corpus, tmp_path):
    config = tiny_config(corpus, num_layers=2, init_from=str(pretrained))
    run = train(config, tmp_path / "fine", progress=False)
    fine, pre = checkpoint(run, "best"), checkpoint(pretrained, "best")
    assert fine.vocab.chars[: len(pre.vocab)] == pre.vocab.chars
    assert len(fine.vocab) > len(pre.vocab)


def test_freeze_keeps_embedding_and_lower_layers(pretrained, corpus, tmp_path):
    """With freeze_layers=1 the embedding and layer 0 end exactly as pre-training left them (new
    characters' rows included, at their fresh values), while layer 1 and the output layer learn."""
    config = tiny_config(
        corpus, num_layers=2, init_from=str(pretrained), freeze_layers=1, weight_decay=0.01
    )
    run = train(config, tmp_path / "fine", progress=False)
    pre, last = checkpoint(pretrained, "best").model_state(), checkpoint(run).model_state()
    old = pre["encoder.weight"].shape[0]
    assert torch.equal(last["encoder.weight"][:old], pre["encoder.weight"])
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert torch.equal(last[f"rnn.{name}"], pre[f"rnn.{name}"]), name
    assert not torch.equal(last["rnn.weight_hh_l1"], pre["rnn.weight_hh_l1"])
    assert not torch.equal(last["fc.weight"][:old], pre["fc.weight"])


def test_frozen_fine_tune_resumes_frozen(pretrained, corpus, tmp_path):
    """Resuming a fine-tuned run continues from its own checkpoint (the pre-trained weights are not
    copied in again) and keeps the frozen layers frozen."""
    config = tiny_config(
        corpus, num_layers=2, init_from=str(pretrained), freeze_layers=2, max_steps=6
    )
    run = train(config, tmp_path / "fine", progress=False)
    before = checkpoint(run).model_state()
    resumed = train(resume_config(run, {"max_steps": 12}), run, resume=True, progress=False)
    after = checkpoint(resumed).model_state()
    assert torch.equal(after["rnn.weight_hh_l1"], before["rnn.weight_hh_l1"])
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def test_architecture_must_match(pretrained, corpus, tmp_path):
    config = tiny_config(corpus, num_layers=1, init_from=str(pretrained))
    with pytest.raises(UserError, match="shape"):
        train(config, tmp_path / "x", progress=False)


def test_freeze_needs_a_source(corpus, tmp_path):
    """Frozen layers must come from somewhere: a run (--init-from, --pretrain) or a base. With
    --base none that is known at once; with --base auto, once the run has declined every base."""
    with pytest.raises(UserError, match="freeze_layers"):
        tiny_config(corpus, freeze_layers=1, base="none")
    with pytest.raises(UserError, match="freeze_layers only makes sense"):
        train(tiny_config(corpus, freeze_layers=1), tmp_path / "r", log=quiet, progress=False)


# The tiny model's training flags without its shape: with --init-from the shape is the source's.
CLI_TINY = tiny_flags(embedding_size=None, hidden_size=None, num_layers=None, max_steps=5)


def test_cli_init_from_takes_the_pretrained_shape(pretrained, corpus, tmp_path):
    """`charlstm train --init-from RUN` needs no shape flags; a conflicting one is refused."""
    out = tmp_path / "fine"
    args = ["train", "--text", corpus, "--init-from", pretrained, "--no-progress", *CLI_TINY]
    ok = invoke(*args, "--out", out)
    assert ok.exit_code == 0, ok.output
    assert checkpoint(out).model_config.hidden_size == 16
    bad = invoke(*args, "--hidden-size", "32", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "hidden_size=16" in bad.output, bad.output


@pytest.mark.slow
def test_cli_pretrain_runs_both_phases(corpus, tmp_path):
    """`--pretrain TEXT` trains `<out>-pretrain` first, with `--pretrain-config`'s settings on top,
    then fine-tunes `out` from it with the run's own settings and the pre-trained model's shape."""
    other = tmp_path / "onegin.txt"
    other.write_text(OTHER, encoding="utf-8")
    preset = tmp_path / "pre.toml"
    preset.write_text("batch_size = 2\nhidden_size = 12\nlr = 0.02\n", encoding="utf-8")
    out = tmp_path / "fine"
    result = invoke(
        *["train", "--text", corpus, "--out", out, "--no-progress", *tiny_flags(max_steps=5)],
        *["--pretrain", other, "--pretrain-time", "1", "--pretrain-config", preset],
    )
    assert result.exit_code == 0, result.output
    pre, fine = checkpoint(tmp_path / "fine-pretrain", "best"), checkpoint(out, "best")
    assert pre.run_config.data.text == str(other)
    assert (pre.run_config.data.batch_size, pre.run_config.optim.lr) == (2, 0.02)
    assert fine.run_config.train.init_from == str(tmp_path / "fine-pretrain")
    assert (fine.run_config.data.batch_size, fine.model_config.hidden_size) == (4, 12)
    assert fine.vocab.chars[: len(pre.vocab)] == pre.vocab.chars


def test_union_vocabulary_leaves_out_the_files_skip_bad_files_leaves_out(pretrained, tmp_path):
    """The union is built from the text the run trains on: a file `--skip-bad-files` leaves out
    contributes no characters (before, it was read anyway and stopped the run)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text\n" * 20, encoding="utf-8")
    (folder / "b.txt").write_bytes("Zürich ÿ\n".encode("latin-1"))  # not UTF-8
    source = transfer.read_source(pretrained)
    cfg = tiny_config(folder, skip_bad_files=True)
    vocab = transfer.union_vocabulary(cfg, source)
    assert "p" in vocab and "ÿ" not in vocab
    with pytest.raises(UserError, match="not valid utf-8"):
        transfer.union_vocabulary(tiny_config(folder), source)


@pytest.mark.slow
def test_pretrain_takes_a_folder(corpus, tmp_path):
    """`--pretrain` takes what `--text` takes: a folder (or a glob) is text, not a dataset name."""
    folder = tmp_path / "onegin"
    folder.mkdir()
    (folder / "1.txt").write_text(OTHER, encoding="utf-8")
    (folder / "2.txt").write_text(OTHER[::-1], encoding="utf-8")
    cfg = tiny_config(corpus, max_steps=3, pretrain=str(folder), pretrain_time=1.0)
    train(cfg, tmp_path / "fine", progress=False, log=lambda _: None)
    pre = checkpoint(tmp_path / "fine-pretrain", "best").run_config.data
    assert (pre.text, pre.dataset) == (str(folder), None)
