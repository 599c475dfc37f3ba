"""The network: Embedding → recurrent layers → Dropout → Linear, as in the lab.

The lab names its parts ``encoder`` (the embedding), ``lstm``, ``dropout`` and ``fc``; we keep
``encoder``, ``dropout`` and ``fc`` and call the recurrent part ``rnn`` because ``--cell`` may make it a
GRU or a plain RNN for comparison. The module is plain: no optimizer, vocabulary or file I/O inside.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.func import functional_call

from charlstm.config import ModelConfig

# An LSTM's state is (h, c); a GRU's or plain RNN's is h alone.
Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set from the vocabulary")
        self.config = config
        self.encoder = nn.Embedding(config.vocab_size, config.embedding_size)
        self.embedding_dropout = Dropout(config.embedding_dropout, locked=config.locked_dropout)
        self.rnn = _CELLS[config.cell](
            config.embedding_size,
            config.hidden_size,
            config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )  # time-major (T, B, ·): see forward
        self.dropout = Dropout(config.dropout, locked=config.locked_dropout)
        self.fc = nn.Linear(config.hidden_size, config.vocab_size)

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu") -> Hidden:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        h = torch.zeros(shape, device=device)
        if self.config.cell == "lstm":
            return (h, torch.zeros(shape, device=device))
        return h

    def forward(self, idx: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """idx (B, T) of character indices → logits (B, T, V) and the new hidden state.

        Inside, everything runs time-major, (T, B, ·), the layout PyTorch's LSTM kernels (oneDNN on
        the CPU, cuDNN) work in: with batch_first=True PyTorch transposes the input and the output
        of the recurrent layers, forward and backward, four copies of a (B, T, H) tensor a step
        (for a 1 × 512 LSTM at 128 × 64, ~4% of the step). Transposing the ids and the logits
        instead costs next to nothing: the logits come back as a (B, T, V) view."""
        x = self.embedding_dropout(self.encoder(idx.t()))  # (T, B, E)
        if self.training and self.config.weight_drop > 0:
            # DropConnect on the recurrent weights (AWD-LSTM): one mask per forward pass, shared by
            # every time step, so the recurrence itself is regularised, not just its inputs.
            dropped = {name: dropout(w, self.config.weight_drop)
                       for name, w in self.rnn.named_parameters() if name.startswith("weight_hh")}
            out, hidden = functional_call(self.rnn, dropped, (x, hidden), strict=False)
        else:
            out, hidden = self.rnn(x, hidden)  # (T, B, H)
        logits = self.fc(self.dropout(out))  # (T, B, V)
        return logits.transpose(0, 1), hidden


class Dropout(nn.Module):
    """`nn.Dropout` with a mask that costs a third as much on the CPU.

    PyTorch's CPU dropout draws one Bernoulli variable per element through `bernoulli_`, about 7 ns
    each: for a 1 × 512 LSTM's output at batch 128 × 64 that was 30 ms of a 170 ms training step.
    Here each element gets 16 random bits, three elements to one 64-bit draw, and is kept when
    they are at or above p·2¹⁶: the same distribution with p rounded to a multiple of 2⁻¹⁶ (the
    scale uses the rounded p, so the expectation is exact), for about a third of the time.

    `locked`: the input is time-major (T, B, F) and one mask of (1, B, F) serves every time step
    (variational or "locked" dropout, Gal & Ghahramani 2016, used by AWD-LSTM): a feature dropped
    for a sequence stays dropped along it, and the mask costs 1/T as much."""

    def __init__(self, p: float, locked: bool = False) -> None:
        super().__init__()
        self.p = p
        self.locked = locked

    def extra_repr(self) -> str:
        return f"p={self.p}, locked={self.locked}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return dropout(x, self.p, mask_shape=(1, *x.shape[1:]) if self.locked else None)


def dropout(x: torch.Tensor, p: float, mask_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """`F.dropout(x, p)` in training mode, with `Dropout`'s cheaper mask; `mask_shape` (which must
    broadcast to x) shares one mask value along the dimensions where it is 1."""
    dropped = min(round(p * 65536), 65535)  # how many of the 2¹⁶ values drop an element
    if dropped == 0:
        return x
    shape = x.shape if mask_shape is None else torch.Size(mask_shape)
    n = shape.numel()
    lanes = _random_int16(n, x.device)  # (⌈n/3⌉, 3), a strided view
    keep = (lanes >= dropped - 32768).view(-1)[:n].view(shape)
    return x * (keep.to(x.dtype) * (65536 / (65536 - dropped)))


# The 16-bit lanes of an int64 that random_(0, 2⁴⁸) fills: the low three (little-endian memory
# order puts them first; big-endian last).
_LANES = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)


def _random_int16(n: int, device: torch.device) -> torch.Tensor:
    """At least n uniform int16 values, (⌈n/3⌉, 3), from PyTorch's generator (so seeds and resumes
    govern them)."""
    words = torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_(0, 1 << 48)
    return words.view(torch.int16).view(-1, 4)[:, _LANES]


def detach_hidden(hidden: Hidden | None) -> Hidden | None:
    """Cut the graph between windows: without it, backward would run through every window since the
    start of the epoch, and memory and time would grow without bound."""
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)  # type: ignore[return-value]
    return hidden.detach()


def hidden_tensors(hidden: Hidden) -> list[torch.Tensor]:
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


def hidden_from_tensors(tensors: list[torch.Tensor], cell: str) -> Hidden:
    return (tensors[0], tensors[1]) if cell == "lstm" else tensors[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
