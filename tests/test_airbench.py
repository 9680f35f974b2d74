"""airbench94 (the fast-training teacher) and airbench_snn: whitening stem, identity init, frozen BN weights, data
initialisation through the trainer, the bias learning-rate group, and conversion of the student."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bsnn
from bsnn.errors import ConfigError
from bsnn.models import create_model, data_init_
from bsnn.models.airbench import WhiteningConv2d
from bsnn.simulate import run_batch
from bsnn.train import TrainConfig, build_optimizer, data_init_from_loader


def _images(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Correlated images: a smooth field plus noise, so 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 8, 8, generator=g)
    x = nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def test_whitening_filters_whiten_the_patches():
    x = _images()
    stem = WhiteningConv2d(3, 2, eps=0.0)
    stem.init_from_data(x)
    with torch.no_grad():
        y = nn.functional.conv2d(x.double(), stem.weight.double())  # the filters alone, no bias
    half = y[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the first 12 filters; the other 12 are their negatives
    second_moment = half.T @ half / half.shape[0]
    torch.testing.assert_close(second_moment, torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(stem.weight[12:], -stem.weight[:12])
    assert not stem.weight.requires_grad and stem.bias.requires_grad


def test_whitening_orders_filters_by_variance():
    x = _images()
    stem = WhiteningConv2d(3, 2, eps=5e-4)
    stem.init_from_data(x)
    # filter norms grow as the eigenvalue falls: the first filter follows the largest-variance direction
    norms = stem.weight[:12].flatten(1).norm(dim=1)
    assert bool((norms[1:] >= norms[:-1] - 1e-6).all())


def test_airbench94_identity_init_and_frozen_bn_weights():
    net = create_model("airbench94", widths=(8, 16, 16))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, WhiteningConv2d)]
    for conv in convs:
        k = min(conv.in_channels, conv.out_channels)
        eye = torch.zeros_like(conv.weight[:k])
        nn.init.dirac_(eye)
        torch.testing.assert_close(conv.weight[:k], eye)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not b.weight.requires_grad and b.bias.requires_grad and b.momentum == 0.4 for b in bns)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_data_init_through_the_trainer_uses_the_dataset_and_keeps_the_rng():
    x = _images(64)
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=16, shuffle=True)
    net = create_model("airbench94", widths=(8, 16, 16))
    ref = WhiteningConv2d(3, 2)
    ref.init_from_data(x)
    state = torch.get_rng_state()
    assert data_init_from_loader(net, loader)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(net[0].weight, ref.weight)
    # a model without data-dependent layers is untouched
    plain = create_model("airbench_snn", widths=(8, 16, 16), stem=4)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert not data_init_from_loader(plain, loader) and not data_init_(plain, x)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_bias_lr_scale_gives_the_no_decay_group_its_own_rate():
    net = create_model("airbench94", widths=(8, 16, 16))
    opt = build_optimizer(net, TrainConfig(optimizer="sgd", lr=0.5, weight_decay=1e-3, bias_lr_scale=64.0))
    decay, no_decay = opt.param_groups
    assert decay["lr"] == 0.5 and no_decay["lr"] == 32.0 and no_decay["weight_decay"] == 0.0
    frozen = {id(p) for p in net.parameters() if not p.requires_grad}
    assert frozen and not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    with pytest.raises(ConfigError, match="bias_lr_scale"):
        TrainConfig(bias_lr_scale=0.0).validate()


def test_airbench_snn_binary_student_converts_and_converges():
    torch.manual_seed(0)
    net = create_model("airbench_snn", widths=(8, 16, 16), stem=8)
    bsnn.binarize_(net, bsnn.BinaryConfig())
    net.train()
    with torch.no_grad():  # give the BatchNorms non-trivial statistics
        for _ in range(3):
            net(_images(32, seed=1))
    net.eval()
    x = _images(64, seed=2)
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=32)
    snn = bsnn.convert(net, loader)
    with torch.no_grad():
        ann = net(x[:8])
        mem = run_batch(snn, x[:8], 256, 64)  # [T, B, K] accumulated output
    err = {t: (mem[t - 1] / t - ann).abs().mean().item() for t in (16, 256)}
    assert err[256] < err[16] and err[256] < 0.1 * ann.abs().mean().item()


def _tiny_loader(n: int = 32) -> DataLoader:
    x = _images(n, seed=3)
    return DataLoader(TensorDataset(x, torch.arange(n) % 10), batch_size=16)


def test_an_online_teacher_gets_its_data_initialisation_and_a_trained_one_keeps_its_weights():
    from bsnn.distill.config import DistillConfig
    from bsnn.train import train_student

    loader = _tiny_loader()
    ref = WhiteningConv2d(3, 2)
    ref.init_from_data(loader.dataset.tensors[0])
    cfg = TrainConfig(epochs=1, lr=1e-3)
    student = create_model("airbench_snn", widths=(8, 16, 16), stem=4)
    online = create_model("airbench94", widths=(8, 16, 16))
    train_student(student, online, loader, DistillConfig(method="switokd"), cfg, quiet=True)
    torch.testing.assert_close(online[0].weight, ref.weight)  # frozen after its data initialisation
    trained = create_model("airbench94", widths=(8, 16, 16))
    with torch.no_grad():
        trained[0].weight.fill_(0.5)  # stands for a trained teacher's stem
    train_student(create_model("airbench_snn", widths=(8, 16, 16), stem=4), trained, loader, DistillConfig(method="kd"),
                  cfg, quiet=True)
    assert bool((trained[0].weight == 0.5).all())


def test_converting_the_teacher_is_refused_naming_its_gelu():
    from bsnn.errors import ConversionError

    net = create_model("airbench94", widths=(8, 16, 16)).eval()
    x = _images(16)
    with pytest.warns(UserWarning), pytest.raises(ConversionError, match="unsupported module GELU"):
        bsnn.convert(net, DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8))


def test_a_student_starting_from_trained_weights_skips_its_data_initialisation():
    from bsnn.distill.config import DistillConfig
    from bsnn.train import train_student

    loader = _tiny_loader()
    student = create_model("airbench94", widths=(8, 16, 16))
    with torch.no_grad():
        student[0].weight.fill_(0.25)  # stands for trained (loaded) weights
    teacher = create_model("airbench_snn", widths=(8, 16, 16), stem=4).eval()
    train_student(student, teacher, loader, DistillConfig(method="kd"), TrainConfig(epochs=1), data_init=False,
                  quiet=True)
    assert bool((student[0].weight == 0.25).all())
    train_student(student, teacher, loader, DistillConfig(method="kd"), TrainConfig(epochs=1), quiet=True)
    assert not bool((student[0].weight == 0.25).all())  # the default re-derives it from the data


def test_whitening_bias_trains_like_a_weight_and_freezes_after_its_epochs():
    net = create_model("airbench94", widths=(8, 16, 16))
    decay, no_decay = build_optimizer(net, TrainConfig(optimizer="sgd", lr=0.5, weight_decay=1e-3,
                                                       bias_lr_scale=64.0)).param_groups
    assert any(p is net[0].bias for p in decay["params"]) and not any(p is net[0].bias for p in no_decay["params"])
    x = _images(64)
    y = torch.arange(64) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    biases = []
    cfg = TrainConfig(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3,
                      freeze_data_init_epochs=1)
    from bsnn.train import train_teacher

    start = net[0].bias.detach().clone()
    train_teacher(net, loader, cfg, quiet=True, on_epoch_end=lambda e, m: biases.append(net[0].bias.detach().clone()))
    assert not torch.equal(biases[0], start)  # learns in epoch 1 ...
    assert torch.equal(biases[1], biases[0]) and torch.equal(biases[2], biases[0])  # ... and not after
    assert not torch.equal(net[4].bias, torch.zeros_like(net[4].bias))  # the rest (a BN bias) trains on
