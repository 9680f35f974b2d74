"""Tandem fine-tuning (bsnn.tandem): its forward is the converted SNN, its backward the rate rule, and it trains."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.activations import QCFS, ClipReLU, replace_activations_
from bsnn.binary import binarize_, is_binary
from bsnn.cli import main
from bsnn.config import ConvertConfig
from bsnn.convert import convert
from bsnn.errors import ConfigError
from bsnn.io import model_digest
from bsnn.modelfile import load_model
from bsnn.simulate import run_batch
from bsnn.snn.functional import if_multistep
from bsnn.tandem import TandemConfig, rate_if, spiking_forward, tandem_finetune, tandem_logits


def _net(kind: str = "qcfs", seed: int = 0) -> nn.Module:
    """conv-BN-act-avgpool-conv(±1)-BN-act-FC on [B, 1, 8, 8] -> 3 classes, λ = 1.5, random BN statistics."""
    torch.manual_seed(seed)
    net = binarize_(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                                  nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(8 * 4 * 4, 3)))
    replace_activations_(net, kind, clip=1.5, levels=4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.0, 0.5)
    return net.eval()


def _loader(x, y=None, batch_size=16, shuffle=False):
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def test_rate_if_forward_is_the_reference_if_neuron():
    torch.manual_seed(0)
    T, B = 5, 7
    z = torch.randn(T * B, 4, 3) * 2
    lam = torch.tensor(1.3)
    for v_init in (0.0, 0.5):
        spikes, _ = if_multistep(z.reshape(T, B, 4, 3), lam, v_init * lam)
        torch.testing.assert_close(rate_if(z, lam, T, v_init), (spikes * lam).reshape(T * B, 4, 3), rtol=0, atol=0)


def test_rate_if_backward_is_the_clip_at_the_time_averaged_current():
    """Oracle: autograd through ``clamp(mean_t z, 0, λ)`` used as every step's output."""
    torch.manual_seed(1)
    T, B = 4, 6
    z = (torch.randn(T * B, 5) * 2).requires_grad_()
    lam = torch.tensor(1.1, requires_grad=True)
    g = torch.randn(T * B, 5)
    (rate_if(z, lam, T) * g).sum().backward()
    z2, lam2 = z.detach().clone().requires_grad_(), lam.detach().clone().requires_grad_()
    rate = torch.minimum(torch.relu(z2.reshape(T, B, 5).mean(0)), lam2)
    (rate.expand(T, B, 5).reshape(T * B, 5) * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(lam.grad, lam2.grad)
    assert z.grad.abs().sum() > 0 and lam.grad.abs() > 0


@pytest.mark.parametrize("kind", ["qcfs", "clip"])
def test_tandem_forward_equals_the_converted_snn(kind):
    net = _net(kind)
    x = torch.randn(24, 1, 8, 8)
    cfg = ConvertConfig(snn_calibration="none", v_init=0.5)
    snn = convert(net, _loader(x), cfg)
    with torch.no_grad():
        for t in (1, 2, 3, 8):
            simulated = run_batch(snn, x, t, t)[-1] / t  # output integrator / T = time-averaged logits
            torch.testing.assert_close(tandem_logits(net, x, t, 0.5), simulated, rtol=1e-4, atol=1e-4)
    # the swap is undone: the model is its ANN again
    assert sum(isinstance(m, (QCFS, ClipReLU)) for m in net.modules()) == 2


def test_tandem_forward_converges_to_the_clip_ann():
    net = _net("clip", seed=3)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ann = net(x)
        err = {t: (tandem_logits(net, x, t) - ann).abs().mean().item() for t in (4, 32, 256)}
    assert err[256] < err[32] < err[4] and err[256] < 0.02 * ann.abs().mean().item(), err


def test_spiking_forward_restores_the_activations_after_an_error():
    net = _net()
    before = [type(m) for m in net.modules()]
    with pytest.raises(RuntimeError):
        with spiking_forward(net, 4):
            net(torch.randn(3, 2, 8, 8))  # wrong channel count
    assert [type(m) for m in net.modules()] == before


def test_tandem_refuses_networks_it_cannot_run_as_their_snn():
    relu = binarize_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)))
    with pytest.raises(ConfigError, match="QCFS or clip"):
        tandem_logits(relu, torch.randn(2, 1, 8, 8), 2)
    mixed = nn.Sequential(nn.Conv2d(1, 4, 3), QCFS(), nn.Conv2d(4, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="plain ReLUs"):
        tandem_logits(mixed, torch.randn(2, 1, 8, 8), 2)
    maxpool = nn.Sequential(nn.Conv2d(1, 4, 3), QCFS(), nn.MaxPool2d(2))
    with pytest.raises(ConfigError, match="max-pooling"):
        tandem_logits(maxpool, torch.randn(2, 1, 8, 8), 2)
    for bad in (dict(timesteps=0), dict(v_init=1.0), dict(temperature=0.0), dict(ann_weight=-1.0), dict(epochs=0),
                dict(lr=-1.0), dict(binary_weights="sign"), dict(bop_gamma=0.0), dict(bop_threshold=-1.0)):
        with pytest.raises(ConfigError):
            TandemConfig(**bad).validate()


def _task(n=256, seed=0):
    """A learnable 3-class task on [1, 8, 8] inputs: the class is the brightest third of the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    y = torch.randint(0, 3, (n,), generator=g)
    for k in range(3):
        x[y == k, :, :, 3 * k:3 * k + 2] += 1.5
    return x, y


def _snn_loss(net, x, y, t):
    with torch.no_grad():
        return F.cross_entropy(tandem_logits(net, x, t), y).item()


def test_tandem_finetune_lowers_the_snn_loss_and_keeps_binary_weights_and_bn_statistics():
    net = _net(seed=2)
    x, y = _task()
    binary = {n: m.weight.detach().clone() for n, m in net.named_modules() if is_binary(m)}
    stats = {n: b.clone() for n, b in net.named_buffers()}
    before = _snn_loss(net, x, y, 2)
    cfg = TandemConfig(timesteps=2, ann_weight=0.5, epochs=3, lr=1e-2, warmup_epochs=0.0)
    history = tandem_finetune(net, _loader(x, y, 32, shuffle=True), cfg, quiet=True)
    assert len(history) == 3
    assert _snn_loss(net, x, y, 2) < 0.8 * before
    for n, w in binary.items():  # frozen by default, and trainable again afterwards
        assert torch.equal(net.get_submodule(n).weight, w) and net.get_submodule(n).weight.requires_grad
    for n, b in net.named_buffers():  # BN ran in eval mode: its statistics fold into the SNN unchanged
        assert torch.equal(b, stats[n]), n
    assert not net.training


def test_tandem_finetune_with_a_teacher_and_trainable_binary_weights():
    net = _net(seed=4)
    x, y = _task(128, seed=1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        teacher[1].weight.zero_()
        for k in range(3):  # a perfect teacher of the task above
            teacher[1].weight[k].view(8, 8)[:, 3 * k:3 * k + 2] = 1.0
    binary = {n: m.weight.detach().clone() for n, m in net.named_modules() if is_binary(m)}
    cfg = TandemConfig(timesteps=2, binary_weights="latent", epochs=2, lr=1e-2)
    before = _snn_loss(net, x, y, 2)
    tandem_finetune(net, _loader(x, y, 32, shuffle=True), cfg, teacher=teacher, quiet=True)
    assert _snn_loss(net, x, y, 2) < before
    assert any(not torch.equal(net.get_submodule(n).weight, w) for n, w in binary.items())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_tandem_finetune_with_bop_flips_signs_only_and_keeps_alpha():
    net = _net(seed=5)
    x, y = _task(128, seed=2)
    binary = {n: m.weight.detach().clone() for n, m in net.named_modules() if is_binary(m)}
    cfg = TandemConfig(timesteps=2, binary_weights="bop", bop_gamma=0.1, bop_threshold=1e-4, epochs=2, lr=1e-2)
    before = _snn_loss(net, x, y, 2)
    tandem_finetune(net, _loader(x, y, 32, shuffle=True), cfg, quiet=True)
    assert _snn_loss(net, x, y, 2) < before
    flipped = 0
    for n, w in binary.items():
        m = net.get_submodule(n)
        assert torch.equal(m.weight.abs(), w.abs())  # only signs moved: |W|, hence α, unchanged
        flipped += int(((m.weight >= 0) != (w >= 0)).sum())
        assert m.sign_grad_hook is None and m.weight.requires_grad  # an ordinary layer again
    assert 0 < flipped < sum(w.numel() for w in binary.values())


# ----------------------------------------------------------------------------------------- the pipeline stage
TINY = ["data.name=digits", "data.limit_train=256", "train.epochs=1", "student.epochs=1", "convert.calib_samples=64",
        "simulate.timesteps=[1,2]", "cost.enabled=false", "--quiet"]


def test_bsnn_run_fine_tunes_the_qcfs_student_converts_it_and_resumes_without_retraining(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), *TINY, "model.activation=qcfs", "tandem.enabled=true", "tandem.timesteps=2"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tuned, _ = load_model(out / "student_tandem.pt", "cpu")
    student, _ = load_model(out / "student.pt", "cpu")
    assert model_digest(tuned) != model_digest(student)
    assert metrics["tandem"]["record"]["derived_from"]["student"] == model_digest(student)
    assert metrics["convert"]["record"]["derived_from"]["student"] == model_digest(tuned)  # what was converted
    assert len(metrics["tandem"]["history"]) == 1
    before = (out / "student_tandem.pt").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert (out / "student_tandem.pt").read_bytes() == before
    assert json.loads((out / "metrics.json").read_text())["tandem"] == metrics["tandem"]
    # the stage commands of that run folder work on the fine-tuned network too
    assert main(["convert", "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["convert"]["record"]["derived_from"]["student"] == model_digest(tuned)
    assert main(["simulate", "--out", str(out), "--quiet"]) == 0  # its ANN reference is student_tandem.pt


def test_bsnn_run_refuses_tandem_on_a_relu_student_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY, "tandem.enabled=true"]) == 2
    assert "model.activation=qcfs" in capsys.readouterr().err
    assert not (out / "teacher.pt").exists()
