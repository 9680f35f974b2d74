import copy

import pytest
import torch
import torch.nn as nn

from bsnn.binary import (BinaryConv2d, BinaryLinear, binarize_, binary_layer_names, binary_sign, clamp_latent_, materialize,
                         sign_ste, weight_scale)
from bsnn.config import BinaryConfig
from bsnn.errors import ConfigError


def test_sign_of_zero_is_plus_one():
    w = torch.tensor([-2.0, -0.0, 0.0, 1e-9, -1e-9, 3.0])
    assert binary_sign(w).tolist() == [-1, 1, 1, 1, -1, 1]
    assert set(sign_ste(w).tolist()) <= {-1.0, 1.0}


def test_ste_gradient_is_clipped_identity():
    w = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.2], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    sign_ste(w, clip=1.0).backward(g)
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_channel_alpha_numerics():
    conv = BinaryConv2d(2, 3, 1, bias=False, scale="channel")
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[0.5, -0.25], [0.0, -1.0], [0.2, 0.2]]).view(3, 2, 1, 1))
    expected = torch.tensor([[0.375, -0.375], [0.5, -0.5], [0.2, 0.2]]).view(3, 2, 1, 1)
    torch.testing.assert_close(conv.effective_weight(), expected)
    sign, alpha = conv.binary_weight()
    assert sign.flatten().tolist() == [1, -1, 1, -1, 1, 1]
    torch.testing.assert_close(alpha.flatten(), torch.tensor([0.375, 0.5, 0.2]))
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, expected))


def test_layer_and_none_scale():
    w = torch.tensor([[1.0, -0.5], [0.25, -0.25]])
    assert weight_scale(w, "layer").item() == pytest.approx(0.5)
    assert weight_scale(w, "none").item() == 1.0
    lin = BinaryLinear(2, 2, bias=True, scale="layer")
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.zero_()
    torch.testing.assert_close(lin(torch.tensor([[1.0, 1.0]])), torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ConfigError):
        weight_scale(w, "bogus")


def test_alpha_gradient_matches_xnor_formula():
    # d/dw [mean|w| * sign(w)] summed with upstream g: sign(w_i)/n * sum_j g_j sign(w_j) + alpha * g_i * 1{|w_i|<=1}
    lin = BinaryLinear(3, 1, bias=False, scale="channel")
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.2, 1.5]]))
    lin.clip = 2.0
    x = torch.tensor([[1.0, 2.0, 3.0]])
    lin(x).sum().backward()
    s = torch.tensor([1.0, -1.0, 1.0])
    alpha = (0.5 + 0.2 + 1.5) / 3
    expected = s / 3 * (x[0] * s).sum() + alpha * x[0]
    torch.testing.assert_close(lin.weight.grad[0], expected)


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_binarize_keeps_first_and_last_full_precision():
    net = _net()
    binarize_(net, BinaryConfig())
    assert type(net[0]) is nn.Conv2d and type(net[7]) is nn.Linear
    assert isinstance(net[2], BinaryConv2d) and isinstance(net[5], BinaryLinear)
    assert binary_layer_names(net) == ["2", "5"]
    binarize_(net2 := _net(), BinaryConfig(keep_first=False, keep_last=False))
    assert len(binary_layer_names(net2)) == 4


def test_binarize_filter_and_weights_clamped():
    net = _net()
    with torch.no_grad():
        net[2].weight.mul_(100)
    ref = net[2].weight.clamp(-1, 1).clone()
    binarize_(net, BinaryConfig(), filter_fn=lambda name, m: isinstance(m, nn.Conv2d))
    assert binary_layer_names(net) == ["2"]
    torch.testing.assert_close(net[2].weight.data, ref)


def test_clamp_latent_after_step():
    net = binarize_(_net(), BinaryConfig())
    with torch.no_grad():
        net[2].weight.fill_(3.0)
        net[0].weight.fill_(3.0)
    clamp_latent_(net)
    assert net[2].weight.max().item() == 1.0
    assert net[0].weight.max().item() == 3.0  # full-precision layers untouched


def test_binarize_requires_layers():
    with pytest.raises(ConfigError, match="no nn.Conv2d"):
        binarize_(nn.Sequential(nn.ReLU()))


def test_materialize_same_function_plain_layers():
    net = binarize_(_net(), BinaryConfig()).eval()
    plain = materialize(net)
    assert not binary_layer_names(plain) and binary_layer_names(net) == ["2", "5"]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(plain(x), net(x))


class _HeadRegisteredFirst(nn.Module):
    """Registered: head, stem, mid1, mid2; executed: stem, mid1, mid2, head (optionally behind data-dependent
    control flow, which torch.fx cannot trace)."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.branchy = branchy
        self.head = nn.Linear(4, 3)
        self.stem = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.mid1, self.mid2 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        if self.branchy and bool(h.sum() > 0):
            h = h * 1.0
        h = torch.relu(self.mid2(torch.relu(self.mid1(h))))
        return self.head(h.mean((2, 3)))


def test_binarize_keeps_first_and_last_in_execution_order():
    net = binarize_(_HeadRegisteredFirst())  # traced with torch.fx
    assert type(net.stem) is nn.Conv2d and type(net.head) is nn.Linear
    assert binary_layer_names(net) == ["mid1", "mid2"]


def test_binarize_execution_order_from_an_example_input():
    net = _HeadRegisteredFirst(branchy=True).train()
    with pytest.warns(UserWarning, match="example_input"):  # untraceable: registration order, with a warning
        binarize_(copy.deepcopy(net))
    bn = {k: v.clone() for k, v in net.bn.state_dict().items()}
    binarize_(net, example_input=torch.randn(2, 1, 8, 8))
    assert binary_layer_names(net) == ["mid1", "mid2"]
    assert net.training and net.bn.training  # modes restored
    assert all(torch.equal(v, net.bn.state_dict()[k]) for k, v in bn.items())  # BN statistics untouched
