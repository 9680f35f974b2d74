"""The operations of the models people bring: clipped activations (ReLU6, Hardtanh(0, a), clamp(0, a)) and
channel concatenation convert with the default ``ConvertConfig()`` and their SNNs converge to the ANN's logits."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.config import ConvertConfig
from bsnn.convert import capture, convert
from bsnn.convert.graph import clip_bounds, relu_modules
from bsnn.errors import ConversionError
from bsnn.simulate import run_batch

TS = (16, 64, 256, 1024)


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=64)


def _rel_errors(snn, ann: nn.Module, x: torch.Tensor) -> dict[int, float]:
    x = x[:64]
    logits = ann.eval()(x).detach()
    mem = run_batch(snn, x, max(TS), 256)  # [T, B, K] accumulated output
    return {t: ((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in TS}


def _assert_converges(ann: nn.Module, x: torch.Tensor):
    snn = convert(ann, _loader(x), ConvertConfig())
    err = _rel_errors(snn, ann, x)
    # the default's limit is the ANN clipped at its late thresholds (a 16-step code's MSE threshold): within 2 % of
    # the ANN's logits, and the error never grows past that clipping floor
    assert err[1024] < 0.02 and err[1024] <= 1.5 * min(err.values()), err
    return snn


class ClipNet(nn.Module):
    """Every form of clipped ReLU once; ``a`` small enough that the clips bind on random data."""

    def __init__(self, a: float = 0.5) -> None:
        super().__init__()
        self.a = a
        self.c1, self.b1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.c2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.Hardtanh(0.0, a)
        self.c3, self.c4, self.c5, self.c6 = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.c1.weight.mul_(20)  # activations above 6 before the ReLU6

    def forward(self, x):
        h = self.act1(self.b1(self.c1(x)))
        h = self.act2(self.c2(h))
        h = torch.clamp(self.c3(h), 0, self.a)
        h = F.avg_pool2d(self.c4(h).clamp(0, self.a), 2)
        h = F.relu6(self.c5(h))
        h = F.hardtanh(self.c6(h), 0.0, self.a).flatten(1)
        return self.fc2(self.fc1(h).clamp(min=0))


def test_clipped_activations_become_clipped_relus_in_capture():
    torch.manual_seed(0)
    gm = capture(ClipNet(), torch.randn(2, 3, 8, 8))
    assert clip_bounds(gm) == {"act1": 6.0, "act2": 0.5, "act_clamp": 0.5, "act_clamp_1": 0.5, "act_relu6": 6.0,
                               "act_hardtanh": 0.5}
    assert len(relu_modules(gm)) == 7  # the six clips and clamp(min=0), a plain ReLU


def test_clipped_activations_convert_and_converge():
    torch.manual_seed(0)
    ann, x = ClipNet().eval(), torch.randn(256, 3, 8, 8)
    snn = _assert_converges(ann, x)
    lam = snn.meta["thresholds"]
    assert max(max(torch.as_tensor(lam["act2"]).reshape(-1).tolist()), 0) == pytest.approx(0.5)  # clip binds
    assert all(v <= 0.5 + 1e-6 for k in ("act2", "act_clamp", "act_clamp_1", "act_hardtanh")
               for v in torch.as_tensor(lam[k]).reshape(-1).tolist())


def test_clipped_threshold_is_the_clip_where_the_statistic_exceeds_it():
    torch.manual_seed(0)
    ann, x = ClipNet(a=0.05), torch.randn(128, 3, 8, 8)
    snn = convert(ann, _loader(x), ConvertConfig(threshold="99.99", per_channel=False, snn_calibration="none"))
    lam = {k: torch.as_tensor(v).item() for k, v in snn.meta["thresholds"].items()}
    assert [lam[k] for k in ("act2", "act_clamp", "act_clamp_1", "act_hardtanh")] == pytest.approx([0.05] * 4)
    assert lam["act1"] == pytest.approx(6.0)  # the ReLU6 before it binds too (weights x20)
    # stored domain: λ / (the scale of its input); a full-precision conv's output has scale 1
    assert snn.neurons()["if_act2"].threshold.reshape(-1).tolist() == pytest.approx([0.05])


def test_binary_relu6_network_converges():
    torch.manual_seed(1)
    ann = binarize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.AvgPool2d(2),
                                  nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU6(), nn.Linear(16, 4))).eval()
    _assert_converges(ann, torch.randn(256, 3, 8, 8))


@pytest.mark.parametrize("act, what", [(nn.Hardtanh(), "Hardtanh"), (nn.Hardtanh(-0.5, 1.0), "Hardtanh"),
                                       (lambda h: h.clamp(-1, 1), "clamp"), (lambda h: F.hardtanh(h), "hardtanh"),
                                       (lambda h: h.clamp(max=1.0), "clamp")])
def test_clips_with_another_lower_bound_are_refused(act, what):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 2)
            self.act = act if isinstance(act, nn.Module) else None

        def forward(self, x):
            h = self.conv(x)
            return self.fc((self.act(h) if self.act is not None else act(h)).flatten(1))

    with pytest.raises(ConversionError, match=f"(?s)unsupported.*{what}.*graph node"):
        capture(Net(), torch.randn(2, 3, 8, 8))


class DenseBlock(nn.Module):
    """conv -> cat with its input -> BN -> ReLU -> conv (DenseNet style), functional in-place ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.grow = nn.Conv2d(6, 4, 3, padding=1)
        self.bn1, self.conv = nn.BatchNorm2d(10), nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)), inplace=True)
        h = torch.cat([h, self.grow(h)], 1)
        h = F.relu(self.bn1(h), inplace=True)
        h = F.avg_pool2d(F.relu(self.conv(h), inplace=True), 2)
        return self.fc(torch.flatten(h, 1))


