"""switokd, sokd, byot, born_again (bsnn/distill/online.py) against references restated from the authors' code.

Each ``ref_*`` below restates the authors' training step (repository and file named in its docstring) with plain
torch, independently of bsnn: value and gradient are compared in float64 at 1e-6 relative. The born-again
generations of the pipeline are checked on a tiny run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import BinaryConfig, binarize_
from bsnn.config import DistillConfig, TrainConfig, load_config
from bsnn.distill import build_distiller
from bsnn.distill.online import (BYOTHead, Substitute, byot_feature_loss, byot_kd_loss, layer_signature,
                                 stage_entries, switokd_gap)
from bsnn.errors import ConfigError
from bsnn.models import create_model
from bsnn.modelfile import build_model, load_model
from bsnn.pipeline import check_models, make_context, stage_student
from bsnn.train import fidelity, fit
from tests._distill_helpers import grads, taps, xb

D = torch.float64
RTOL, ATOL = 1e-6, 1e-12
K = 5


def _net(seed: int, width: int = 4, k: int = K) -> nn.Sequential:
    """conv - BN - ReLU (mid-level map) - conv (width -> 2·width, the last stage) - ReLU - GAP - Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),     # 0 1 2
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),                    # 3 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, k),          # 5 6 7
    ).double()


_xb = xb


_grads = grads


def _agrees(d, reference, wrt, train: bool = False):
    """``d``'s loss vs ``reference(x, y)`` for value and gradient w.r.t. ``wrt`` (eval mode unless ``train``)."""
    d.train(train)
    x, y = _xb()
    out = d(x, y)
    ref = reference(x, y)
    torch.testing.assert_close(out["loss"], ref, rtol=RTOL, atol=0)
    torch.testing.assert_close(_grads(out["loss"], wrt), _grads(ref, wrt), rtol=RTOL, atol=ATOL)
    return out


# ------------------------------------------------------------------------------------------------ switokd


def ref_kl_div(p_logit, q_logit, t):
    """hfutqian/SwitOKD SwitOKD_code/CIFAR-10/WRN-16-1_8/main.py ``kl_div``: KL(softmax(p/T) ‖ softmax(q/T))."""
    p = F.softmax(p_logit / t, dim=-1)
    return torch.mean(torch.sum(p * (F.log_softmax(p_logit / t, dim=-1) - F.log_softmax(q_logit / t, dim=-1)), 1))


def ref_switokd(output, output_ks2, target, k):
    """Same file, ``train``: ``output`` the teacher's logits, ``output_ks2`` the student's. Returns the loss whose
    gradient is what both optimisers step on (student and, in learning mode, teacher), and the mode."""
    onehot = torch.zeros(target.shape[0], k, dtype=output.dtype).scatter_(1, target.view(-1, 1), 1)
    dist_label = lambda y, q: torch.mean(torch.sum(torch.abs(F.softmax(q, dim=-1) - y), 1))  # noqa: E731
    s_label = dist_label(onehot, output_ks2.detach())
    t_label = dist_label(onehot, output.detach())
    ps_pt = torch.mean(torch.sum(torch.abs(F.softmax(output_ks2.detach(), -1) - F.softmax(output.detach(), -1)), 1))
    epsilon = torch.exp(-1 * (t_label / (t_label + s_label)))
    delta = s_label - epsilon * t_label
    loss_ks2 = F.cross_entropy(output_ks2, target) + ref_kl_div(output.detach(), output_ks2, 1)
    if ps_pt > delta and t_label < s_label:
        return loss_ks2, True
    loss_full = F.cross_entropy(output, target) + ref_kl_div(output_ks2.detach(), output, 1)
    return loss_full + loss_ks2, False


