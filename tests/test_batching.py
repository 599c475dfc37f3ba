"""Batchers: shapes, target = input shifted by one, ids in range, contiguous streams, resumable."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlstm.data.batching import RandomBatcher, StreamBatcher, eval_streams
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
