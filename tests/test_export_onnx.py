"""The ONNX export (`charlstm export RUN --format onnx`) and generation through ONNX Runtime
(`charlstm generate --engine onnx`, examples/onnx_generate.py).

The graph must compute what the PyTorch network computes, for each cell and 1-3 layers of a trained
run: logits within 1e-4 over 1,000 steps, the same greedy text, the same sampled text for the same
seed. Bad input is a one-line error and leaves an earlier export as it was.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import charlstm
from charlstm import atomic
from charlstm.config import ModelConfig
from charlstm.export.onnx import step_graph
from charlstm.model import CharRNN
from tests.helpers import CORPUS_TEXT, ROOT, folder_files, invoke, make_run, one_line_error

EXAMPLE = ROOT / "examples" / "onnx_generate.py"


def export(run, out, *more):
    result = invoke("export", run, "--format", "onnx", "--out", out, *more)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def example():
    """examples/onnx_generate.py as a module."""
    spec = importlib.util.spec_from_file_location("onnx_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_cli(*args) -> str:
    result = invoke("generate", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """`trained_run` exported once (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    export(trained_run, out)
    return out


# ------------------------------------------------------------------------------------------ parity


def _states(cell: str, hidden) -> list[torch.Tensor]:
    return list(hidden) if cell == "lstm" else [hidden]


def graph_against_pytorch(net: CharRNN, session, ids: list[int]) -> float:
    """The largest difference between PyTorch's logits and state and the graph's, over `ids` fed to
    the graph one character per call (its state carried from call to call) and to PyTorch in one
    call over the whole sequence, from the zero state."""
    cell = net.config.cell
    names = ["h", "c"] if cell == "lstm" else ["h"]
    with torch.inference_mode():
        logits, hidden = net(torch.tensor([ids]))  # (1, T, V)
    feeds = {s: t.numpy() for s, t in zip(names, _states(cell, net.init_hidden(1)))}
    worst = 0.0
    for t, i in enumerate(ids):
        step_logits, *state = session.run(
            ["logits", *[s + "_out" for s in names]], {"ids": np.array([[i]]), **feeds}
        )
        feeds.update(zip(names, state))
        worst = max(worst, float(np.abs(step_logits[0, 0] - logits[0, t].numpy()).max()))
    for s, t in zip(names, _states(cell, hidden)):
        worst = max(worst, float(np.abs(feeds[s] - t.numpy()).max()))
    return worst


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_graph_matches_pytorch_over_1000_steps(cell, layers) -> None:
    """The graph of each cell and depth, stepped 1,000 times with its state carried, gives PyTorch's
    logits and final state within 1e-4; a batch of 3 windows of 20 characters from a non-zero state
    does too."""
    torch.manual_seed(layers)
    config = ModelConfig(
        cell=cell, num_layers=layers, embedding_size=8, hidden_size=16, vocab_size=30, dropout=0.0
    )
    net = CharRNN(config).eval()
    with (
        torch.no_grad()
    ):  # twice PyTorch's initial scale: logits and states of a trained model's size
        for p in net.parameters():
            p.mul_(2.0)
    session = ort.InferenceSession(
        step_graph(net).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ids = torch.randint(0, 30, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    assert graph_against_pytorch(net, session, ids) < 1e-4

    windows = torch.randint(0, 30, (3, 20), generator=torch.Generator().manual_seed(1))
    start = [torch.randn(layers, 3, 16) for _ in (["h", "c"] if cell == "lstm" else ["h"])]
    with torch.inference_mode():
        logits, hidden = net(windows, tuple(start) if cell == "lstm" else start[0])
    assert float(logits.abs().max()) > 1.0  # the tolerance is small next to the logits
    names = ["h", "c"] if cell == "lstm" else ["h"]
    got = session.run(
        ["logits", *[s + "_out" for s in names]],
        {"ids": windows.numpy(), **{s: t.numpy() for s, t in zip(names, start)}},
    )
    want = [logits.numpy(), *[t.numpy() for t in _states(cell, hidden)]]
    assert got[0].shape == (3, 20, 30)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < 1e-4


@pytest.fixture(params=[("lstm", 1), ("gru", 2), ("rnn", 3)], ids=lambda p: f"{p[0]}-{p[1]}")
def run_of_each_cell(request, trained_run, tmp_path, corpus):
    """A trained run of each cell: the shared LSTM run, and a GRU and an RNN trained here."""
    cell, layers = request.param
    if cell == "lstm":
        return trained_run
    return make_run(tmp_path / "run", corpus, cell=cell, num_layers=layers, max_steps=20)


@pytest.mark.slow
def test_trained_run_exports_and_generates_the_same_greedy_text(run_of_each_cell, tmp_path):
    """A trained run of each cell, exported through the CLI: its graph stays within 1e-4 of PyTorch
    over 1,000 characters of the corpus, and greedy generation of 1,000 characters from the same
    start text gives the same text from charlstm's engine, from `generate --engine onnx` on the
    export, and from the standalone example script (onnxruntime and numpy only)."""
    out = tmp_path / "onnx"
    export(run_of_each_cell, out)
    model = charlstm.load(run_of_each_cell, device="cpu")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert (
        graph_against_pytorch(model.model, session, model.vocab.encode(CORPUS_TEXT[:1000])) < 1e-4
    )

    greedy = model.generate("Shall", 1000, temperature=0.0)[0]
    assert len(greedy) == 1005
    assert example().generate(out, "Shall", 1000, 0.0) == greedy
    onnx_engine = generate_cli(
        out, "--engine", "onnx", "--start-text", "Shall", "--length", 1000, "--temperature", 0
    )
    assert onnx_engine == greedy + "\n"


# ------------------------------------------------------------------------------------ the files


def test_export_writes_a_checked_graph_and_its_vocabulary_the_same_bytes_each_time(
    trained_run, exported, tmp_path
):
    """model.onnx passes onnx's full checker at opset 17 and takes ids and the state; model.json
    holds the checkpoint's vocabulary in id order, the shapes, `charlstm generate`'s sampling
    defaults, the sha256 of model.onnx and the parity check's result; exporting again writes the
    same bytes."""
    proto = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import] == [17]
    assert [i.name for i in proto.graph.input] == ["ids", "h", "c"]
    assert [o.name for o in proto.graph.output] == ["logits", "h_out", "c_out"]
    meta = json.loads((exported / "model.json").read_text(encoding="utf-8"))
    ck = charlstm.load(trained_run, device="cpu")
    assert meta["vocabulary"] == list(ck.vocab.chars) and meta["vocab_size"] == len(ck.vocab)
    assert (meta["cell"], meta["num_layers"], meta["hidden_size"]) == ("lstm", 1, 16)
    assert meta["inputs"] == {
        "ids": ["batch", "time"],
        "h": [1, "batch", 16],
        "c": [1, "batch", 16],
    }
    assert meta["sampling"] == {"start_text": " ", "temperature": 0.3, "length": 200}
    assert meta["sha256"] == hashlib.sha256((exported / "model.onnx").read_bytes()).hexdigest()
    assert meta["source"]["step"] == ck.meta["step"] and meta["source"]["checkpoint"] == "best"
    assert 0 <= meta["check"]["max_abs_diff"] < 1e-4
    export(trained_run, tmp_path / "again")
    assert folder_files(tmp_path / "again") == folder_files(exported)


def test_onnx_engine_samples_the_same_text_as_charlstm_for_the_same_seed(trained_run, exported):
    """`generate --engine onnx` draws with charlstm's own sampler and seeds: with a temperature,
    top-k, a stop string and several samples, it prints what the native engine prints, from the
    export folder and from the run folder (a graph built in memory)."""
    args = ["--start-text", "Th", "--length", 150, "--temperature", 0.9, "--top-k", 20]
    args += ["--seed", 11, "--num-samples", 3, "--stop", "\n\n"]
    native = generate_cli(trained_run, *args, "--device", "cpu")
    assert generate_cli(exported, "--engine", "onnx", *args) == native
    assert generate_cli(trained_run, "--engine", "onnx", *args) == native
    assert len(set(native.split("-" * 40))) == 3  # three different samples


def test_export_refuses_to_replace_an_earlier_export_without_force(trained_run, exported, tmp_path):
    """An export into a folder holding one is a one-line error that leaves it as it was; with
    --force it is replaced (here by the `last` checkpoint's)."""
    out = shutil.copytree(exported, tmp_path / "copy")
    before = folder_files(out)
    result = invoke("export", trained_run, "--format", "onnx", "--out", out)
    one_line_error(result, "already holds an ONNX export", "--force")
    assert folder_files(out) == before
    export(trained_run, out, "--force", "--which", "last")
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert meta["source"]["checkpoint"] == "last"


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_without_onnx_packages_export_and_engine_say_how_to_install_them(
    trained_run, exported, tmp_path, monkeypatch, missing
):
    """Without onnx or onnxruntime, `export --format onnx` and `generate --engine onnx` end with one
    line naming the missing package and `pip install 'charlstm[onnx]'`, and write nothing."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    out = tmp_path / "out"
    result = invoke("export", trained_run, "--format", "onnx", "--out", out)
    one_line_error(result, f"({missing} is missing)", "pip install 'charlstm[onnx]'")
    assert not out.exists()
    result = invoke("generate", exported, "--engine", "onnx")
    one_line_error(result, f"({missing} is missing)", "pip install 'charlstm[onnx]'")


def test_engine_onnx_refuses_cuda(exported):
    """`--engine onnx --device cuda` is a contradiction, named as such."""
    result = invoke("generate", exported, "--engine", "onnx", "--device", "cuda")
    one_line_error(result, "--engine onnx runs on the CPU")


def _json_edit(change):
    def apply(folder):
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        change(meta)
        (folder / "model.json").write_text(json.dumps(meta), encoding="utf-8")

    return apply


def _rehash(folder):
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    meta["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(meta), encoding="utf-8")


def _garbage_graph(folder):
    (folder / "model.onnx").write_bytes(b"\x08\x07not a graph" * 10)
    _rehash(folder)


def _other_graph(folder):
    """A valid graph of another shape (2 layers of 24), with the sha256 made to match."""
    config = ModelConfig(num_layers=2, hidden_size=24, embedding_size=8, vocab_size=65)
    (folder / "model.onnx").write_bytes(step_graph(CharRNN(config).eval()).SerializeToString())
    _rehash(folder)


BROKEN = {
    "json-not-json": (lambda f: (f / "model.json").write_text("{oops"), "JSONDecodeError"),
    "json-a-list": (lambda f: (f / "model.json").write_text("[]"), "is not a charlstm-onnx file"),
    "json-missing": (lambda f: (f / "model.json").unlink(), "FileNotFoundError"),
    "graph-missing": (lambda f: (f / "model.onnx").unlink(), "FileNotFoundError"),
    "newer-version": (_json_edit(lambda m: m.update(version=2)), "format version 2, expected 1"),
    "unknown-cell": (_json_edit(lambda m: m.update(cell="lru")), "lacks a valid cell"),
    "vocab-strings": (
        _json_edit(lambda m: m.update(vocabulary=["ab", *m["vocabulary"][1:]])),
        "lacks a valid cell, size or vocabulary",
    ),
    "vocab-repeated": (
        _json_edit(lambda m: m.update(vocabulary=["a"] * m["vocab_size"])),
        "lacks a valid cell, size or vocabulary",
    ),
    "size-bool": (_json_edit(lambda m: m.update(num_layers=True)), "lacks a valid cell, size"),
    "graph-changed": (
        lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes()[:-1] + b"\0"),
        "model.onnx does not match the sha256 in model.json",
    ),
    "graph-garbage": (_garbage_graph, "is not a valid charlstm ONNX export"),
    "graph-other-shape": (_other_graph, "not those of a lstm of this size"),
    "vocab-shorter": (
        _json_edit(lambda m: m.update(vocabulary=m["vocabulary"][:-1])),
        "not those of a lstm of this size",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_export_is_a_one_line_error(exported, tmp_path, case):
    """An export folder that was damaged or tampered with is refused with one line that says why
    and how to export again; no graph runs."""
    folder = shutil.copytree(exported, tmp_path / "broken")
    damage, words = BROKEN[case]
    damage(folder)
    result = invoke("generate", folder, "--engine", "onnx", "--length", 5)
    one_line_error(result, "is not a valid charlstm ONNX export", words, "charlstm export RUN")


def _fail_write(monkeypatch, nth: int) -> None:
    """Make the nth whole-file write (and those after it) fail as on a full disk."""
    original, calls = atomic._write_all, {"n": 0}

    def write(fh, data):
        calls["n"] += 1
        if calls["n"] < nth:
            return original(fh, data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_write_all", write)


def test_a_full_disk_leaves_the_earlier_export_or_one_that_is_refused(
    trained_run, exported, tmp_path, monkeypatch, corpus
):
    """Replacing an export on a full disk: failing on the graph leaves the earlier export whole and
    working; failing on the JSON after the graph leaves a pair whose sha256 disagrees, which
    `--engine onnx` refuses instead of running a mixture; no temporary file stays behind."""
    out = shutil.copytree(exported, tmp_path / "copy")
    before = folder_files(out)
    _fail_write(monkeypatch, 1)
    result = invoke(
        "export", trained_run, "--format", "onnx", "--out", out, "--force", "--which", "last"
    )
    one_line_error(result, "could not write", "No space left on device", "export again")
    assert folder_files(out) == before

    monkeypatch.undo()
    other = make_run(tmp_path / "other", corpus, seed=2, max_steps=5)  # other weights, same shape
    _fail_write(monkeypatch, 2)
    result = invoke("export", other, "--format", "onnx", "--out", out, "--force")
    one_line_error(result, "could not write")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx"]
    result = invoke("generate", out, "--engine", "onnx", "--length", 5)
    one_line_error(result, "model.onnx does not match the sha256 in model.json")


def test_example_script_needs_neither_charlstm_nor_torch() -> None:
    """examples/onnx_generate.py imports only the standard library, numpy and onnxruntime."""
    tree = ast.parse(EXAMPLE.read_text(encoding="utf-8"))
    imported = {
        (alias.name if isinstance(node, ast.Import) else node.module).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {"__future__", "argparse", "json", "pathlib", "numpy", "onnxruntime"}


def test_export_format_web_goes_to_the_web_export(trained_run, tmp_path) -> None:
    """`charlstm export --format web` is the same command's other branch: it writes the page of
    `charlstm.export.web` (tested in tests/test_export_web.py) and says where it is."""
    result = invoke("export", trained_run, "--format", "web", "--out", tmp_path / "site")
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "site" / "index.html").is_file()
    assert "index.html" in result.stdout and not (tmp_path / "site" / "model.onnx").exists()


def test_the_native_engine_points_an_export_folder_to_engine_onnx(exported) -> None:
    """`charlstm generate EXPORT` without --engine onnx says to add it (not just "not a run")."""
    result = invoke("generate", exported, "--length", 5)
    one_line_error(result, "is an ONNX export", "generate from it with --engine onnx")
