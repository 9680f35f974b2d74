"""Teacher-side methods (metadistil, prue, prune_distill) against references restated from the authors' code.

The ``ref_*`` functions are written from the authors' public training code (repository/file in each docstring),
with torch's own pruning utilities (``torch.nn.utils.prune``, as the authors use them) and an explicit functional
forward of the test network (as MetaDistil's ``model(x, params=fast_weights)`` meta-models), not from bsnn's
implementation. Values and gradients are compared in float64 at 1e-6 relative.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import DistillConfig, TrainConfig, load_config
from bsnn.distill import build_distiller
from bsnn.distill.teacher_side import (apply_masks_, global_threshold_masks, magnitude_round_masks, mask_gradients_,
                                       pruning_rounds, student_plan, weight_sparsity)
from bsnn.errors import ConfigError
from bsnn.train import fit
from tests._distill_helpers import xb

D = torch.float64
RTOL, ATOL = 1e-6, 1e-12
K = 5


def _net(seed: int, width: int = 4) -> nn.Sequential:
    """conv -> BN -> ReLU -> conv -> ReLU -> global average pool -> Linear (float64)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, K),
    ).double()


def _teacher(seed: int = 1, width: int = 6) -> nn.Sequential:
    """A teacher with non-trivial BN running statistics (so eval-mode BN matters)."""
    t = _net(seed, width)
    with torch.no_grad():
        t[1].running_mean.uniform_(-0.5, 0.5)
        t[1].running_var.uniform_(0.5, 2.0)
    return t


_xb = xb


def _f(p: list, x: torch.Tensor) -> torch.Tensor:
    """The test network written out with explicit parameters ``[w0, b0, g1, b1, w3, b3, w7, b7]``, BN in training
    mode (batch statistics), as MetaDistil's meta-models run with ``params=fast_weights``."""
    h = F.conv2d(x, p[0], p[1], padding=1)
    h = F.relu(F.batch_norm(h, None, None, p[2], p[3], training=True, eps=1e-5))
    h = F.relu(F.conv2d(h, p[4], p[5], padding=1))
    return F.linear(h.mean(dim=(2, 3)), p[6], p[7])


def _kl_batchmean(z_s, z_t, t):
    return F.kl_div(F.log_softmax(z_s / t, dim=1), F.softmax(z_t / t, dim=1), reduction="batchmean") * t * t


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    pb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        torch.testing.assert_close(p, pb[n], rtol=0, atol=0)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------------- MetaDistil


def ref_metadistil(student, teacher, x, y, eta, alpha=0.9, t=4.0, quiz_fraction=0.1):
    """JetRunner/MetaDistil cv/helper/meta_loops.py ``train_distill`` (num_meta_batches=1) with the quiz rows held
    out of the batch: Step 1 pilot ``fast_weights = θ − η·∇(α·CustomDistillKL + (1−α)·CE)`` (create_graph), Step 2
    ``t_grads = ∇_θt CE(S'(x_quiz), y_quiz)``, Step 3 the real loss with the teacher's logits as constants.
    Returns ``(real + quiz value, student grads of real, teacher grads of quiz)``."""
    b = x.shape[0]
    n = b - max(1, math.ceil(quiz_fraction * b))
    xs, ys, xq, yq = x[:n], y[:n], x[n:], y[n:]
    theta = list(student.parameters())
    theta_t = list(teacher.parameters())

    def custom_kl(y_s, y_t):  # distiller_zoo/KD.py CustomDistillKL
        p_s = F.log_softmax(y_s / t, dim=1)
        p_t = F.softmax(y_t / t, dim=1)
        return (p_t * (p_t.log() - p_s)).sum(dim=1).mean(dim=0) * (t ** 2)

    logit_s, logit_t = _f(theta, xs), teacher(xs)
    assume = alpha * custom_kl(logit_s, logit_t) + (1 - alpha) * F.cross_entropy(logit_s, ys)
    grads = torch.autograd.grad(assume, theta, create_graph=True, retain_graph=True)
    fast = [p - eta * g for p, g in zip(theta, grads)]
    s_prime = F.cross_entropy(_f(fast, xq), yq)
    t_grads = torch.autograd.grad(s_prime, theta_t)
    z = _f(theta, x)[:n]  # one forward of the whole batch (bsnn's split); the loss on the training rows
    with torch.no_grad():
        z_t = teacher(xs)
    real = alpha * custom_kl(z, z_t) + (1 - alpha) * F.cross_entropy(z, ys)
    s_grads = torch.autograd.grad(real, theta)
    return (real + s_prime).detach(), s_grads, t_grads


