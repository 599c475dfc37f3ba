"""Text from many files: --text as files, folders and globs, one document per file, and the
boundaries kept by `charlstm prepare`."""

import itertools
import json

import numpy as np
import pytest
import torch

from charlstm.config import ModelConfig, RunConfig, dataset_label
from charlstm.data import prepared
from charlstm.data.batching import make_batcher
from charlstm.data.corpus import read_text
from charlstm.data.loading import prepare_data
from charlstm.data.sources import expand
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.model import CharRNN
from charlstm.model.evaluation import char_losses, evaluate_ids, loss_sums
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import (
    CORPUS_TEXT,
    assert_same_tensors,
    checkpoint,
    invoke,
    one_line_error,
    quiet,
    read_metrics,
    tiny_config,
    weights,
)


def tree(root, files: dict[str, bytes | str]):
    """Write `files` (relative path → content) under `root`; returns `root`."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


SOURCE_TREE = {
    "b.c": "int b;\n",
    "a/z.c": "int z;\r\n",
    "a/y.h": "#define Y 1\n",
    "a.c": "\ufeffint a;\n",  # a BOM of its own, dropped as in a single file
    "a/deep/x.c": "int x; /* ✓ */\n",
    ".git/config": "[core]\n",  # hidden: left out
    "a/.hidden.c": "secret\n",
    "empty.c": "",  # empty: skipped
}


def _names(files, root):
    return [str(f.path.relative_to(root)) for f in files]


def test_folder_is_every_visible_file_in_tree_order(tmp_path):
    """A folder gives its regular files recursively, hidden ones left out, ordered name by name."""
    root = tree(tmp_path / "src", SOURCE_TREE)
    names = _names(expand(str(root)), root)
    assert names == ["a/deep/x.c", "a/y.h", "a/z.c", "a.c", "b.c", "empty.c"]


def test_glob_is_sorted_recursive_and_files_are_read_once(tmp_path, monkeypatch):
    """`**` matches any depth; a file named again (by a folder, then a glob) is kept once, where it
    first appears; a named file keeps its place."""
    root = tree(tmp_path / "src", SOURCE_TREE)
    monkeypatch.chdir(tmp_path)
    files = expand(["src/b.c", "src/**/*.c", "src/a"])
    assert [str(f.path) for f in files] == [
        "src/b.c",
        "src/a/deep/x.c",
        "src/a/z.c",
        "src/a.c",
        "src/empty.c",
        "src/a/y.h",
    ]
    assert [f.named for f in files] == [True, False, False, False, False, False]
    label = lambda text: dataset_label(RunConfig().replace(text=text, dataset=None))
    assert label("src/**/*.c") == "src" and label([str(root), "x.txt"]) == "src+1"
    assert label("src/b.c") == "b"


@pytest.mark.parametrize(
    "spec, needle",
    [("nothing/*.txt", "no file matches --text"), ("", "empty path")],
)
def test_a_pattern_that_matches_nothing_is_named(tmp_path, monkeypatch, spec, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=needle):
        expand([spec])


def test_a_folder_without_files_is_named(tmp_path):
    tree(tmp_path / "d", {".only-hidden": "x"})
    with pytest.raises(UserError, match="holds no files"):
        expand(str(tmp_path / "d"))


def _documents(root, names):
    """The normalised texts of `names` under `root`, as `read_text` reads each."""
    return [read_text(root / n) for n in names]


def test_prepare_a_folder_keeps_one_document_per_file(tmp_path, monkeypatch):
    """The ids are the files' texts one after another (each decoded on its own: its BOM dropped,
    its CRLF normalised), docs.bin holds where each starts, empty and hidden files are left out."""
    monkeypatch.setattr(prepared, "CHUNK_BYTES", 3)  # chunk boundaries inside every file
    root = tree(tmp_path / "src", SOURCE_TREE)
    result = prepared.prepare(root, tmp_path / "p", progress=False)
    names = ["a/deep/x.c", "a/y.h", "a/z.c", "a.c", "b.c"]
    texts = _documents(root, names)
    whole = "".join(texts)
    corpus = prepared.open_prepared(tmp_path / "p")
    assert corpus.vocab == Vocabulary.from_text(whole) == result.vocab
    assert prepared.decode_ids(corpus.vocab, corpus.ids) == whole
    assert corpus.starts.tolist() == np.cumsum([0] + [len(t) for t in texts])[:-1].tolist()
    assert result.documents == 5 and corpus.meta["documents"] == 5
    files = json.loads((tmp_path / "p" / "files.json").read_text(encoding="utf-8"))
    assert files == [str(root / n) for n in names]


def test_prepare_one_file_is_one_document(tmp_path, corpus):
    """A single file: one document at 0, and the source's sha256 is the file's, as before."""
    prepared.prepare(corpus, tmp_path / "p", progress=False)
    opened = prepared.open_prepared(tmp_path / "p")
    assert opened.starts.tolist() == [0]
    assert opened.meta["source_sha256"] == prepared.sha256_file(corpus)


def test_a_bad_file_in_a_folder_is_named_or_skipped(tmp_path):
    """A Latin-1 file in a UTF-8 tree stops `prepare` with its name; with skip_bad_files it (and
    a binary file) is left out and counted, and nothing of it reaches the ids."""
    root = tree(
        tmp_path / "src",
        {"a.c": "int a;\n", "b.c": "/* caf\xe9 */\n".encode("latin-1"), "c.o": b"\0\1\2" * 50},
    )
    with pytest.raises(UserError, match=r"b\.c' is not valid utf-8"):
        prepared.prepare(root, tmp_path / "p", progress=False)
    assert not (tmp_path / "p" / "meta.json").exists()
    result = prepared.prepare(
        root, tmp_path / "q", progress=False, skip_bad_files=True, val_fraction=0
    )
    assert result.documents == 1 and result.skipped == 2
    corpus = prepared.open_prepared(tmp_path / "q")
    assert prepared.decode_ids(corpus.vocab, corpus.ids) == "int a;\n"
    assert corpus.meta["skipped_files"] == 2
    with pytest.raises(UserError, match="no text in --text"):
        prepared.prepare(
            tree(tmp_path / "bad", {"x": b"\xff\xfe\xfd"}),
            tmp_path / "r",
            progress=False,
            skip_bad_files=True,
        )


def test_damaged_docs_file_is_refused_and_version_1_still_loads(tmp_path):
    root = tree(tmp_path / "src", {"a.txt": "one\n", "b.txt": "two\n"})
    prepared.prepare(root, tmp_path / "p", progress=False, val_fraction=0)
    docs = tmp_path / "p" / "docs.bin"
    good = docs.read_bytes()
    docs.write_bytes(good[:-1] + b"\1")
    with pytest.raises(UserError, match="docs.bin does not match its sha256"):
        prepared.open_prepared(tmp_path / "p")
    # A folder from before docs.bin: version 1, no docs.bin, read as one document.
    docs.unlink()
    meta_path = tmp_path / "p" / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["format_version"] = 1
    for key in ("documents", "docs_sha256", "skipped_files"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    assert prepared.open_prepared(tmp_path / "p").starts.tolist() == [0]


def test_cli_prepare_takes_folders_and_globs(tmp_path, monkeypatch):
    """`charlstm prepare --text DIR --text 'GLOB'` through the CLI: one corpus, files counted."""
    tree(tmp_path / "src", SOURCE_TREE)
    tree(tmp_path / "more", {"m1.txt": "more one\n", "m2.txt": "more two\n"})
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "prepare", "--text", "src", "--text", "more/*.txt", "--out", "p", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "from 7 files" in result.output
    assert prepared.open_prepared(tmp_path / "p").meta["documents"] == 7
    bad = invoke("prepare", "--text", "nowhere/**/*.c", "--out", "q", "--no-progress")
    one_line_error(bad, "no file matches --text 'nowhere/**/*.c'")


# ------------------------------------------------------------------------- training on many files


def poem_folder(root):
    """The tiny corpus cut into five files of unequal length (one of them a single line)."""
    text = CORPUS_TEXT
    cuts = [0, 700, 760, 1300, 2100, len(text)]
    return tree(
        root, {f"{i:02d}.txt": text[a:b] for i, (a, b) in enumerate(itertools.pairwise(cuts))}
    )


def test_prepare_data_keeps_each_splits_documents(tmp_path):
    """A folder read in memory and the same folder prepared on disk give the same ids and the
    same document starts in each split; a split cut inside a file starts with its rest."""
    root = poem_folder(tmp_path / "poems")
    prepared.prepare(root, tmp_path / "p", progress=False)
    a = prepare_data(tiny_config(root, test_fraction=0.1))
    b = prepare_data(tiny_config(root, test_fraction=0.1).replace(prepared=str(tmp_path / "p")))
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, f"{part}_ids"), getattr(b, f"{part}_ids"))
        assert np.array_equal(getattr(a, f"{part}_starts"), getattr(b, f"{part}_starts"))
    n = len(CORPUS_TEXT)
    cut, val_end = n - 2 * round(0.1 * n), n - round(0.1 * n)
    assert len(a.train_ids) == cut and len(a.val_ids) == val_end - cut
    assert a.train_starts.tolist() == [0, 700, 760, 1300]
    assert a.val_starts.tolist() == [0] and a.test_starts.tolist() == [0, 2100 - val_end]


def _losses_by_document(model, ids, starts):
    """The reference: each document evaluated alone, from a fresh state."""
    ends = list(starts[1:]) + [len(ids)]
    sums = [loss_sums(model, ids[a:b], n_streams=1) for a, b in zip(starts, ends) if b - a > 1]
    return sum(s for s, _ in sums) / sum(c for _, c in sums)


@pytest.mark.parametrize("window", [512, 7])
def test_evaluation_carries_no_state_across_documents(window):
    """With one stream, the loss of a multi-document text is exactly that of its documents each
    evaluated alone; with more streams every document still counts n-1 predictions."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=13, hidden_size=16, embedding_size=8))
    ids = np.random.default_rng(0).integers(0, 13, size=300)
    starts = np.array([0, 50, 51, 120, 260])
    one = evaluate_ids(model, ids, n_streams=1, window=window, starts=starts)
    assert one == pytest.approx(_losses_by_document(model, ids, starts), rel=1e-5)
    assert one != pytest.approx(evaluate_ids(model, ids, n_streams=1), rel=1e-5)
    _, count = loss_sums(model, ids, n_streams=4, window=window, starts=starts)
    assert count == len(ids) - len(starts)