class _Lookup(nn.Module):
    """A teacher whose logits on the fixed test batch are ``0.1·Linear(x) + table`` (trainable, with a chosen
    confidence pattern)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(36, K).double()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.1 * self.lin(x.flatten(1)) + self.table


def test_switokd_gap_hand_value():
    # p_t = [0.6, 0.4, 0, ...], p_s uniform over 5 classes, y = 0 (logits chosen to give these probabilities)
    z_t = torch.log(torch.tensor([[0.6, 0.4, 1e-300, 1e-300, 1e-300]], dtype=D))
    z_s = torch.zeros(1, K, dtype=D)
    st = switokd_gap(z_s, z_t, torch.tensor([0]))
    s, t = 2 * (1 - 0.2), 2 * (1 - 0.6)
    assert float(st["s_label"]) == pytest.approx(s) and float(st["t_label"]) == pytest.approx(t)
    assert float(st["gap"]) == pytest.approx(0.4 + 0.2 + 3 * 0.2)
    assert float(st["threshold"]) == pytest.approx(s - math.exp(-t / (t + s)) * t)
    assert st["expert"]  # 1.2 > 1.027 and the teacher is closer to the label


@pytest.mark.parametrize("mode", ["learning", "expert"])
def test_ref_switokd_both_modes(mode):
    x, y = _xb()
    if mode == "learning":
        teacher = _net(1, 6)
    else:  # confident on the label with the rest on the next class: a gap larger than the threshold
        teacher = _Lookup(3.0 * F.one_hot(y, K).to(D) + 2.5 * F.one_hot((y + 1) % K, K).to(D))
    student = _net(0)
    d = build_distiller(student, teacher, DistillConfig(method="switokd"))
    wrt = list(student.parameters()) + list(teacher.parameters())
    out = _agrees(d, lambda x, y: ref_switokd(teacher(x), student(x), y, K)[0], wrt)
    expected = ref_switokd(teacher(x), student(x), y, K)[1]
    assert bool(out["expert"]) == expected == (mode == "expert")
    out["loss"].backward()
    paused = all(p.grad is None for p in teacher.parameters())
    assert paused == (mode == "expert")  # expert mode: no gradient, so the optimiser leaves the teacher alone
    assert all(p.grad is not None for p in student.parameters())


def test_switokd_needs_exactly_one_teacher():
    with pytest.raises(ConfigError, match="switokd trains one teacher online.*got 0"):
        build_distiller(_net(0), None, DistillConfig(method="switokd"))


# --------------------------------------------------------------------------------------------------- sokd


def ref_soft_target(out_s, out_t, t=4.0):
    """swlzq/Semi-Online-KD kd_losses/st.py ``SoftTarget``."""
    return F.kl_div(F.log_softmax(out_s / t, dim=1), F.softmax(out_t / t, dim=1), reduction="batchmean") * t * t


def ref_sokd(output_s, output_a, output_t, targets):
    """swlzq/Semi-Online-KD trainer/sokd.py ``train`` / ``calculate_kd`` (soft_target, all lambdas 1)."""
    loss_kd_t_a = ref_soft_target(output_a, output_t.detach())
    loss_kd_s_a = ref_soft_target(output_a, output_s.detach())
    loss_s = ref_soft_target(output_s, output_a.detach())
    loss_a = F.cross_entropy(output_a, targets) + loss_kd_t_a + loss_kd_s_a
    return loss_a + F.cross_entropy(output_s, targets) + loss_s


def test_ref_sokd_branch_from_the_last_stage():
    teacher, student = _net(1, 6), _net(0)
    d = build_distiller(student, teacher, DistillConfig(method="sokd"))
    assert d.branch_layer == "3:in"  # the conv that starts the last (wider) stage
    assert not any(p is q for p in d.branch.parameters() for q in teacher.parameters())
    assert not torch.equal(d.branch[3].weight, teacher[3].weight)  # freshly initialised, as the authors' branch

    def reference(x, y):
        z_t, f = taps(teacher, x, inputs=["3"])
        z_a = d.branch[3:](f["3:in"].detach())  # the branch: its own copy of the last stage and classifier
        return ref_sokd(student(x), z_a, z_t.detach(), y)

    wrt = list(student.parameters()) + list(d.branch.parameters())
    _agrees(d, reference, wrt)
    _agrees(d, reference, wrt, train=True)  # batch statistics in the branch and the student
    assert all(not m._forward_pre_hooks for m in d.branch.modules())
    assert all(p.grad is None for p in teacher.parameters())


def test_sokd_branch_layer_as_an_output_and_from_the_teacher_s_weights():
    teacher = _net(1, 6)
    x, y = _xb()
    a = build_distiller(_net(0), teacher, DistillConfig(method="sokd")).eval()
    b = build_distiller(_net(0), teacher, DistillConfig(method="sokd", params={"branch_layer": "2"})).eval()
    torch.testing.assert_close(b(x, y)["loss"], a(x, y)["loss"])  # the output of ReLU 2 is the input of conv 3
    warm = build_distiller(_net(0), teacher, DistillConfig(method="sokd", params={"reinit": False}))
    assert torch.equal(warm.branch[3].weight, teacher[3].weight) and warm.branch[3].weight.requires_grad
    with pytest.raises(ConfigError, match="teacher has no layer 'nope'; valid layer names: 0, 1"):
        build_distiller(_net(0), teacher, DistillConfig(method="sokd", params={"branch_layer": "nope:in"}))


def test_sokd_branch_on_a_residual_network_starts_at_its_last_stage():
    teacher = create_model("resnet20_cifar", num_classes=K, in_channels=1, width=0.5).double().eval()
    student = create_model("resnet20_cifar", num_classes=K, in_channels=1, width=0.25).double()
    d = build_distiller(student, teacher, DistillConfig(method="sokd"), example_input=torch.zeros(1, 1, 8, 8, dtype=D))
    assert d.branch_layer == "layer3.0:in"  # the authors branch at the input of WRN's block3
    d.eval()
    x = torch.randn(3, 1, 8, 8, dtype=D)
    _, f = taps(teacher, x, inputs=["layer3"])
    b = d.branch
    expected = b.fc(b.flatten(b.pool(b.layer3(f["layer3:in"]))))
    with Substitute(b, d.branch_layer, f["layer3:in"]):
        torch.testing.assert_close(b(x), expected)
    assert not b.layer3[0]._forward_pre_hooks


# --------------------------------------------------------------------------------------------------- byot


def ref_kd_loss_function(output, target_output, temperature):
    """luanyunteng/pytorch-be-your-own-teacher train.py ``kd_loss_function`` (target: softmax(final / T))."""
    output_log_softmax = torch.log_softmax(output / temperature, dim=1)
    return -torch.mean(torch.sum(output_log_softmax * target_output, dim=1))


def ref_feature_loss_function(fea, target_fea):
    """Same file, ``feature_loss_function``."""
    loss = (fea - target_fea) ** 2 * ((fea > 0) | (target_fea > 0)).float().to(fea.dtype)
    return torch.abs(loss).sum()


def ref_byot(output, middle_outputs, final_fea, middle_feas, target, alpha=0.1, temperature=3.0, beta=1e-6):
    """Same file, ``run_training``'s ``total_loss`` (any number of middle heads)."""
    temp4 = torch.softmax(output / temperature, dim=1)
    ce = F.cross_entropy(output, target) + sum(F.cross_entropy(m, target) for m in middle_outputs)
    kd = sum(ref_kd_loss_function(m, temp4.detach(), temperature) * temperature ** 2 for m in middle_outputs)
    feat = sum(ref_feature_loss_function(f, final_fea.detach()) for f in middle_feas)
    return (1 - alpha) * ce + alpha * kd + beta * feat