@pytest.mark.parametrize("epoch, eta", [(None, 0.05), (160, 0.005)])
def test_metadistil_value_and_gradients_equal_the_authors_loop(epoch, eta):
    student, teacher = _net(0), _teacher()
    d = build_distiller(student, teacher, DistillConfig(method="metadistil"), epochs=240).train()
    if epoch is not None:
        d.set_epoch(epoch)
    assert d.pilot_lr() == pytest.approx(eta)
    x, y = _xb()
    out = d(x, y)
    ref, s_grads, t_grads = ref_metadistil(student, d.meta_teacher, x, y, eta)
    _close(out["loss"], ref)
    g = torch.autograd.grad(out["loss"], list(student.parameters()) + list(d.meta_teacher.parameters()))
    _close(list(g[:len(s_grads)]), list(s_grads))
    _close(list(g[len(s_grads):]), list(t_grads))
    assert any(v.abs().max() > 0 for v in t_grads)  # the meta-gradient is not trivially zero


def test_metadistil_schedule_owns_a_teacher_copy_and_keeps_bn_statistics():
    student, teacher = _net(0), _teacher()
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = build_distiller(student, teacher, DistillConfig(method="metadistil"), epochs=24)
    assert d.hparams["teacher_delay"] == pytest.approx(14.9) and d.milestones == pytest.approx([14.9, 17.9, 20.9])
    for epoch, active, eta in ((14, False, 0.05), (15, True, 0.005), (18, True, 0.0005), (23, True, 0.00005)):
        d.set_epoch(epoch)
        assert d.teacher_active() == active and d.pilot_lr() == pytest.approx(eta)
    d.train()
    assert student.training and not d.meta_teacher.training and d.meta_teacher is not teacher
    assert any(k.startswith("meta_teacher.") for k in d.state_dict())  # checkpointed with the distiller
    x, y = _xb()
    d.set_epoch(0)  # teacher frozen: no quiz term, no teacher gradient
    out = d(x, y)
    assert "quiz" not in out
    out["loss"].backward()
    assert all(p.grad is None for p in d.meta_teacher.parameters())
    # the pilot / quiz forwards leave the student's BN statistics as one real forward leaves them
    d.set_epoch(20)
    twin = copy.deepcopy(student)
    d(x, y)
    twin(x)
    _close(student[1].running_mean, twin[1].running_mean)
    assert int(student[1].num_batches_tracked) == int(twin[1].num_batches_tracked)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t0[k]), k  # the user's teacher is never changed


def test_metadistil_quiz_loader_and_single_row_batches():
    student, teacher = _net(0), _teacher()
    xq, yq = _xb(3, seed=5)
    d = build_distiller(student, teacher, DistillConfig(method="metadistil"), quiz_loader=[(xq, yq)], epochs=240)
    x, y = _xb()
    out = d.train()(x, y)
    assert torch.isfinite(out["loss"]) and "quiz" in out
    one = d(x[:1], y[:1])  # with a quiz loader even a one-row batch gets its teacher update
    assert torch.isfinite(one["loss"]) and "quiz" in one
    d2 = build_distiller(_net(0), _teacher(), DistillConfig(method="metadistil"), epochs=240).train()
    assert "quiz" not in d2(x[:1], y[:1])  # one row: nothing to hold out, the student still trains
    with pytest.raises(ConfigError, match="quiz_fraction"):
        build_distiller(_net(0), _teacher(), DistillConfig(method="metadistil", params={"quiz_fraction": 1.0}),
                        epochs=240)
    with pytest.raises(ConfigError, match="exactly one teacher"):
        build_distiller(_net(0), [_teacher(), _teacher(2)], DistillConfig(method="metadistil"))


