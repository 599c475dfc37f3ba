"""ONNX export: one step of the network as an ONNX graph, and generation through ONNX Runtime.

`charlstm export RUN --format onnx --out DIR` writes two files:

- ``model.onnx``: the network's forward pass (embedding → 1-3 LSTM, GRU or RNN layers → linear),
  opset 17. Inputs ``ids`` (batch, time) int64 and the recurrent state ``h`` (layers, batch,
  hidden) float32, plus ``c`` for an LSTM; outputs ``logits`` (batch, time, vocabulary) and the new
  state ``h_out`` (and ``c_out``). One character per call (time 1) is one step of generation; a
  longer ``ids`` primes the state with a whole start text in one call. Zeros are the initial state.
- ``model.json``: what a program needs beside the graph: the vocabulary (``vocabulary[i]`` is the
  character of id i), the shapes, the sampling defaults of `charlstm generate` (start text,
  temperature, length), the run it came from and the sha256 of ``model.onnx``.

The graph is built here from the weights with ``onnx.helper`` rather than traced by
``torch.onnx.export``: PyTorch 2.13's default exporter needs onnxscript and torch.export, and its
TorchScript exporter is deprecated and slated for removal. Built by hand, the graph is a dozen
standard nodes, the same bytes on every export of the same checkpoint, and needs only the onnx
package. PyTorch's gate orders differ from ONNX's (LSTM i, f, g, o against i, o, f, c; GRU r, z, n
against z, r, h, with ``linear_before_reset``); `_layer_weights` reorders them. Every export is
checked against PyTorch with ONNX Runtime before anything is written (`check_parity`), and the
largest difference is recorded in model.json.

Generating elsewhere needs only onnxruntime and numpy (examples/onnx_generate.py does it in 40
lines); in charlstm, `load_onnx` wraps the graph in an ONNX Runtime session behind `CharRNN`'s
interface, so that `charlstm generate --engine onnx` draws with the same sampling rules, stop rules
and seeds as the native engine.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlstm.atomic import atomic_write_bytes, atomic_write_text
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.generate.textmodel import TextModel, load
from charlstm.model.network import CharRNN, Hidden, hidden_from_tensors, hidden_tensors

FORMAT = "charlstm-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
META_FILE = "model.json"
# Opset 17 and IR version 8: what ONNX Runtime has run since 1.13 (and onnxruntime-web with it);
# the graph uses nothing newer.
OPSET = 17
IR_VERSION = 8
# `charlstm generate`'s defaults, recorded for programs that run the graph elsewhere.
SAMPLING_DEFAULTS = {"start_text": " ", "temperature": 0.3, "length": 200}
CHECK_STEPS = 200  # steps of the parity check each export runs before writing
_CELLS = ("lstm", "gru", "rnn")
_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
# Row order of PyTorch's gate blocks in ONNX's order: LSTM i,f,g,o → i,o,f,c; GRU r,z,n → z,r,h.
_GATES = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}


def _require() -> tuple[Any, Any]:
    """The onnx and onnxruntime modules, or the one-line error that says how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        missing = exc.name or "onnx"
        raise UserError(
            f"the ONNX export needs the onnx and onnxruntime packages ({missing} is missing); "
            "install them with pip install 'charlstm[onnx]'"
        ) from None
    return onnx, onnxruntime


def _state_names(cell: str) -> list[str]:
    return ["h", "c"] if cell == "lstm" else ["h"]


# ------------------------------------------------------------------------------------ the graph


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _layer_weights(rnn: torch.nn.Module, k: int, cell: str) -> tuple[np.ndarray, ...]:
    """Layer k's W (1, G·H, in), R (1, G·H, H) and B (1, 2·G·H) in ONNX's gate order."""
    order = _GATES[cell]

    def reorder(t: torch.Tensor) -> np.ndarray:
        blocks = _numpy(t).reshape(len(order), -1, *t.shape[1:])
        return np.concatenate([blocks[g] for g in order])

    W = reorder(getattr(rnn, f"weight_ih_l{k}"))
    R = reorder(getattr(rnn, f"weight_hh_l{k}"))
    B = np.concatenate(
        [reorder(getattr(rnn, f"bias_ih_l{k}")), reorder(getattr(rnn, f"bias_hh_l{k}"))]
    )
    return W[None], R[None], B[None]


