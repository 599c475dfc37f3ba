"""A run's text, ready to train on: the vocabulary and the encoded training, validation and test
ids, with where each part's documents start.

`prepare_data` is the one place a configuration's data section (a named dataset, text files, or a
corpus made by `charlstm prepare`) becomes arrays of ids; training (and its evaluations), the
report, the comparison, the tuner, `charlstm evaluate` and `charlstm bench train` all start from it,
so every one of them cuts the same splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from charlstm.config import RunConfig
from charlstm.data.corpus import Corpus, load_documents, one_document, part_starts, split_points
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError


@dataclass
class PreparedData:
    vocab: Vocabulary
    train_ids: np.ndarray  # a numpy.memmap view for a corpus made by `charlstm prepare`
    val_ids: np.ndarray
    source: str
    _train_text: str | None = field(default=None, repr=False)
    # Where each part's documents (files) start in its ids; [0] when the text is one document.
    train_starts: np.ndarray = field(default_factory=one_document)
    val_starts: np.ndarray = field(default_factory=one_document)
    test_ids: np.ndarray | None = None  # the held-out test split (`test_fraction`), if any
    test_starts: np.ndarray = field(default_factory=one_document)

    @property
    def train_text(self) -> str:
        """The training text (for analysis); decoded from the ids on first use when the corpus was
        prepared on disk, since training itself never needs it as a string."""
        if self._train_text is None:
            from charlstm.data.prepared import decode_ids

            self._train_text = decode_ids(self.vocab, self.train_ids)
        return self._train_text

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, document starts) of the "validation" or "test" split."""
        if which == "test":
            if self.test_ids is None:
                raise _no_test_split()
            return self.test_ids, self.test_starts
        return self.val_ids, self.val_starts


def prepare_data(
    config: RunConfig, vocab: Vocabulary | None = None, loaded: Corpus | None = None
) -> PreparedData:
    """Read the corpus (or take `loaded`, `load_documents`' reading of it already made), split it,
    and encode it with `vocab` (built from the whole text if None). A prepared corpus
    (`data.prepared`) is memory-mapped instead: no string of it is ever built.

    The last `test_fraction` of the characters is the test split, the `val_fraction` before it
    validation, the rest training; a cut may fall inside a document, whose two pieces then belong
    to their parts (each part's document starts are its own)."""
    d = config.data
    if d.prepared:
        from charlstm.data.prepared import open_prepared

        corpus = open_prepared(d.prepared)
        if vocab is not None and vocab != corpus.vocab:
            raise UserError(
                f"the prepared corpus {str(d.prepared)!r} was encoded with a different vocabulary "
                "than the run's; a run continues on the corpus it was trained on: train a new run "
                "from it"
            )
        vocab, ids, starts = corpus.vocab, corpus.ids, corpus.starts
        source, train_text = f"{corpus.meta['source']} (prepared in {d.prepared})", None
        cut, val_end = split_points(len(ids), d.val_fraction, d.test_fraction)
    else:
        if loaded is None:
            loaded = load_documents(d.dataset, d.text, d.encoding, skip_bad_files=d.skip_bad_files)
        text, starts, source = loaded.text, loaded.starts, loaded.source
        if vocab is None:
            vocab = Vocabulary.from_text(text)
        elif vocab.unknown(text):
            missing = "".join(vocab.unknown(text)[:20])
            raise UserError(
                f"the text {source} has characters the run's vocabulary lacks ({missing!r}); a run "
                "can only resume on the text it was trained on: train a new run "
                "(or fine-tune with --init-from)"
            )
        cut, val_end = split_points(len(text), d.val_fraction, d.test_fraction)
        ids, train_text = vocab.encode_array(text), text[:cut]
    test = ids[val_end:] if val_end < len(ids) else None
    return PreparedData(
        vocab,
        ids[:cut],
        ids[cut:val_end],
        source,
        train_text,
        train_starts=part_starts(starts, 0, cut),
        val_starts=part_starts(starts, cut, val_end),
        test_ids=test,
        test_starts=part_starts(starts, val_end, len(ids)),
    )


SPLITS = ("validation", "test")


def held_out(
    config: RunConfig, which: str, vocab: Vocabulary, unknown: str = "error"
) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, document starts, label) of a run's "validation" or "test" split, cut exactly where
    training cut it (`prepare_data`): what `charlstm evaluate RUN` measures.

    Only that split is encoded, with the run's `vocab`; `unknown="skip"` leaves out characters it
    lacks (a text edited since), each document shrinking on its own so that its start stays true.
    """
    if which not in SPLITS:
        raise UserError(f"the split must be one of {', '.join(SPLITS)}, got {which!r}")
    d = config.data
    if d.prepared:
        ids, starts = prepare_data(config, vocab).split(which)  # views of the memory map
        return ids, starts, f"{d.prepared} ({which} split)"
    loaded = load_documents(d.dataset, d.text, d.encoding, skip_bad_files=d.skip_bad_files)
    cut, val_end = split_points(len(loaded.text), d.val_fraction, d.test_fraction)
    begin, end = (cut, val_end) if which == "validation" else (val_end, len(loaded.text))
    if which == "test" and begin == end:
        raise _no_test_split()
    part, rel = loaded.text[begin:end], part_starts(loaded.starts, begin, end)
    ids, starts = vocab.encode_documents(documents(part, rel), unknown)
    return ids, starts, f"{loaded.source} ({which} split)"


def documents(text: str, starts: np.ndarray) -> list[str]:
    """`text` cut where its documents start."""
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _no_test_split() -> UserError:
    return UserError(
        "the run has no test split; train with --test-fraction (e.g. 0.1) to hold one out"
    )
