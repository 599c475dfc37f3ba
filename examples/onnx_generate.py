"""Generate text from a charlstm ONNX export with nothing but onnxruntime and numpy (no charlstm, no
PyTorch): the loop any other program would write.

    charlstm export runs/byron --format onnx --out byron-onnx
    python examples/onnx_generate.py byron-onnx --start-text "Мне " --length 300 --temperature 0.5

model.json gives the vocabulary (id i is the character vocabulary[i]), the state's shape and the
sampling defaults; model.onnx takes ids (batch, time) and the state, and returns the logits
(batch, time, vocabulary) and the new state. The whole start text goes in one call; then one
character per call. Temperature 0 is greedy, which gives the same text as `charlstm generate
--temperature 0`; other temperatures draw from numpy's generator, not charlstm's, so the same seed
gives other text than charlstm does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def generate(folder, start_text=None, length=None, temperature=None, seed=0, threads=1):
    folder = Path(folder)
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    defaults = meta["sampling"]
    start_text = defaults["start_text"] if start_text is None else start_text
    length = defaults["length"] if length is None else length
    temperature = defaults["temperature"] if temperature is None else temperature
    vocab = meta["vocabulary"]
    index = {c: i for i, c in enumerate(vocab)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # one stream's step is too small to share among threads
    session = ort.InferenceSession(
        str(folder / meta["model"]), options, providers=["CPUExecutionProvider"]
    )

    states = [name for name in meta["inputs"] if name != "ids"]  # "h", and "c" for an LSTM
    feeds = {s: np.zeros((meta["num_layers"], 1, meta["hidden_size"]), np.float32) for s in states}
    known = [
        index[c] for c in start_text if c in index
    ]  # characters the model never saw are dropped
    if not known:
        raise SystemExit("the start text has no character the model knows; give another one")
    feeds["ids"] = np.array([known], dtype=np.int64)
    rng = np.random.default_rng(seed)
    text = []
    for _ in range(length):
        logits, *new = session.run(["logits", *[s + "_out" for s in states]], feeds)
        feeds.update(zip(states, new))
        z = logits[0, -1].astype(np.float64)  # the next character's logits
        if temperature == 0:
            i = int(z.argmax())
        else:
            p = np.exp((z - z.max()) / temperature)
            i = int(rng.choice(len(p), p=p / p.sum()))
        text.append(vocab[i])
        feeds["ids"] = np.array([[i]], dtype=np.int64)
    return start_text + "".join(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by `charlstm export RUN --format onnx`")
    parser.add_argument("--start-text")
    parser.add_argument("--length", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(
        generate(
            args.folder, args.start_text, args.length, args.temperature, args.seed, args.threads
        )
    )
