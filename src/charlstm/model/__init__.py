"""The network and what is computed with it alone: the loss of a text (evaluation).

`CharRNN` is a plain `nn.Module`: no optimizer, vocabulary or file I/O inside (see network.py).
"""

from charlstm.model.dropout import Dropout, dropout
from charlstm.model.network import (
    CharRNN,
    Hidden,
    count_parameters,
    detach_hidden,
    hidden_from_tensors,
    hidden_tensors,
    parameter_shapes,
)

__all__ = [
    "CharRNN",
    "Dropout",
    "Hidden",
    "count_parameters",
    "detach_hidden",
    "dropout",
    "hidden_from_tensors",
    "hidden_tensors",
    "parameter_shapes",
]