def test_metadistil_quiz_term_with_a_loader_equals_the_reference():
    student, teacher = _net(0), _teacher()
    xq, yq = _xb(2, seed=5)
    d = build_distiller(student, teacher, DistillConfig(method="metadistil"), quiz_loader=[(xq, yq)], epochs=240)
    x, y = _xb()
    out = d.train()(x, y)
    theta, t = list(student.parameters()), 4.0
    z_s, z_t = _f(theta, x), d.meta_teacher(x)
    assume = 0.9 * _kl_batchmean(z_s, z_t, t) + 0.1 * F.cross_entropy(z_s, y)
    grads = torch.autograd.grad(assume, theta, create_graph=True)
    quiz = F.cross_entropy(_f([p - 0.05 * g for p, g in zip(theta, grads)], xq), yq)
    _close(out["quiz"], quiz.detach())
    _close(list(torch.autograd.grad(out["loss"], list(d.meta_teacher.parameters()))),
           list(torch.autograd.grad(quiz, list(d.meta_teacher.parameters()))))


# ----------------------------------------------------------------------------------------------------- PrUE


def ref_prue_prune(teacher: nn.Module, data, sparsity: float) -> nn.Module:
    """wangshaopu/prue utils.py ``model_prune`` + pruner.py ``prue``: torch pruning masks on every nn.Conv2d made
    differentiable; class means of the true-class probability; ``Σ torch.norm(predict[c] − p_c)`` backward per batch;
    global ``kthvalue`` threshold; ``mask = |grad| > thre``. Returns the pruned (mask-applied) copy."""
    model = copy.deepcopy(teacher)
    model.eval()
    convs = tuple((m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d))
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0)
    total = 0
    for name, buf in model.named_buffers():
        if name.endswith("_mask"):
            buf.requires_grad = True
            total += buf.numel()
    num_classes = int(max(int(y.max()) for _, y in data)) + 1
    with torch.no_grad():
        predict = [[] for _ in range(num_classes)]
        for img, target in data:
            softmax_p = F.softmax(model(img), dim=1)
            for row, index in zip(softmax_p, target):
                predict[index].append(row[index])
        predict = [torch.stack(v).mean() if v else torch.tensor(float("nan"), dtype=D) for v in predict]
    for img, target in data:
        softmax_p = F.softmax(model(img), dim=1)
        all_std = 0
        for row, index in zip(softmax_p, target):
            all_std = all_std + torch.norm(predict[index] - row[index])
        all_std.backward()
    global_score = torch.cat([buf.grad.view(-1).abs() for name, buf in model.named_buffers()
                              if name.endswith("_mask")])
    thre, _ = torch.kthvalue(global_score, int(sparsity * total))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("_mask"):
                buf.requires_grad = False
                buf.mul_(buf.grad.abs().gt(thre).to(buf.dtype))
    for m, _ in convs:
        prune.remove(m, "weight")
    return model


def _prue_kd(z_s, z_t, y, t=4.0):
    """wangshaopu/prue trainModule.py DistillModule: ``(1 − α)·SoftTarget + α·CE``, α = 0.9."""
    return 0.1 * _kl_batchmean(z_s, z_t.detach(), t) + 0.9 * F.cross_entropy(z_s, y)


@pytest.mark.parametrize("with_loader", [True, False])
def test_prue_pruning_and_loss_equal_the_authors_code(with_loader):
    student, teacher = _net(0), _teacher()
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = [_xb(5, seed=1), _xb(7, seed=2)]
    x, y = _xb()
    kw = {"prune_loader": data} if with_loader else {}
    d = build_distiller(student, teacher, DistillConfig(method="prue"), **kw).eval()
    out = d(x, y)
    ref_teacher = ref_prue_prune(teacher, data if with_loader else [(x, y)], 0.5)
    _same_weights(d.sparse_teacher, ref_teacher)
    assert weight_sparsity(d.sparse_teacher, (nn.Conv2d,)) == pytest.approx(0.5, abs=0.01)
    ref = _prue_kd(student(x), ref_teacher(x), y)
    _close(out["loss"], ref)
    _close(list(torch.autograd.grad(out["loss"], list(student.parameters()))),
           list(torch.autograd.grad(ref, list(student.parameters()))))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t0[k]), k  # the user's teacher is never pruned


