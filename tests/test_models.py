"""Tests for bsnn.models: shapes, fx-traceability and the conversion-friendly structure rules."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

from bsnn.errors import ConfigError
from bsnn.models import MODELS, create_model, list_models

# Registered model -> (kwargs making it cheap, input shapes [C, H, W] it is meant for).
CASES: dict[str, tuple[dict, list[tuple[int, int, int]]]] = {
    "small_cnn": ({}, [(1, 28, 28), (1, 8, 8)]),
    "vgg7_cifar": ({"width": 0.25, "hidden": 64}, [(3, 32, 32)]),
    "vgg11_cifar": ({"width": 0.25}, [(3, 32, 32)]),
    "vgg15_snn": ({"width": 0.125, "hidden": 64}, [(3, 32, 32)]),
    "resnet20_cifar": ({"width": 0.5}, [(3, 32, 32)]),
    "plain_vgg8": ({"width": 8}, [(3, 32, 32)]),
    "airbench_snn": ({"widths": (8, 16, 16), "stem": 4}, [(3, 32, 32)]),
    "airbench94": ({"widths": (8, 16, 16)}, [(3, 32, 32)]),
}
#: Registered teachers that the converter refuses (GELU, max-pooling): not held to the conversion rules.
TEACHER_ONLY = {"airbench94"}


def _build(name: str, num_classes: int = 7) -> nn.Module:
    kw, shapes = CASES[name]
    return create_model(name, num_classes=num_classes, in_channels=shapes[0][0], **kw)


def _relu_calls(gm: fx.GraphModule) -> Counter:
    mods = dict(gm.named_modules())
    return Counter(n.target for n in gm.graph.nodes
                   if n.op == "call_module" and isinstance(mods[n.target], nn.ReLU))


def _module_types(gm: fx.GraphModule) -> list[type]:
    mods = dict(gm.named_modules())
    return [type(mods[n.target]) for n in gm.graph.nodes if n.op == "call_module"]


def test_every_registered_model_has_a_case():
    assert sorted(CASES) == list_models() == MODELS.names()


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape(name):
    net = _build(name).eval()
    for shape in CASES[name][1]:
        with torch.no_grad():
            assert net(torch.randn(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fx_trace_matches_eager(name):
    net = _build(name).eval()
    gm = fx.symbolic_trace(net)
    x = torch.randn(2, *CASES[name][1][0])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))


@pytest.mark.parametrize("name", sorted(set(CASES) - TEACHER_ONLY))
def test_conversion_friendly_structure(name):
    net = _build(name)
    gm = fx.symbolic_trace(net)
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(not r.inplace for r in relus)
    assert len({id(r) for r in relus}) == len(relus)
    calls = _relu_calls(gm)
    # every ReLU module is called exactly once, and every ReLU module is called
    assert len(calls) == len(relus) and set(calls.values()) == {1}
    # no functional activations / pooling / flatten sneaking into the graph
    fn_targets = {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    for bad in ("relu", "max_pool", "flatten", "view", "reshape", "adaptive_max"):
        assert not any(bad in t for t in fn_targets), (bad, fn_targets)
    for m in net.modules():
        assert not isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d))
    assert any(isinstance(m, nn.Flatten) for m in net.modules())
    # first layer is the first conv and last layer the final Linear, in modules() order
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[-1], nn.Linear)
    assert layers[-1].out_features == 7


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_flows_to_every_parameter(name):
    net = _build(name).train()
    shape = CASES[name][1][0]
    loss = nn.functional.cross_entropy(net(torch.randn(4, *shape)), torch.arange(4) % 7)
    loss.backward()
    for pname, p in net.named_parameters():
        if not p.requires_grad:  # frozen by design (airbench94's whitening filters and unit BN weights)
            assert p.grad is None, pname
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_small_cnn_defaults_and_width():
    net = create_model("small_cnn")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1 and [c.out_channels for c in convs] == [32, 64, 128]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    narrow = create_model("small_cnn", width=8, dropout=0.0)
    assert [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32]


def test_cifar_models_default_to_three_channels():
    for name in ("vgg7_cifar", "vgg11_cifar", "vgg15_snn", "resnet20_cifar"):
        net = create_model(name, **CASES[name][0])
        first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 3, name
    first = next(m for m in create_model("small_cnn").modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert next(m for m in create_model("vgg11_cifar", in_channels=1, **CASES["vgg11_cifar"][0])
                .modules() if isinstance(m, nn.Conv2d)).in_channels == 1


def test_vgg11_channels_and_pools():
    net = create_model("vgg11_cifar", num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 5
    assert all(isinstance(m, nn.BatchNorm2d) for m in net.features
               if not isinstance(m, (nn.Conv2d, nn.ReLU, nn.AvgPool2d)))


def test_vgg7_layout():
    net = create_model("vgg7_cifar", num_classes=10, width=0.5, hidden=32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    lins = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(128 * 16, 32), (32, 10)]


def test_vgg15_snn_structure():
    net = create_model("vgg15_snn", num_classes=100, width=0.125, hidden=32)
    mods = list(net.modules())
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    lins = [m for m in mods if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and len(lins) == 2
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert [c.out_channels * 8 for c in convs] == [64, 64, 128, 128, 256, 256, 256,
                                                   512, 512, 512, 512, 512, 512]
    assert all(m.bias is None for m in convs + lins)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in mods)
    assert sum(isinstance(m, nn.AvgPool2d) for m in mods) == 5
    drops = [m for m in mods if isinstance(m, nn.Dropout)]
    assert drops and all(d.p == pytest.approx(0.1) for d in drops)
    # fx order: each stage end is conv -> avgpool -> relu; other convs conv -> relu
    types = _module_types(fx.symbolic_trace(net))
    conv_idx = [i for i, t in enumerate(types) if t is nn.Conv2d]
    stage_ends = {1, 3, 6, 9, 12}
    for k, i in enumerate(conv_idx):
        if k in stage_ends:
            assert types[i + 1: i + 3] == [nn.AvgPool2d, nn.ReLU], (k, types[i: i + 3])
        else:
            assert types[i + 1] is nn.ReLU, (k, types[i: i + 2])
    assert types.count(nn.AvgPool2d) == 5
    # classifier: Linear -> ReLU -> Dropout -> Linear
    lin_idx = [i for i, t in enumerate(types) if t is nn.Linear]
    assert types[lin_idx[0]: lin_idx[1] + 1] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert lins[0].in_features == 64 and lins[1].out_features == 100


def test_vgg15_snn_default_hidden_and_imagenet_size():
    net = create_model("vgg15_snn", num_classes=10, width=0.0625, input_size=64)
    lins = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert lins[0].in_features == 32 * 2 * 2 and lins[0].out_features == 4096
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_resnet20_structure():
    net = create_model("resnet20_cifar", num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(three) == 19 and len(one) == 2 and len(convs) == 21
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 1
    assert {c.out_channels for c in three} == {16, 32, 64}
    gm = fx.symbolic_trace(net)
    adds = [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", "") in ("add", "iadd")]
    assert len(adds) == 9
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 9 and all(b.relu1 is not b.relu2 for b in blocks)
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in net.modules()) == 1
    assert [c.out_channels for c in create_model("resnet20_cifar", width=2).modules()
            if isinstance(c, nn.Conv2d)][0] == 32


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as exc:
        create_model("resnet9000")
    msg = str(exc.value)
    assert "resnet9000" in msg
    for name in list_models():
        assert name in msg


def test_unknown_kwarg_names_it_and_the_accepted_ones():
    with pytest.raises(ConfigError) as exc:
        create_model("small_cnn", depth=3)
    msg = str(exc.value)
    assert "depth" in msg and "small_cnn" in msg and "width" in msg and "dropout" in msg
    with pytest.raises(ConfigError, match="hidden"):
        create_model("resnet20_cifar", hidden=3)


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"in_channels": 0}, {"width": 0},
                                {"dropout": 1.0}, {"dropout": -0.1}, {"num_classes": 2.5}])
def test_bad_values_raise_config_error(kw):
    with pytest.raises(ConfigError):
        create_model("small_cnn", **kw)


def test_name_is_case_insensitive():
    assert isinstance(create_model("SMALL_CNN"), nn.Module)


def test_public_exports():
    import bsnn.models as models

    assert sorted(models.__all__) == ["MODELS", "create_model", "data_init_", "list_models"]


def test_small_cnn_bn_momentum_option():
    net = create_model("small_cnn", bn_momentum=0.5)
    bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == 4 and all(b.momentum == 0.5 for b in bns)
    with pytest.raises(ConfigError, match="bn_momentum"):
        create_model("small_cnn", bn_momentum=0.0)
