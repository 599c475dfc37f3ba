"""A trained model loaded from a run folder, ready to generate and evaluate.

`load` reads a checkpoint (never unpickling) and rebuilds the network and its vocabulary from the
file alone; `TextModel` wraps them with the generation and evaluation calls that the CLI, the
server, the report and the Python API share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from charlstm.config import TrainConfig
from charlstm.data.corpus import normalise_newlines
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.generate.engine import generate_stream
from charlstm.generate.sampling import SamplingParams, StopRule, stream_seeds
from charlstm.hardware import pick_device
from charlstm.model import CharRNN
from charlstm.model.evaluation import evaluate_ids, loss_metrics, streams_for
from charlstm.runs.checkpoint import read_checkpoint
from charlstm.runs.folder import find_checkpoint, run_dir_of


class TextModel:
    """A trained model with its vocabulary, ready to generate and evaluate."""

    def __init__(
        self,
        model: CharRNN,
        vocab: Vocabulary,
        meta: dict[str, Any],
        path: Path,
        device: torch.device,
    ) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.meta = meta
        self.path = path
        self.device = device

    @property
    def name(self) -> str:
        run_dir = run_dir_of(self.path)
        return run_dir.name if run_dir is not None else self.path.stem

    @property
    def val_loss(self) -> float | None:
        v = (self.meta.get("metrics") or {}).get("val_loss")
        return v if isinstance(v, float) and math.isfinite(v) else None

    def _prompts(
        self, start_text: str | Sequence[str], num_samples: int, unknown: str
    ) -> list[list[int]]:
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        texts = [start_text] * num_samples if isinstance(start_text, str) else list(start_text)
        if not texts or any(not t for t in texts):
            raise UserError("start_text must not be empty; the lab's default is a single space ' '")
        prompts = [self.vocab.encode(normalise_newlines(t), unknown=unknown) for t in texts]
        if any(not p for p in prompts):
            raise UserError(
                "the start text has no character the model knows; give another start text"
            )
        return prompts

    def stream(
        self,
        start_text: str | Sequence[str] = " ",
        length: int = 200,
        temperature: float = 0.3,
        top_k: int | None = None,
        top_p: float | None = None,
        num_samples: int = 1,
        seed: int | None = None,
        *,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        max_lines: int | None = None,
        max_stanzas: int | None = None,
        unknown: str = "error",
        seeds: Sequence[int] | None = None,
    ) -> Iterator[dict[int, str]]:
        """Yield {stream index: new text} as characters are produced.

        The first item holds each stream's start text (after dropping unknown characters)."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        rule = StopRule(tuple(stop), max_lines, max_stanzas)
        prompts = self._prompts(start_text, num_samples, unknown)
        if seeds is not None:
            import numpy as np

            if len(seeds) != len(prompts):
                raise UserError("give one seed per stream")
            stream_seed_arr = np.concatenate([stream_seeds(s, 1) for s in seeds])
        else:
            stream_seed_arr = stream_seeds(seed, len(prompts))
        yield {i: self.vocab.decode(p) for i, p in enumerate(prompts)}
        for outputs in generate_stream(
            self.model,
            prompts,
            length,
            params,
            stream_seed_arr,
            self.vocab.decode,
            rule,
            self.device,
        ):
            texts = {i: o.text for i, o in outputs.items() if o.text}
            if texts:
                yield texts

    def generate(
        self,
        start_text: str | Sequence[str] = " ",
        length: int = 200,
        temperature: float = 0.3,
        top_k: int | None = None,
        top_p: float | None = None,
        num_samples: int = 1,
        seed: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """`num_samples` texts, each the start text then up to `length` generated characters."""
        n = num_samples if isinstance(start_text, str) else len(start_text)
        out = [""] * n
        for texts in self.stream(
            start_text, length, temperature, top_k, top_p, num_samples, seed, **kwargs
        ):
            for i, t in texts.items():
                out[i] += t
        return out

    def evaluate(self, text: str | Sequence[str], unknown: str = "error") -> dict[str, float]:
        """Loss (nats/char), bits/char and perplexity of `text`, with carried state. A list of
        texts is one corpus of documents: no context crosses from one into the next, and the
        prediction of a document's first character is left out, as training reads its splits."""
        texts = [text] if isinstance(text, str) else list(text)
        ids, starts = self.vocab.encode_documents(
            [normalise_newlines(t) for t in texts], unknown=unknown
        )
        if len(ids) < 2:
            raise UserError("the text to evaluate needs at least 2 known characters")
        streams = streams_for(len(ids), TrainConfig().eval_streams)  # as `charlstm evaluate RUN`
        loss = evaluate_ids(self.model, ids, n_streams=streams, device=self.device, starts=starts)
        return {**loss_metrics(loss), "characters": len(ids)}


def load(run: str | Path, which: str = "best", device: str = "auto") -> TextModel:
    """Load a run folder (its best checkpoint by default) or a checkpoint file."""
    path = find_checkpoint(run, prefer=which)
    ck = read_checkpoint(path)
    dev = pick_device(device)
    model = CharRNN(ck.model_config)
    model.load_state_dict(ck.model_state())
    return TextModel(model.to(dev), ck.vocab, ck.meta, path, dev)