def test_prue_prunes_once_and_resumes_from_the_checkpointed_copy():
    x, y = _xb()
    d = build_distiller(_net(0), _teacher(), DistillConfig(method="prue"))
    assert not bool(d.pruned)
    d.train()(x, y)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    w = d.sparse_teacher[0].weight.clone()
    d(*_xb(seed=3))  # a second batch does not prune again
    assert torch.equal(d.sparse_teacher[0].weight, w)
    again = build_distiller(_net(0), _teacher(), DistillConfig(method="prue"))
    again.load_state_dict(state)
    again(*_xb(seed=4))
    assert torch.equal(again.sparse_teacher[0].weight, w) and bool(again.pruned)
    assert not d.sparse_teacher.training and not any(p.requires_grad for p in d.sparse_teacher.parameters())
    with pytest.raises(ConfigError, match="sparsity"):
        build_distiller(_net(0), _teacher(), DistillConfig(method="prue", params={"sparsity": 1.0}))
    dense = build_distiller(_net(0), _teacher(), DistillConfig(method="prue", params={"sparsity": 0.0}))
    assert bool(dense.pruned) and weight_sparsity(dense.sparse_teacher) == 0.0


def test_global_threshold_masks_hand_value():
    scores = {"a": torch.tensor([0.1, 0.5, 0.3]), "b": torch.tensor([[0.2, 0.4]])}
    m = global_threshold_masks(scores, 0.4)  # k = int(0.4 · 5) = 2 -> threshold 0.2: keep > 0.2
    assert m["a"].tolist() == [0.0, 1.0, 1.0] and m["b"].tolist() == [[0.0, 1.0]]
    assert global_threshold_masks(scores, 0.1)["a"].tolist() == [1.0, 1.0, 1.0]  # k = 0: nothing pruned


# -------------------------------------------------------------------------------------------- prune_distill


def ref_prune_then_distill(teacher: nn.Module, pruning_ratio: float = 0.8) -> nn.Module:
    """ososos888/prune-then-distill pruning/lr_rewinding.py ``pruning_loop`` (without its fine-tuning): rounds of
    ``prune.global_unstructured(conv + linear weights, L1Unstructured, amount=0.2)`` on the masked model."""
    model = copy.deepcopy(teacher)
    rounds = min(range(1, 100), key=lambda n: (abs(pruning_ratio - (1 - 0.8 ** n)), n))
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for _ in range(rounds):
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.2)
    for m, name in layers:
        prune.remove(m, name)
    return model


def ref_loss_fn_kd(outputs, labels, teacher_outputs, alpha=0.95, t=10.0):
    """ososos888/prune-then-distill kd/kd_vanilla.py ``loss_fn_kd``."""
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(outputs / t, dim=1),
                                               F.softmax(teacher_outputs / t, dim=1)) * (alpha * t * t) + \
        F.cross_entropy(outputs, labels) * (1. - alpha)


def test_prune_distill_pruning_and_loss_equal_the_authors_code():
    student, teacher = _net(0), _teacher(width=8)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = build_distiller(student, teacher, DistillConfig(method="prune_distill")).eval()
    ref_teacher = ref_prune_then_distill(teacher)
    _same_weights(d.sparse_teacher, ref_teacher)
    assert d.rounds == 7 and weight_sparsity(d.sparse_teacher) == pytest.approx(1 - 0.8 ** 7, abs=0.01)
    x, y = _xb()
    out = d(x, y)
    ref = ref_loss_fn_kd(student(x), y, ref_teacher(x).detach())
    _close(out["loss"], ref)
    _close(list(torch.autograd.grad(out["loss"], list(student.parameters()))),
           list(torch.autograd.grad(ref, list(student.parameters()))))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t0[k]), k


