"""Bop (bsnn.bop): the authors' update rule on dL/db, sign flips that keep α, state and recording."""

import pytest
import torch
import torch.nn as nn

from bsnn.binary import binarize_, is_binary
from bsnn.bop import Bop
from bsnn.errors import ConfigError


def _net(seed=0):
    torch.manual_seed(seed)
    return binarize_(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))


def _sign_grad_oracle(layer, loss_of_weight):
    """dL/db by autograd on α·b with α held constant (b = sign(W) as a leaf)."""
    b = torch.where(layer.weight.detach() >= 0, 1.0, -1.0).requires_grad_()
    alpha = layer.weight.detach().abs().mean(dim=1, keepdim=True)
    loss_of_weight(alpha * b).backward()
    return b.grad


def test_recorded_gradient_is_dl_db_and_the_latent_weight_gets_none():
    net = _net()
    (mid,) = [m for m in net.modules() if is_binary(m)]
    x = torch.randn(16, 5)
    bop = Bop(net, gamma=1.0, threshold=0.0)

    def loss_of_weight(w_eff):
        h = net[1](net[0](x))
        return (net[4](net[3](torch.nn.functional.linear(h, w_eff, mid.bias))) ** 2).sum()

    oracle = _sign_grad_oracle(mid, loss_of_weight)
    with bop.recording():
        (net(x) ** 2).sum().backward()
        torch.testing.assert_close(bop._grads[0], oracle)
        assert mid.weight.grad is None
    assert mid.sign_grad_hook is None and bop._grads == [None]


def test_step_follows_the_authors_rule_over_several_steps():
    """m <- m + γ(g - m); b <- -b where b·m > τ (larq's Bop), fed fixed gradients through the hook."""
    net = _net(seed=1)
    (mid,) = [m for m in net.modules() if is_binary(m)]
    gamma, tau = 0.3, 0.05
    bop = Bop(net, gamma=gamma, threshold=tau)
    w = mid.weight.detach().clone()
    b, m = torch.where(w >= 0, 1.0, -1.0), torch.zeros_like(w)
    g = torch.Generator().manual_seed(0)
    total = 0
    with bop.recording():
        for _ in range(5):
            grad = torch.randn(w.shape, generator=g) * 0.2 + 0.05
            mid.sign_grad_hook(grad)
            mid.sign_grad_hook(grad)  # two forwards before one step: gradients add up
            m = m + gamma * (2 * grad - m)
            flip = b * m > tau
            b = torch.where(flip, -b, b)
            total += bop.step()
            torch.testing.assert_close(bop.m_0, m)
            assert torch.equal(torch.where(mid.weight >= 0, 1.0, -1.0), b)
    assert total == int(bop.flips) > 0
    assert torch.equal(mid.weight.abs(), w.abs())  # α = mean|W| unchanged


def test_zero_latent_weights_flip_too_and_state_round_trips():
    net = _net(seed=2)
    (mid,) = [m for m in net.modules() if is_binary(m)]
    with torch.no_grad():
        mid.weight[0, 0] = 0.0  # sign +1
    bop = Bop(net, gamma=1.0, threshold=0.0)
    with bop.recording():
        grad = torch.zeros_like(mid.weight)
        grad[0, 0] = 1.0  # pushes +1 down: flip
        mid.sign_grad_hook(grad)
        assert bop.step() == 1
    assert mid.weight[0, 0] < 0
    other = Bop(_net(seed=2), gamma=1.0, threshold=0.0)
    other.load_state_dict(bop.state_dict())
    assert torch.equal(other.m_0, bop.m_0) and int(other.flips) == 1


def test_bad_settings_and_models_without_binary_layers_are_refused():
    with pytest.raises(ConfigError, match="gamma"):
        Bop(_net(), gamma=0.0)
    with pytest.raises(ConfigError, match="threshold"):
        Bop(_net(), threshold=-1.0)
    with pytest.raises(ConfigError, match="±1 layers"):
        Bop(nn.Sequential(nn.Linear(2, 2)))
