"""A run's text, ready to train on: the vocabulary and the encoded training and validation ids.

`prepare_data` is the one place a configuration's data section (a named dataset, a text file, or a
corpus made by `charlstm prepare`) becomes arrays of ids; training (and its evaluations), the
report, the comparison, the tuner and `charlstm bench train` all start from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from charlstm.config import RunConfig
from charlstm.data.corpus import load_corpus, split_text
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError


@dataclass
class PreparedData:
    vocab: Vocabulary
    train_ids: np.ndarray  # a numpy.memmap view for a corpus made by `charlstm prepare`
    val_ids: np.ndarray
    source: str
    _train_text: str | None = field(default=None, repr=False)

    @property
    def train_text(self) -> str:
        """The training text (for analysis); decoded from the ids on first use when the corpus was
        prepared on disk, since training itself never needs it as a string."""
        if self._train_text is None:
            from charlstm.data.prepared import decode_ids

            self._train_text = decode_ids(self.vocab, self.train_ids)
        return self._train_text


def prepare_data(config: RunConfig, vocab: Vocabulary | None = None) -> PreparedData:
    """Read the corpus, split it, and encode it with `vocab` (built from the whole text if None).
    A prepared corpus (`data.prepared`) is memory-mapped instead: no string of it is ever built."""
    d = config.data
    if d.prepared:
        from charlstm.data.prepared import load_split

        return PreparedData(*load_split(d.prepared, d.val_fraction, vocab))
    text, source = load_corpus(d.dataset, d.text, d.encoding)
    train_text, val_text = split_text(text, d.val_fraction)
    if vocab is None:
        vocab = Vocabulary.from_text(text)
    elif vocab.unknown(text):
        missing = "".join(vocab.unknown(text)[:20])
        raise UserError(
            f"the text {source} has characters the run's vocabulary lacks ({missing!r}); a run can "
            "only resume on the text it was trained on: train a new run "
            "(or fine-tune with --init-from)"
        )
    return PreparedData(
        vocab, vocab.encode_array(train_text), vocab.encode_array(val_text), source, train_text
    )
