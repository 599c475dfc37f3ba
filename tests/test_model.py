"""The network: time-major inside but batch-first to callers, and the cheaper dropout mask."""

import pytest
import torch
from torch import nn

from charlstm.config import ModelConfig
from charlstm.model import CharRNN, Dropout, dropout, parameter_shapes


def test_logits_match_a_batch_first_lstm_with_the_same_weights():
    """The model runs time-major inside; callers still get (B, T, V) logits, and the same numbers
    a batch-first LSTM with the same weights gives."""
    torch.manual_seed(0)
    model = CharRNN(
        ModelConfig(embedding_size=6, hidden_size=10, num_layers=2, vocab_size=7)
    ).eval()
    reference = nn.LSTM(6, 10, 2, batch_first=True)
    reference.load_state_dict(model.rnn.state_dict())
    idx = torch.randint(0, 7, (3, 5))
    logits, (h, c) = model(idx)
    out, (h_ref, c_ref) = reference(model.encoder(idx))
    assert logits.shape == (3, 5, 7)
    torch.testing.assert_close(logits, model.fc(out))
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_dropout_drops_a_fraction_p_and_keeps_the_mean(p):
    torch.manual_seed(1)
    y = Dropout(p).train()(torch.ones(600, 500))
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005  # 5 standard deviations of the fraction at this size
    assert abs(y.mean().item() - 1) < 0.01
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0
    assert values[1] == pytest.approx(1 / (1 - p), rel=1e-4)


def test_dropout_is_off_in_eval_mode_and_at_p_zero():
    x = torch.randn(4, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_dropout_follows_the_seed_and_masks_the_gradient_too():
    x = torch.randn(7, 11, requires_grad=True)
    torch.manual_seed(3)
    a = dropout(x, 0.4)
    torch.manual_seed(3)
    b = dropout(x, 0.4)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad != 0, a != 0)


def test_dropout_rounds_p_to_sixteen_bits_and_scales_by_the_rounded_value():
    """p = 0.3 drops 19661 of 65536 values: the kept elements are scaled by 65536 / 45875."""
    torch.manual_seed(2)
    y = dropout(torch.ones(10, 10), 0.3)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 65536 / 45875))


def test_locked_dropout_shares_one_mask_along_time():
    """Time-major (T, B, F): a feature dropped for one sequence is dropped at every step of it."""
    torch.manual_seed(4)
    y = Dropout(0.5, locked=True).train()(torch.ones(9, 40, 30))
    assert torch.equal(y, y[:1].expand_as(y))
    assert 0.4 < (y[0] == 0).float().mean().item() < 0.6


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 3])
def test_parameter_shapes_are_the_modules_state(cell, layers):
    """Checkpoints are checked against parameter_shapes, never a built model: it must name every
    tensor of the real module, in its shape."""
    config = ModelConfig(
        cell=cell, vocab_size=37, embedding_size=11, hidden_size=13, num_layers=layers
    )
    real = {k: tuple(v.shape) for k, v in CharRNN(config).state_dict().items()}
    assert parameter_shapes(config) == real