def test_pruning_rounds_match_the_closest_sparsity():
    for ratio in (0.2, 0.36, 0.5, 0.59, 0.7, 0.79, 0.8, 0.9, 0.95):
        brute = min(range(0, 200), key=lambda n: (abs(ratio - (1 - 0.8 ** n)), n))
        assert pruning_rounds(ratio) == brute, ratio
    assert pruning_rounds(3) == 3


def test_magnitude_round_masks_hand_value():
    w = {"a": torch.tensor([0.1, -0.9, 0.3, 0.05]), "b": torch.tensor([-0.2, 0.7])}
    m = {"a": torch.tensor([1.0, 1.0, 1.0, 0.0]), "b": torch.ones(2)}
    out = magnitude_round_masks(w, m, 0.4)  # 5 alive, round(2.0) = 2 smallest |w| alive: 0.1 and -0.2
    assert out["a"].tolist() == [0.0, 1.0, 1.0, 0.0] and out["b"].tolist() == [0.0, 1.0]
    assert m["a"].tolist() == [1.0, 1.0, 1.0, 0.0]  # inputs untouched


def test_student_plan_from_the_pruned_teacher_hand_value():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(16, 10))
    masks = {"0": torch.zeros(8, 3, 3, 3), "2": torch.zeros(16, 8, 3, 3)}
    masks["0"].view(-1)[:4 * 27] = 1   # as many weights as a dense 3 -> 4 conv: width 4
    masks["2"].view(-1)[:6 * 9 * 4] = 1  # a dense 4 -> 6 conv (the student's previous width is 4): width 6
    apply_masks_(teacher, masks)
    assert student_plan(teacher) == [4, 6]
    assert student_plan(nn.Sequential(nn.Conv2d(3, 8, 3))) == [8]  # dense: the teacher's own width


def test_mask_gradients_keep_pruned_weights_zero_while_fine_tuning():
    teacher = _teacher()
    modules = {"0": teacher[0], "3": teacher[3]}
    masks = magnitude_round_masks({n: m.weight for n, m in modules.items()},
                                  {n: torch.ones_like(m.weight) for n, m in modules.items()}, 0.5)
    apply_masks_(teacher, masks)
    handles = mask_gradients_(teacher, masks)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = _xb()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    for n, m in modules.items():
        assert torch.all(m.weight[masks[n] == 0] == 0)
    for h in handles:
        h.remove()


# -------------------------------------------------------------------------------------------- training smoke


@pytest.mark.parametrize("method", ["metadistil", "prue", "prune_distill"])
def test_a_few_steps_reduce_the_loss_and_fit_runs(method):
    student, teacher = _net(0), _teacher(width=8)
    d = build_distiller(student, teacher, DistillConfig(method=method), epochs=240)
    d.train()
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    x, y = _xb(12, seed=7)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = d(x, y)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach() - out.get("quiz", 0.0)))  # the student's own loss
    assert losses[-1] < losses[0]
    if method == "metadistil":  # the meta-gradient alone makes the teacher teach better: the quiz loss falls
        student, teacher = _net(0), _teacher(width=8)
        d = build_distiller(student, teacher, DistillConfig(method=method), epochs=240).train()
        opt = torch.optim.SGD(d.meta_teacher.parameters(), lr=5.0)
        quiz = []
        for _ in range(6):
            opt.zero_grad()
            out = d(x, y)
            out["loss"].backward()
            opt.step()
            quiz.append(float(out["quiz"]))
        assert all(b < a for a, b in zip(quiz, quiz[1:]))
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 1, 6, 6, generator=g, dtype=D), torch.randint(0, K, (16,), generator=g))
    s2, t2 = _net(3), _teacher(width=8)
    params = {"teacher_delay": 0} if method == "metadistil" else {}
    d2 = build_distiller(s2, t2, DistillConfig(method=method, params=params), epochs=2)
    hist = fit(d2, s2, DataLoader(ds, batch_size=8), TrainConfig(epochs=2, lr=0.01), quiet=True)
    assert len(hist) == 2 and all(math.isfinite(h["train_loss"]) for h in hist)
    if method == "metadistil":
        assert not torch.equal(d2.meta_teacher[0].weight, t2[0].weight)  # the copy learned
    else:
        assert weight_sparsity(d2.sparse_teacher, d2.pruned_kinds) > 0.45


