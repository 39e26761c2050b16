"""serinus.model.dropout: the CPU dropout drops at the asked rate, keeps the mean, is seeded by torch's
generator, passes gradients through the kept elements only, and does nothing at eval."""

import pytest
import torch

from serinus.model.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    x = torch.full((400, 1000), 2.0, requires_grad=True)
    y = dropout(x, p, training=True)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=0.003)  # 400k draws: 3 sigma is under 0.0025
    values = sorted(torch.unique(y).tolist())
    assert values[0] == 0.0 and len(values) == 2 and values[1] == pytest.approx(2.0 / (1 - p))
    assert y.mean().item() == pytest.approx(2.0, rel=0.01)
    y.sum().backward()
    assert torch.equal(x.grad, (y / 2.0))  # d y / d x: 1/(1-p) where kept, 0 where dropped


def test_seeded_and_odd_sizes():
    torch.manual_seed(5)
    a = dropout(torch.ones(3, 7, 5), 0.5, training=True)
    torch.manual_seed(5)
    b = dropout(torch.ones(3, 7, 5), 0.5, training=True)
    assert torch.equal(a, b) and a.shape == (3, 7, 5)
    c = dropout(torch.ones(3, 7, 5), 0.5, training=True)
    assert not torch.equal(a, c)


def test_eval_and_zero_rate_are_the_identity():
    x = torch.randn(4, 8)
    m = Dropout(0.2).eval()
    assert m(x) is x
    assert dropout(x, 0.0, training=True) is x
    assert Dropout(0.2).state_dict() == {}  # no state: checkpoints are the same as with nn.Dropout