def _settle_bn(model: nn.Module, shape: tuple) -> nn.Module:
    """Running statistics from a few train-mode passes on random data (random BN statistics otherwise)."""
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(*shape))
    return model.eval()


@pytest.mark.parametrize("binary", [False, True])
def test_dense_block_with_concatenation_converges(binary):
    torch.manual_seed(2)
    ann = DenseBlock()
    if binary:
        binarize_(ann)
    _settle_bn(ann, (64, 3, 8, 8))
    snn = _assert_converges(ann, torch.randn(256, 3, 8, 8))
    assert any(n.target is torch.cat for n in snn.graph_module.graph.nodes)


def test_concatenated_spikes_of_different_thresholds_converge():
    """Inception style: two ReLU branches (each its own λ) joined, then a full-precision conv."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.conv, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6 * 8 * 8, 4)
            with torch.no_grad():
                self.b.weight.mul_(10)  # very different scales

        def forward(self, x):
            h = torch.cat((F.relu(self.a(x)), F.relu6(self.b(x))), dim=1)
            return self.fc(F.relu(self.conv(h)).flatten(1))

    torch.manual_seed(3)
    _assert_converges(Net().eval(), torch.randn(256, 3, 8, 8))


@pytest.mark.parametrize("dim", [0, 2, -1])
def test_concatenation_along_other_dims_is_refused(dim):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.conv(x))
            return self.fc(F.adaptive_avg_pool2d(torch.cat([h, h], dim), 1).flatten(1))

    with pytest.raises(ConversionError, match=rf"concatenation along dim {dim} .*graph node 'cat'"):
        convert(Net(), _loader(torch.randn(8, 3, 8, 8)), ConvertConfig())


def test_depthwise_conv_after_per_channel_thresholds_converges():
    """A grouped conv reads only its group's input channels: per-channel input scales are folded per group."""
    torch.manual_seed(4)
    ann = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 4)).eval()
    _assert_converges(ann, torch.randn(256, 3, 8, 8))


# torchvision models (mobilenet_v2, densenet121, resnets, vgg11_bn): tests/test_torchvision.py


def test_binary_layer_after_concatenation_of_different_scales_is_refused_clearly():
    from bsnn.binary import BinaryConv2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.c, self.fc = BinaryConv2d(8, 6, 3, padding=1), nn.Linear(6 * 8 * 8, 4)

        def forward(self, x):
            h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
            return self.fc(F.relu(self.c(h)).flatten(1))

    with pytest.raises(ConversionError, match=r"binary layer 'c'.*concatenation.*BatchNorm \+ ReLU"):
        convert(Net(), _loader(torch.randn(64, 3, 8, 8)), ConvertConfig())


def test_per_channel_thresholds_pass_residual_adds_into_full_precision_layers_only():
    from bsnn.binary import BinaryConv2d
    from bsnn.convert.graph import per_channel_allowed

    class Block(nn.Module):
        def __init__(self, binary: bool):
            super().__init__()
            conv = BinaryConv2d if binary else nn.Conv2d
            self.stem, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.r0, self.r1, self.r2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
            self.next, self.fc = conv(8, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 4)

        def forward(self, x):
            h = self.r0(self.stem(x))
            h = self.r1(self.c1(h) + h)  # r0 feeds c1 and the add; the add feeds r1
            return self.fc(self.r2(self.next(h)).flatten(1))

    x = torch.randn(2, 3, 8, 8)
    gm = capture(Block(binary=False), x)
    assert per_channel_allowed(gm, set(relu_modules(gm))) == {"r0", "r1", "r2"}
    gm = capture(Block(binary=True), x)  # r1 feeds a binary conv: its weights must stay ±1
    assert per_channel_allowed(gm, set(relu_modules(gm))) == {"r0", "r2"}
    net = Block(binary=False)
    _assert_converges(net.eval(), torch.randn(256, 3, 8, 8))
