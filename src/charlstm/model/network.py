"""The network: Embedding → recurrent layers → Dropout → Linear, as in the lab.

The lab names its parts ``encoder`` (the embedding), ``lstm``, ``dropout`` and ``fc``; we keep
``encoder``, ``dropout`` and ``fc`` and call the recurrent part ``rnn`` because ``--cell`` may make
it a GRU or a plain RNN for comparison. The module is plain: no optimizer, vocabulary or file I/O
inside.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from charlstm.config import ModelConfig
from charlstm.model.dropout import Dropout, dropout

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

    def forward(
        self, idx: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, Hidden]:
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
            dropped = {
                name: dropout(w, self.config.weight_drop)
                for name, w in self.rnn.named_parameters()
                if name.startswith("weight_hh")
            }
            out, hidden = functional_call(self.rnn, dropped, (x, hidden), strict=False)
        else:
            out, hidden = self.rnn(x, hidden)  # (T, B, H)
        logits = self.fc(self.dropout(out))  # (T, B, V)
        return logits.transpose(0, 1), hidden


# Gates a cell's weights stack: input, forget, cell and output for an LSTM; reset, update and new
# for a GRU; one for a plain RNN (PyTorch's layout).
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in `CharRNN(config)`'s state, by arithmetic.

    A checkpoint's header is checked against these before anything is built. Building the model
    on PyTorch's meta device would allocate nothing either, but its first use imports
    torch._dynamo (about a second on a 2-core machine) in every command that opens a checkpoint;
    building it for real would let a header that claims a huge width take the memory it claims.
    `tests/test_model.py` holds this to the real module's state for every cell."""
    v, e, h = config.vocab_size, config.embedding_size, config.hidden_size
    gates = _GATES[config.cell] * h
    shapes: dict[str, tuple[int, ...]] = {"encoder.weight": (v, e)}
    for layer in range(config.num_layers):
        shapes[f"rnn.weight_ih_l{layer}"] = (gates, e if layer == 0 else h)
        shapes[f"rnn.weight_hh_l{layer}"] = (gates, h)
        shapes[f"rnn.bias_ih_l{layer}"] = (gates,)
        shapes[f"rnn.bias_hh_l{layer}"] = (gates,)
    shapes["fc.weight"] = (v, h)
    shapes["fc.bias"] = (v,)
    return shapes


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
