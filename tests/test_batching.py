"""Batchers: shapes, target = input shifted by one, ids in range, contiguous streams, resumable."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlstm.data.batching import (
    IGNORE,
    DocumentStreamBatcher,
    RandomBatcher,
    StreamBatcher,
    eval_streams,
    make_batcher,
)
from charlstm.errors import UserError


def _ids(n, v=13, seed=0):
    return np.random.default_rng(seed).integers(0, v, size=n).astype(np.uint8)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(200, 2000), B=st.integers(1, 6), T=st.integers(1, 20))
def test_stream_batches_are_contiguous_and_shifted(n, B, T):
    """Each row continues exactly where the same row of the previous window ended."""
    ids = np.arange(n) % 251  # position-revealing ids
    if n < B * T + T + 1:
        return
    batcher = StreamBatcher(ids.astype(np.int64), B, T, seed=1)
    prev = None
    for _ in range(3 * batcher.windows_per_epoch + 2):
        b = batcher.next()
        assert b.x.shape == (B, T) and b.y.shape == (B, T)
        assert torch.equal(b.x[:, 1:], b.y[:, :-1])
        if prev is not None and not b.reset:
            # next window's first input is previous window's last target
            assert torch.equal(b.x[:, 0], prev.y[:, -1])
        prev = b


def test_stream_batches_only_reset_at_epoch_start():
    batcher = StreamBatcher(_ids(1000), 4, 10, seed=0)
    resets = [batcher.next().reset for _ in range(3 * batcher.windows_per_epoch)]
    assert resets[0] and sum(resets) == 3


def test_random_batches_shapes_and_range():
    ids = _ids(500, v=7)
    b = RandomBatcher(ids, 8, 32, seed=0).next()
    assert b.x.shape == (8, 32) and b.reset
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])
    assert int(b.x.max()) < 7 and int(b.x.min()) >= 0


@pytest.mark.parametrize("cls", [StreamBatcher, RandomBatcher])
def test_state_dict_resumes_the_same_batches(cls):
    """A batcher restored from its state yields exactly the batches the original would have."""
    a = cls(_ids(3000), 4, 16, seed=3)
    for _ in range(57):
        a.next()
    b = cls(_ids(3000), 4, 16, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(100):
        x, y = a.next(), b.next()
        assert torch.equal(x.x, y.x) and x.reset == y.reset


def test_short_corpus_says_how_long_it_must_be():
    with pytest.raises(UserError, match=r"needs at least 1,089"):
        StreamBatcher(_ids(300), 16, 64)


def test_eval_streams_cover_every_prediction_once():
    ids = np.arange(1001)
    x, y = eval_streams(ids, 8)
    mask = y != -100
    assert int(mask.sum()) == 1000
    assert sorted(y[mask].tolist()) == list(range(1, 1001))
    assert torch.equal(y[mask], x[mask] + 1)


# ------------------------------------------------------------------------------- many documents

STARTS = np.array([0, 40, 41, 43, 150, 151, 300, 333, 600])  # a 1-character and short documents
N_IDS = 700


def _doc_of(pos):
    return np.searchsorted(STARTS, pos, side="right") - 1


def _check_inside_documents(b):
    """Every target continues its input inside one document; padded targets are ignored."""
    x, y = b.x.numpy(), b.y.numpy()
    valid = y != IGNORE
    assert (y[valid] == x[valid] + 1).all()  # position-revealing ids: the next position
    assert (_doc_of(x[valid]) == _doc_of(y[valid])).all()  # ... of the same document
    # padding only at the end of a row's window
    assert all((~v[np.argmin(v) :]).all() for v in valid if not v.all())


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 40), seed=st.integers(0, 3))
def test_document_windows_never_cross_a_boundary(B, T, seed):
    """Stream batching over documents: no (input, target) pair spans two documents, a row's state
    is reset exactly where its window starts a document, and otherwise it continues the row's
    previous window; an epoch uses every prediction at most once, and all but fewer than B
    windows of them."""
    batcher = make_batcher("stream", np.arange(N_IDS), B, T, seed, starts=STARTS)
    assert isinstance(batcher, DocumentStreamBatcher)
    for _ in range(2):
        seen, prev = [], None
        for w in range(batcher.windows_per_epoch):
            b = batcher.next()
            _check_inside_documents(b)
            first_is_start = torch.from_numpy(np.isin(b.x[:, 0].numpy(), STARTS))
            if w == 0:
                assert b.reset
            else:
                resets = b.reset_rows if b.reset_rows is not None else torch.zeros(B, dtype=bool)
                assert torch.equal(resets, first_is_start)
                last = prev.y.numpy()
                for r in np.flatnonzero(~resets.numpy()):  # continues its previous window
                    assert b.x[r, 0] == last[r][last[r] != IGNORE][-1]
            seen += b.y[b.y != IGNORE].tolist()
            prev = b
        assert len(seen) == len(set(seen))
        predictions = N_IDS - len(STARTS)  # n - 1 for each document
        assert predictions - len(seen) < B * T


def test_random_windows_stay_inside_one_document():
    batcher = make_batcher("random", np.arange(N_IDS), 16, 20, 0, starts=STARTS)
    for _ in range(20):
        b = batcher.next()
        assert b.reset and (b.y == b.x + 1).all()
        assert (_doc_of(b.x[:, 0].numpy()) == _doc_of(b.y[:, -1].numpy())).all()
    with pytest.raises(UserError, match="no document of the training text is longer"):
        make_batcher("random", np.arange(N_IDS), 2, 300, 0, starts=STARTS)


@pytest.mark.parametrize("kind", ["stream", "random"])
def test_one_document_gives_the_batches_it_always_gave(kind):
    """starts=[0] (a single text) is the plain batcher, batch for batch."""
    a = make_batcher(kind, _ids(3000), 4, 16, 5)
    b = make_batcher(kind, _ids(3000), 4, 16, 5, starts=np.array([0]))
    for _ in range(200):
        x, y = a.next(), b.next()
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and y.reset_rows is None


@pytest.mark.parametrize("kind", ["stream", "random"])
def test_document_batcher_resumes_exactly(kind):
    """Restored mid-epoch (and across the shuffle of the next epoch): the same batches."""
    a = make_batcher(kind, np.arange(N_IDS), 3, 7, 9, starts=STARTS)
    for _ in range(45):
        a.next()
    b = make_batcher(kind, np.arange(N_IDS), 3, 7, 9, starts=STARTS)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as a checkpoint stores it
    for _ in range(100):
        x, y = a.next(), b.next()
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and x.reset == y.reset
        assert (x.reset_rows is None) == (y.reset_rows is None)


def test_too_few_windows_for_the_batch_is_named():
    with pytest.raises(UserError, match="9 documents make 11 windows of --seq-len 100"):
        make_batcher("stream", np.arange(N_IDS), 16, 100, 0, starts=STARTS)
