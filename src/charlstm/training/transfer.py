"""Transfer: start a run from another run's weights, freeze its lower layers, or pre-train first.

A small corpus (Byron's 12 k characters) cannot teach a network Russian spelling and verse on its
own; a larger one in the same language (Pushkin's "Eugene Onegin") can. Fine-tuning copies every
weight of the pre-trained run into the new model. The two texts rarely share exactly the same
characters, so the new run's vocabulary is the union: the pre-trained characters keep their indices
(and so their embedding and output rows), characters only the new text has are appended and keep the
fresh rows the new model was initialised with.

``freeze_layers = K`` stops the embedding and the lowest K recurrent layers from learning: the
general features stay as pre-training left them and only the upper layers and the output adapt. New
characters' embedding rows are frozen too, at their fresh random values: they stay distinct vectors
that the trainable layers above learn to read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from charlstm.config import RunConfig
from charlstm.data.corpus import load_documents
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.runs.checkpoint import read_checkpoint
from charlstm.runs.folder import find_checkpoint

# The model fields that decide the weights' shapes; dropouts and weight drop may change freely.
ARCHITECTURE = ("cell", "embedding_size", "hidden_size", "num_layers")


@dataclass
class Source:
    """The pre-trained run a new run starts from."""

    path: Path
    vocab: Vocabulary
    state: dict[str, torch.Tensor]
    architecture: dict[str, object]


def read_source(init_from: str | Path, which: str = "best") -> Source:
    """Read the checkpoint of a run folder (its best weights by default) or a checkpoint file."""
    path = find_checkpoint(init_from, prefer=which)
    ck = read_checkpoint(path)
    mc = ck.model_config
    return Source(path, ck.vocab, ck.model_state(), {k: getattr(mc, k) for k in ARCHITECTURE})


def adopt_architecture(
    config: RunConfig, source: Source, explicit: set[str] = frozenset()
) -> RunConfig:
    """`config` with the source's architecture. A field in `explicit` (given by the user) that
    disagrees with the source is an error rather than silently replaced."""
    clash = [
        k
        for k in ARCHITECTURE
        if k in explicit and getattr(config.model, k) != source.architecture[k]
    ]
    if clash:
        have = ", ".join(f"{k}={source.architecture[k]}" for k in clash)
        raise UserError(
            f"--init-from {source.path} has {have}; a fine-tuned model keeps the shape of "
            "the one it starts from: drop those options"
        )
    return config.replace(**source.architecture)


def check_architecture(config: RunConfig, source: Source) -> None:
    wrong = [k for k in ARCHITECTURE if getattr(config.model, k) != source.architecture[k]]
    if wrong:
        detail = ", ".join(
            f"{k} {getattr(config.model, k)} vs {source.architecture[k]}" for k in wrong
        )
        raise UserError(
            f"the model does not have the shape of --init-from {source.path} ({detail}); "
            "leave the architecture options out to take the pre-trained run's"
        )


def union_vocabulary(config: RunConfig, source: Source, text: str | None = None) -> Vocabulary:
    """The pre-trained vocabulary followed by the characters only the new text has (`text`, or
    the run's text read now)."""
    if text is None:
        d = config.data
        text = load_documents(d.dataset, d.text, d.encoding, skip_bad_files=d.skip_bad_files).text
    return source.vocab.union(Vocabulary.from_text(text))


def initialise(
    model: nn.Module, vocab: Vocabulary, source: Source, log: Callable[[str], None] | None = None
) -> int:
    """Copy the source's weights into `model`, built for `vocab`; returns the new characters' count.

    Every tensor but the embedding and the output layer has the same shape in both models and is
    copied whole; those two are copied row by row, matched by character.
    """
    state = model.state_dict()
    if set(state) != set(source.state):
        raise UserError(
            f"{source.path} holds different weights than this model "
            f"({sorted(set(state) ^ set(source.state))[:3]})"
        )
    rows = [
        (i, source.vocab.char_to_idx[c]) for i, c in enumerate(vocab.chars) if c in source.vocab
    ]
    new_idx = torch.tensor([i for i, _ in rows], dtype=torch.long)
    old_idx = torch.tensor([j for _, j in rows], dtype=torch.long)
    by_char = {"encoder.weight", "fc.weight", "fc.bias"}  # (V, E), (V, H), (V,)
    with torch.no_grad():
        for name, tensor in state.items():
            src = source.state[name].to(tensor.dtype)
            if name in by_char:
                tensor[new_idx] = src[old_idx]
            elif src.shape != tensor.shape:
                raise UserError(
                    f"{source.path}: weight {name} has shape {tuple(src.shape)}, this "
                    f"model's has {tuple(tensor.shape)}"
                )
            else:
                tensor.copy_(src)
        if len(rows) < len(vocab):
            # A fresh output row would give an unseen character as much probability as a common
            # one; start new characters at the rarest known character's bias instead.
            fresh = torch.tensor([i for i, c in enumerate(vocab.chars) if c not in source.vocab])
            state["fc.bias"][fresh] = source.state["fc.bias"].min().to(state["fc.bias"].dtype)
    model.load_state_dict(state)
    added = len(vocab) - len(rows)
    if log:
        shown = "".join(c for c in vocab.chars if c not in source.vocab)[:20]
        log(
            f"charlstm: initialised from {source.path}: {len(rows)} characters keep their rows"
            + (f", {added} new ({shown!r}) get fresh ones" if added else "")
        )
    return added


_LAYER = re.compile(r"_l(\d+)(?:_reverse)?$")


def freeze(model: nn.Module, layers: int) -> list[str]:
    """Stop the embedding and the lowest `layers` recurrent layers learning; returns their names.

    A frozen weight has no gradient, so Adam leaves it exactly as it is (no moments, no decay).
    """
    if layers <= 0:
        return []
    frozen = []
    for name, p in model.named_parameters():
        match = _LAYER.search(name) if name.startswith("rnn.") else None
        if name.startswith("encoder.") or (match and int(match[1]) < layers):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