def test_methods_run_from_the_cli_config():
    cfg = load_config(None, ["distill.method=prune_distill", "distill.params.pruning_ratio=0.5"])
    assert cfg.distill.method == "prune_distill" and cfg.distill.params == {"pruning_ratio": 0.5}
    for method in ("metadistil", "prue"):
        load_config(None, [f"distill.method={method}"]).distill.validate()
    with pytest.raises(ConfigError, match="valid keys"):
        DistillConfig(method="prue", params={"ratio": 0.5}).validate()


def test_prune_distill_builds_the_student_from_the_pruned_teacher(tmp_path):
    """``distill.params.student_plan: true``: ``bsnn run`` gives the student the pruned teacher's widths
    (:func:`student_plan`), saves that architecture with it, and converts and reloads it (the spiking network's
    record rebuilds the same student)."""
    import json

    from bsnn.cli import main
    from bsnn.distill.teacher_side import student_plan
    from bsnn.pipeline import load_model, load_snn

    out = tmp_path / "run"
    args = ["data.name=digits", "data.limit_train=256", "data.limit_test=64", "model.teacher=plain_vgg8", "model.student=plain_vgg8",
            "model.kwargs={width: 8, input_size: 8}", "train.epochs=1", "student.epochs=1",
            "distill.method=prune_distill", "distill.params={student_plan: true}", "convert.calib_samples=64",
            "convert.snn_calibration_samples=32", "simulate.timesteps=[1,4]", "cost.enabled=false", "--quiet"]
    assert main(["run", "--out", str(out), *args]) == 0
    teacher, _ = load_model(out / "teacher.pt")
    pruned = copy.deepcopy(teacher)
    apply_masks_(pruned, type(build_distiller(copy.deepcopy(teacher), teacher, DistillConfig(
        method="prune_distill"))).pruned_masks(pruned, {"pruning_ratio": 0.8, "round_fraction": 0.2}))
    plan = student_plan(pruned)
    student, record = load_model(out / "student.pt")
    assert record["arch"]["kwargs"]["channels"] == plan != [8, 8, 16, 16, 32, 32]
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == plan
    snn, ck = load_snn(out / "snn.pt")
    assert ck["arch"]["kwargs"]["channels"] == plan
    assert json.loads((out / "metrics.json").read_text())["snn"]["accuracy"]


def test_metadistil_teacher_has_its_own_sgd_and_fit_leaves_it_out():
    """The student's optimiser (here Adam) never touches the teacher copy; the teacher moves by its own SGD at the
    pilot step η once active (teacher_delay 0), and a frozen teacher (delay beyond the run) does not move."""
    from bsnn.train import param_groups

    ds = TensorDataset(*xb(32))
    for delay, moves in ((0.0, True), (5.0, False)):
        student, teacher = _net(0), _teacher()
        d = build_distiller(student, teacher, DistillConfig(method="metadistil", params={"teacher_delay": delay}),
                            epochs=1)
        own = {id(p) for p in d.meta_teacher.parameters()}
        assert not own & {id(p) for grp in param_groups(d, 1e-4) for p in grp["params"]}
        w0 = d.meta_teacher[0].weight.detach().clone()
        fit(d, student, DataLoader(ds, batch_size=8), TrainConfig(epochs=1, lr=0.01, optimizer="adam"), quiet=True)
        assert (not torch.equal(d.meta_teacher[0].weight, w0)) == moves
        assert all(p.grad is None for p in d.meta_teacher.parameters())