def test_byot_pure_losses_hand_values():
    f, t = torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([[0.0, -2.0, 3.0]])
    assert float(byot_feature_loss(f, t)) == pytest.approx(1.0 + 9.0)  # the (-1, -2) pair is masked out
    z_final, z = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    # target (3/4, 1/4) at T = 1; head uniform: −Σ target·log(1/2) = log 2
    assert float(byot_kd_loss(z, z_final, 1.0)) == pytest.approx(math.log(2.0))
    assert float(byot_kd_loss(z, z_final * 2, 2.0)) == pytest.approx(4 * math.log(2.0))


def test_ref_byot_heads_kd_and_hints():
    student = _net(0)
    d = build_distiller(student, None, DistillConfig(method="byot"))
    assert d.layers == ["3:in"] and len(d.heads) == 1 and d.final_layer == "7:in"
    # the authors' bottleneck layout: 1x1 (C -> D/4), kxk stride k, 1x1 (D/4 -> D), each conv-BN-ReLU
    convs = [m for m in d.heads[0].bottleneck if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (4, 2, (1, 1), (1, 1)), (2, 2, (1, 1), (1, 1)), (2, 8, (1, 1), (1, 1))]  # same side: k = 1
    assert all(c.bias is not None for c in convs) and d.heads[0].fc.in_features == 8

    def reference(x, y):
        z, f = taps(student, x, inputs=["3", "7"])
        head = d.heads[0]
        mid = F.adaptive_avg_pool2d(head.bottleneck(f["3:in"]), (1, 1))  # the authors' middle_fea [B, D, 1, 1]
        final = f["7:in"].view(f["7:in"].shape[0], -1, 1, 1)
        return ref_byot(z, [head.fc(torch.flatten(mid, 1))], final, [mid], y)

    wrt = list(student.parameters()) + list(d.heads.parameters())
    _agrees(d, reference, wrt)
    _agrees(d, reference, wrt, train=True)
    assert {k.split(".")[0] for k in d.state_dict()} == {"student", "heads"}  # heads saved with the distiller