def step_graph(model: CharRNN) -> Any:
    """The network's forward pass as an ONNX ModelProto (see the module docstring for its inputs
    and outputs). Dropout is left out: it does nothing at inference."""
    onnx, _ = _require()
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    cell, L, H, V = cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    if cell not in _CELLS:
        raise ValueError(f"no ONNX graph for cell {cell!r}")
    states = _state_names(cell)
    weights: list[Any] = []

    def const(name: str, array: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    node = helper.make_node
    nodes = [
        node("Transpose", ["ids"], ["ids_tb"], perm=[1, 0]),  # time-major, as CharRNN runs
        node("Gather", [const("embedding", _numpy(model.encoder.weight)), "ids_tb"], ["x0"]),
    ]  # x0 (T, B, E)
    per_layer = {s: [s] if L == 1 else [f"{s}_{k}" for k in range(L)] for s in states}
    if L > 1:
        nodes += [node("Split", [s], per_layer[s], axis=0) for s in states]  # (1, B, H) each
    squeeze_axis = const("axis_1", np.array([1], dtype=np.int64))
    attrs: dict[str, Any] = {"hidden_size": H}
    if cell == "gru":
        attrs["linear_before_reset"] = 1  # PyTorch applies the reset gate after the product
    x = "x0"
    for k in range(L):
        W, R, B = _layer_weights(model.rnn, k, cell)
        inputs = [x, const(f"W_{k}", W), const(f"R_{k}", R), const(f"B_{k}", B), ""]
        inputs += [per_layer[s][k] for s in states]  # initial_h (and initial_c)
        outputs = [f"y_{k}"] + [f"{s}_out_{k}" for s in states]
        nodes.append(node(_OPS[cell], inputs, outputs, name=f"layer_{k}", **attrs))
        # Y is (T, num_directions = 1, B, H): drop the direction axis for the next layer
        nodes.append(node("Squeeze", [f"y_{k}", squeeze_axis], [f"x{k + 1}"]))
        x = f"x{k + 1}"
    nodes += [
        node("Concat", [f"{s}_out_{k}" for k in range(L)], [f"{s}_out"], axis=0) for s in states
    ]
    fc_w = const("fc_weight_t", _numpy(model.fc.weight).T)  # (H, V)
    fc_b = const("fc_bias", _numpy(model.fc.bias))
    nodes += [
        node("MatMul", [x, fc_w], ["logits_tb_nobias"]),
        node("Add", ["logits_tb_nobias", fc_b], ["logits_tb"]),  # (T, B, V)
        node("Transpose", ["logits_tb"], ["logits"], perm=[1, 0, 2]),  # (B, T, V), as CharRNN
    ]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    state_shape = [L, "batch", H]
    graph = helper.make_graph(
        nodes,
        f"charlstm_{cell}_{L}x{H}",
        [helper.make_tensor_value_info("ids", i64, ["batch", "time"])]
        + [helper.make_tensor_value_info(s, f32, state_shape) for s in states],
        [helper.make_tensor_value_info("logits", f32, ["batch", "time", V])]
        + [helper.make_tensor_value_info(f"{s}_out", f32, state_shape) for s in states],
        weights,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="charlstm",
        producer_version=_version(),
        ir_version=IR_VERSION,
        doc_string=f"one step of a charlstm {cell.upper()} ({L} x {H}, vocabulary {V})",
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _version() -> str:
    try:
        return metadata.version("charlstm")
    except metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------ running the graph


def session(model_bytes: bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU for a serialized graph (bytes, so that no path in the
    file is followed). `threads` sets its intra-op threads (default: ONNX Runtime's choice)."""
    _, ort = _require()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings on stderr for a normal run
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class OnnxStep(torch.nn.Module):
    """An exported graph behind `CharRNN`'s interface, `(ids (B, T), state) → (logits (B, T, V),
    state)`, so that the generation engine and `TextModel` run it as they run the network (on the
    engine's reference path: one graph call per step). It holds no parameters."""

    def __init__(self, sess: Any, cell: str, num_layers: int, hidden_size: int, vocab: int):
        super().__init__()
        self.session = sess
        self.cell, self.num_layers, self.hidden_size, self.vocab_size = (
            cell,
            num_layers,
            hidden_size,
            vocab,
        )
        self.states = _state_names(cell)

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu") -> Hidden:
        shape = (self.num_layers, batch_size, self.hidden_size)
        return hidden_from_tensors([torch.zeros(shape) for _ in self.states], self.cell)

    def forward(
        self, idx: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        if hidden is None:
            hidden = self.init_hidden(idx.shape[0])
        feeds = {"ids": idx.detach().cpu().numpy().astype(np.int64, copy=False)}
        for name, t in zip(self.states, hidden_tensors(hidden)):
            feeds[name] = np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
        logits, *new = self.session.run(None, feeds)
        state = [torch.from_numpy(s) for s in new]
        return torch.from_numpy(logits), hidden_from_tensors(state, self.cell)


@torch.inference_mode()
def check_parity(model: CharRNN, step: OnnxStep, start: list[int], steps: int) -> float:
    """Feed `start` in one call, then `steps` greedy characters one at a time, through both the
    PyTorch model and the graph (each its own state); the largest difference of their logits."""
    x = torch.tensor([start], dtype=torch.long)
    ref_logits, ref_h = model(x)
    onnx_logits, onnx_h = step(x)
    worst = float((ref_logits - onnx_logits).abs().max())
    for _ in range(steps):
        x = ref_logits[:, -1:].argmax(-1)  # (1, 1): the reference's greedy choice feeds both
        ref_logits, ref_h = model(x, ref_h)
        onnx_logits, onnx_h = step(x, onnx_h)
        worst = max(worst, float((ref_logits - onnx_logits).abs().max()))
    return worst


# ------------------------------------------------------------------------------------- exporting


def export_onnx(
    run: str | Path | TextModel, out: str | Path, *, which: str = "best", force: bool = False
) -> dict[str, Any]:
    """Write `out`/model.onnx and `out`/model.json for RUN's `which` checkpoint (or a loaded
    `TextModel`; see the module docstring); returns their paths and the parity check's steps and
    largest logit difference.

    Refuses to replace an earlier export in `out` unless `force`. Each file is written atomically,
    the graph first: if writing stops between the two, the JSON's sha256 no longer matches the
    graph and `load_onnx` says so instead of running a mixture."""
    _require()
    out = Path(out)
    onnx_path, json_path = out / MODEL_FILE, out / META_FILE
    if not force and (onnx_path.exists() or json_path.exists()):
        raise UserError(
            f"--out {str(out)!r} already holds an ONNX export ({MODEL_FILE}, {META_FILE}); pass "
            "--force to replace it, or give another --out"
        )
    tm = run if isinstance(run, TextModel) else load(run, which=which, device="cpu")
    net = tm.model if tm.device.type == "cpu" else copy.deepcopy(tm.model).cpu()
    data = step_graph(net).SerializeToString()
    cfg = net.config
    step = OnnxStep(
        session(data, threads=1), cfg.cell, cfg.num_layers, cfg.hidden_size, len(tm.vocab)
    )
    start = tm.vocab.encode("".join(tm.vocab.chars[:16]))
    worst = check_parity(net, step, start, CHECK_STEPS)
    # fp32 differences are ~1e-6; anything near a logit's own size is a wrong graph, not rounding
    scale = max(1.0, float(net.fc.bias.detach().abs().max()))
    if not worst <= 1e-3 * scale:
        raise RuntimeError(f"the ONNX graph's logits differ from PyTorch's by {worst:g}")
    meta = _describe(tm, which, hashlib.sha256(data).hexdigest(), worst)
    try:
        atomic_write_bytes(onnx_path, data)
        atomic_write_text(json_path, json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    except OSError as exc:
        raise UserError(
            f"could not write {out} ({exc.strerror or exc}); free some disk space and export again"
        ) from None
    return {"onnx": onnx_path, "json": json_path, "check_steps": CHECK_STEPS, "max_abs_diff": worst}


def _describe(tm: TextModel, which: str, sha256: str, worst: float) -> dict[str, Any]:
    cfg = tm.model.config
    L, H, V = cfg.num_layers, cfg.hidden_size, len(tm.vocab)
    states = _state_names(cfg.cell)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": MODEL_FILE,
        "sha256": sha256,
        "opset": OPSET,
        "cell": cfg.cell,
        "num_layers": L,
        "hidden_size": H,
        "embedding_size": cfg.embedding_size,
        "vocab_size": V,
        "vocabulary": tm.vocab.to_list(),
        "inputs": {"ids": ["batch", "time"], **{s: [L, "batch", H] for s in states}},
        "outputs": {
            "logits": ["batch", "time", V],
            **{f"{s}_out": [L, "batch", H] for s in states},
        },
        "sampling": SAMPLING_DEFAULTS,
        "source": {
            "run": tm.name,
            "checkpoint": which,
            "step": tm.meta.get("step"),
            "charlstm": _version(),
        },
        "metrics": tm.meta.get("metrics") or {},
        "check": {"steps": CHECK_STEPS, "max_abs_diff": worst},
    }


# --------------------------------------------------------------------------------------- loading


def load_onnx(path: str | Path, *, which: str = "best", threads: int | None = 1) -> TextModel:
    """A `TextModel` that runs its network through ONNX Runtime, from an export folder (model.json
    and model.onnx) or, for a run folder or checkpoint file, from a graph built in memory.

    One intra-op thread by default: a step of one stream is too small to share among threads."""
    _require()
    path = Path(path)
    if (path / META_FILE).is_file() or (path / MODEL_FILE).is_file():
        meta, data = _read_export(path)
        vocab = Vocabulary.from_list(meta["vocabulary"])
        cell, L, H = meta["cell"], meta["num_layers"], meta["hidden_size"]
    else:
        tm = load(path, which=which, device="cpu")
        data = step_graph(tm.model).SerializeToString()
        meta, vocab, path = tm.meta, tm.vocab, tm.path
        cell, L, H = tm.model.config.cell, tm.model.config.num_layers, tm.model.config.hidden_size
    try:
        sess = session(data, threads)
    except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime refuses, the export is bad
        raise _invalid(path, str(exc).splitlines()[0][:200]) from None
    _check_signature(path, sess, cell, L, H, len(vocab))
    step = OnnxStep(sess, cell, L, H, len(vocab))
    return TextModel(step, vocab, meta, path, torch.device("cpu"))


def _invalid(path: Path, reason: str) -> UserError:
    return UserError(
        f"{path} is not a valid charlstm ONNX export ({reason}); export it again with "
        "charlstm export RUN --format onnx --out DIR"
    )


def _read_export(path: Path) -> tuple[dict[str, Any], bytes]:
    """model.json, validated, and the bytes of model.onnx, checked against its sha256."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        data = (path / MODEL_FILE).read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(path, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _invalid(path, f"{META_FILE} is not a {FORMAT} file")
    if meta.get("version") != FORMAT_VERSION:
        raise _invalid(path, f"format version {meta.get('version')!r}, expected {FORMAT_VERSION}")
    vocab = meta.get("vocabulary")
    sizes = [meta.get(k) for k in ("num_layers", "hidden_size")]
    if (
        meta.get("cell") not in _CELLS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        or not isinstance(vocab, list)
        or not vocab
        or not all(isinstance(c, str) and len(c) == 1 for c in vocab)
        or len(set(vocab)) != len(vocab)
    ):
        raise _invalid(path, f"{META_FILE} lacks a valid cell, size or vocabulary")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise _invalid(path, f"{MODEL_FILE} does not match the sha256 in {META_FILE}")
    return meta, data


def _check_signature(path: Path, sess: Any, cell: str, L: int, H: int, V: int) -> None:
    """The session's inputs and outputs are the ones this module writes, with these sizes."""
    states = _state_names(cell)
    want_in = {"ids": ["batch", "time"], **{s: [L, "batch", H] for s in states}}
    want_out = {"logits": ["batch", "time", V], **{f"{s}_out": [L, "batch", H] for s in states}}
    got_in = {i.name: list(i.shape) for i in sess.get_inputs()}
    got_out = {o.name: list(o.shape) for o in sess.get_outputs()}
    if got_in != want_in or got_out != want_out:
        raise _invalid(
            path, f"the graph's inputs and outputs are not those of a {cell} of this size"
        )