@pytest.mark.parametrize("streams", [1, 4])
def test_per_character_losses_are_each_documents_own(streams):
    """char_losses reads a text as loss_sums does: NaN exactly where a document starts, each
    document's losses (one stream) those of the document alone, and their mean the loss."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=13, hidden_size=16, embedding_size=8))
    ids = np.random.default_rng(1).integers(0, 13, size=300)
    starts = np.array([0, 50, 51, 120, 260])
    losses = char_losses(model, ids, n_streams=streams, window=7, starts=starts)
    assert losses.shape == (299,)
    assert np.flatnonzero(np.isnan(losses)).tolist() == [49, 50, 119, 259]
    assert np.nanmean(losses) == pytest.approx(
        evaluate_ids(model, ids, n_streams=streams, window=7, starts=starts), rel=1e-5
    )
    if streams == 1:
        alone = char_losses(model, ids[120:260], n_streams=1)
        np.testing.assert_allclose(losses[120:259], alone, rtol=1e-5)


def test_characters_seen_leave_out_the_padding(tmp_path):
    """A document's last window is padded; the characters a run reports (and its chars/s)
    count only the targets it trained on, those of the same batches drawn again."""
    root = poem_folder(tmp_path / "poems")
    cfg = tiny_config(root, max_steps=12, eval_interval=4, seq_len=24)
    run = train(cfg, tmp_path / "run", progress=False, log=quiet)
    seen = checkpoint(run, "last").meta["metrics"]["chars"]
    data, d = prepare_data(cfg), cfg.data
    batcher = make_batcher(
        d.batching, data.train_ids, d.batch_size, d.seq_len, cfg.train.seed, data.train_starts
    )
    batches = [batcher.next() for _ in range(12)]
    assert seen == sum(b.targets for b in batches)
    assert seen < 12 * d.batch_size * d.seq_len  # some window was padded


@pytest.mark.slow
def test_training_on_a_folder_resumes_exactly(tmp_path):
    """A run on a folder trains (its batches inside documents), from memory and from a prepared
    copy alike, and a run stopped half-way and resumed ends with the same weights."""
    root = poem_folder(tmp_path / "poems")
    cfg = tiny_config(root, max_steps=16, eval_interval=4, seq_len=24)
    straight = train(cfg, tmp_path / "straight", progress=False, log=quiet)
    prepared.prepare(root, tmp_path / "p", progress=False)
    from_prep = train(
        cfg.replace(prepared=str(tmp_path / "p")), tmp_path / "prep", progress=False, log=quiet
    )
    assert_same_tensors(weights(straight), weights(from_prep))
    half = train(cfg.replace(max_steps=8), tmp_path / "half", progress=False, log=quiet)
    resumed = train(
        resume_config(half, {"max_steps": 16}), half, resume=True, progress=False, log=quiet
    )
    assert_same_tensors(weights(straight), weights(resumed))


# ------------------------------------------------------------------------------------ a test split


@pytest.mark.slow
def test_a_test_split_is_measured_once_at_the_end(tmp_path, corpus):
    """With --test-fraction, the last share of the text is held out: only the final metrics
    record, best/'s meta and the last log line carry its loss (best/'s weights, a full pass), and
    `charlstm evaluate RUN` reports the same figure beside the validation split's."""
    lines = []
    cfg = tiny_config(corpus, test_fraction=0.1, max_steps=10)
    run = train(cfg, tmp_path / "run", progress=False, log=lines.append)
    records = read_metrics(run)
    assert [r for r in records if "test_loss" in r] == [records[-1]] and records[-1]["final"]
    test_loss = records[-1]["test_loss"]
    assert checkpoint(run, "best").meta["metrics"]["test_loss"] == test_loss
    assert "test loss" in lines[-1] and f"{test_loss:.4f}" in lines[-1]
    data = prepare_data(cfg)
    n = len(CORPUS_TEXT)
    assert len(data.test_ids) == round(0.1 * n) and len(data.val_ids) == round(0.1 * n)
    result = invoke("evaluate", run, "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["test"]["loss"] == pytest.approx(test_loss, rel=1e-5)
    assert evaluated["test"]["characters"] == len(data.test_ids)
    assert evaluated["characters"] == len(data.val_ids)
    text = invoke("evaluate", run)
    assert "(validation split)" in text.output and "(test split)" in text.output


def test_a_run_without_a_test_split_says_how_to_hold_one_out(trained_run):
    from charlstm.data.loading import held_out

    model = checkpoint(trained_run, "best")
    with pytest.raises(UserError, match="no test split; train with --test-fraction"):
        held_out(model.run_config, "test", model.vocab)
    assert "test" not in json.loads(invoke("evaluate", trained_run, "--json").output)


def test_many_texts_survive_the_relaunch_under_torchrun():
    """`train --nproc N` relaunches itself with the options it was given: each --text again."""
    from charlstm.cli import _command_args
    from charlstm.cli import train as train_command

    ctx = train_command.make_context("train", ["--text", "a/", "--text", "b/*.txt", "--seed", "3"])
    args = _command_args(ctx)
    assert args[args.index("--text") :][:4] == ["--text", "a/", "--text", "b/*.txt"]
    assert ctx.params["dataset"] is None  # not given: the preset's value stays


@pytest.mark.slow
def test_the_reports_validation_loss_keeps_documents_apart(tmp_path):
    """`charlstm analyze`/`report` measure the validation split as training and `evaluate` do:
    no state carried from one file into the next."""
    from charlstm.analysis.report import analyze_run
    from charlstm.model.evaluation import split_metrics

    n = len(CORPUS_TEXT)
    cuts = [0, 1200, n - 150, n - 60, n]  # two document starts inside the last 10%
    root = tree(
        tmp_path / "poems",
        {f"{i:02d}.txt": CORPUS_TEXT[a:b] for i, (a, b) in enumerate(itertools.pairwise(cuts))},
    )
    cfg = tiny_config(root, max_steps=6, eval_interval=3, eval_streams=1)
    run = train(cfg, tmp_path / "run", progress=False, log=quiet)
    assert len(prepare_data(cfg).val_starts) == 3
    from charlstm.generate.textmodel import load

    model = load(run, which="last", device="cpu")
    expected = split_metrics(model.model, cfg, "validation", model.vocab)["loss"]
    report = analyze_run(run, text="a line of text\n", which="last", device="cpu")
    assert report["validation"]["loss"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_reads_a_folder_or_glob_as_documents(tmp_path, trained_run, trained_model):
    """`charlstm evaluate RUN --text` takes what training's --text takes; the files stay apart."""
    root = poem_folder(tmp_path / "poems")
    files = sorted(root.iterdir())
    texts = [read_text(f) for f in files]
    apart = trained_model.evaluate(texts)
    assert apart["characters"] == sum(len(t) for t in texts)
    assert apart["loss"] != pytest.approx(trained_model.evaluate("".join(texts))["loss"], rel=1e-6)
    for spec in ([root], [str(root / "*.txt")], files):
        args = [x for f in spec for x in ("--text", f)]
        out = invoke("evaluate", trained_run, *args, "--json")
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["loss"] == pytest.approx(apart["loss"], rel=1e-9)