def test_byot_heads_on_every_stage_of_a_resnet_with_the_authors_strides():
    student = create_model("resnet20_cifar", num_classes=K, in_channels=1, width=0.25)
    assert stage_entries(student) == ["layer2.0:in", "layer3.0:in"]  # outputs of stages 1 and 2
    d = build_distiller(student, None, DistillConfig(method="byot"), example_input=torch.zeros(1, 1, 16, 16))
    strides = [h.bottleneck[3].stride for h in d.heads]
    assert strides == [(4, 4), (2, 2)]  # 16 / 4 and 8 / 4, as the authors' 8, 4, 2 on ResNet-18's 32 -> 4
    assert all(h.bottleneck[6].out_channels == 16 for h in d.heads)  # D = the penultimate width
    out = d.train()(torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert all(p.grad is not None for p in d.heads.parameters())
    assert isinstance(d.heads[0], BYOTHead) and not hasattr(student, "heads")  # the student stays plain


def test_byot_without_an_intermediate_stage_says_which_param_to_set():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, K))
    with pytest.raises(ConfigError, match=r"byot: .*no intermediate stage.*distill.params.layers"):
        build_distiller(mlp, None, DistillConfig(method="byot"))


# --------------------------------------------------------------------------------------------- born_again


def test_ref_born_again_and_architecture_check():
    teacher, student = _net(1), _net(0)
    d = build_distiller(student, teacher, DistillConfig(method="born_again"))

    def reference(x, y):
        z_s, z_t = student(x), teacher(x).detach()
        return F.cross_entropy(z_s, y) + F.kl_div(F.log_softmax(z_s, 1), F.softmax(z_t, 1), reduction="batchmean")

    _agrees(d, reference, list(student.parameters()))
    with pytest.raises(ConfigError, match=r"born_again .*same architecture.*\('0', 'conv2d', \(4, 1, 3, 3\)\).*"
                                          r"\('0', 'conv2d', \(6, 1, 3, 3\)\).*model.student"):
        build_distiller(_net(0), _net(1, 6), DistillConfig(method="born_again"))
    binary = binarize_(_net(2).float(), BinaryConfig())  # binary weights: still the same architecture
    assert layer_signature(binary) == layer_signature(_net(1))
    build_distiller(binary, _net(1).float(), DistillConfig(method="born_again"))
    with pytest.raises(ConfigError, match="generations must be an integer >= 1"):
        build_distiller(_net(0), _net(1), DistillConfig(method="born_again", params={"generations": 0}))


def test_pipeline_trains_two_born_again_generations(tmp_path):
    cfg = load_config(None, ["data.name=digits", "data.limit_train=64", "data.limit_test=32", "student.epochs=1",
                             "run.quiet=true", f"run.out_dir={tmp_path}", "distill.method=born_again",
                             "distill.params.generations=2"])
    with make_context(cfg) as ctx:
        teacher = build_model(ctx.arch("teacher"))  # generation 0 (untrained: only the chain is checked here)
        student = stage_student(ctx, teacher)
        metrics = ctx.run.metrics()
        gen1, record = load_model(tmp_path / "student_gen1.pt")
        last, last_record = load_model(tmp_path / "student.pt")
        assert record["generation"] == 1 and record["distill"]["params"]["generations"] == 2
        assert {"student_gen1", "student"} <= set(metrics)
        assert (tmp_path / "checkpoints" / "student_gen2_last.pt").is_file()
        assert not torch.equal(next(iter(gen1.state_dict().values())), next(iter(last.state_dict().values())))
        # the last generation learnt from generation 1: its recorded fidelity is to generation 1
        f = fidelity(student, gen1, ctx.loaders.test, ctx.device)
        assert metrics["student"]["teacher_agreement"] == pytest.approx(f["agreement"])


# ------------------------------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("method", ["switokd", "sokd", "byot", "born_again"])
def test_training_reduces_the_loss(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()  # a learnable 4-class rule
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    student, teacher = _net(0).float(), _net(1, 4 if method == "born_again" else 6).float()
    d = build_distiller(student, None if method == "byot" else teacher, DistillConfig(method=method))
    hist = fit(d, student, loader, TrainConfig(epochs=12, lr=0.02, schedule="constant"), quiet=True)
    assert hist[-1]["train_loss"] < 0.9 * hist[0]["train_loss"], hist


def test_born_again_with_another_student_architecture_is_refused_before_anything_is_trained():
    bad = load_config(None, ["distill.method=born_again", "model.teacher=small_cnn", "model.student=vgg7_cifar"])
    with pytest.raises(ConfigError, match=r"model.student=vgg7_cifar differs from model.teacher=small_cnn"):
        check_models(bad)
    check_models(load_config(None, ["distill.method=born_again", "model.teacher=small_cnn"]))  # student = teacher's
    check_models(load_config(None, ["distill.method=born_again", "model.teacher=small_cnn",
                                    "model.student=vgg7_cifar", "distill.params={strict: false}"]))
