"""sakd, lipschitz and ie_kd (bsnn/distill/adaptive.py) against restatements of their authors' code.

The ``ref_*`` functions are written from the authors' public code (repository and file in each docstring), not from
bsnn's; every method is compared for value and gradient at 1e-6 relative in float64. SAKD's reference grafts by
slicing the ``nn.Sequential`` into segments (the authors' ``model(x, begin, end)``), where bsnn replaces hooked
values; its two optimisers are restated as two losses, each differentiated w.r.t. its own parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import DistillConfig, TrainConfig
from bsnn.distill import build_distiller
from bsnn.distill.adaptive import Coder, spectral_norm_power
from bsnn.errors import ConfigError
from bsnn.train import fit
from tests._distill_helpers import grads, taps, xb

D = torch.float64
K = 5
RTOL, ATOL = 1e-6, 1e-12


def _net(seed: int, width: int = 4) -> nn.Sequential:
    """Conv -> BN -> ReLU (mid map) -> Conv -> ReLU -> global pool -> Linear, in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),       # 0 1 2
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),                      # 3 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, K),            # 5 6 7
    ).double()


def _teacher(seed: int = 1, width: int = 6) -> nn.Sequential:
    t = _net(seed, width)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # a trained-looking BatchNorm: the margins depend on its affine parameters
        t[1].weight.copy_(torch.rand(width, generator=g, dtype=D) + 0.5)
        t[1].bias.copy_(torch.randn(width, generator=g, dtype=D))
        t[1].running_mean.copy_(torch.randn(width, generator=g, dtype=D) * 0.1)
        t[1].running_var.copy_(torch.rand(width, generator=g, dtype=D) + 0.5)
    return t


_xb = xb


_taps = taps


_grads = grads


def _buffers(model: nn.Module) -> dict:
    return {(m, n): b.clone() for m in model.modules() for n, b in m._buffers.items() if b is not None}


def _restore(saved: dict) -> None:
    """Put back BatchNorm statistics as new tensors (the first forward's graph keeps the old ones)."""
    for (m, n), b in saved.items():
        m._buffers[n] = b.clone()


def _close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------- LONDON


def ref_transmitting_matrix(fm1, fm2):
    """42Shawn/LONDON CIFAR-100/distiller_london.py ``Distiller.transmitting_matrix``."""
    if fm1.size(2) > fm2.size(2):
        fm1 = F.adaptive_avg_pool2d(fm1, (fm2.size(2), fm2.size(3)))
    fm1 = fm1.view(fm1.size(0), fm1.size(1), -1)
    fm2 = fm2.view(fm2.size(0), fm2.size(1), -1).transpose(1, 2)
    return torch.bmm(fm1, fm2) / fm1.size(2)


def ref_top_eigenvalue(k, n_power_iterations=10):
    """LONDON ``Distiller.top_eigenvalue`` (v₀ = ones as in ImageNet/distiller_london.py; CIFAR draws rand)."""
    v = torch.ones(k.shape[0], k.shape[1], 1, dtype=k.dtype)
    for _ in range(n_power_iterations):
        m = torch.bmm(k, v)
        n = torch.norm(m, dim=1).unsqueeze(1)
        v = m / n
    return torch.sqrt(n / torch.norm(v, dim=1).unsqueeze(1))


def ref_distillation_loss(source, target, margin):
    """LONDON ``distillation_loss`` (Overhaul's partial L2 with margins)."""
    target = torch.max(target, margin)
    loss = F.mse_loss(source, target, reduction="none")
    loss = loss * ((source > target) | (target > 0)).to(source.dtype)
    return loss.sum()


def ref_margin_from_bn(bn):
    """LONDON ``get_margin_from_BN`` (scipy.stats.norm)."""
    margin = []
    for s, m in zip(bn.weight.data, bn.bias.data):
        s, m = abs(s.item()), m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=D)


def ref_london(s_feats, t_feats, connectors, margins, b, alpha=0.8, beta=1.0):
    """LONDON ``Distiller.forward`` + ``train_with_distillation_a.py``'s
    ``beta·loss_distill.sum()/batch_size/1000 + alpha·loss_spectral.sum()/200`` (without the CE)."""
    s_feats = list(s_feats)
    feat_num = len(t_feats)
    loss_distill, loss_london = 0, 0
    for i in range(feat_num):
        s_feats[i] = connectors[i](s_feats[i])
        loss_distill += ref_distillation_loss(s_feats[i], t_feats[i].detach(), margins[i]) / 2 ** (feat_num - i - 1)
        if i < feat_num - 1:
            tm = ref_transmitting_matrix(s_feats[i], s_feats[i + 1])
            tm_s = torch.bmm(tm, tm.transpose(2, 1))
            tt = ref_transmitting_matrix(t_feats[i].detach(), t_feats[i + 1].detach())
            tm_t = torch.bmm(tt, tt.transpose(2, 1))
            loss_london += F.mse_loss(ref_top_eigenvalue(tm_s), ref_top_eigenvalue(tm_t)) / 2 ** (feat_num - i - 1)
    return beta * loss_distill / b / 1000 + alpha * loss_london / 200


def test_lipschitz_matches_the_authors_distiller_value_and_gradient():
    s, t = _net(0), _teacher()
    layers = {"student_layer": ["1", "3"], "teacher_layer": ["1", "3"]}  # BN (pre-ReLU) then conv maps
    d = build_distiller(s, t, DistillConfig(method="lipschitz", params=layers), epochs=200)
    assert d.hparams["decay_epoch"] == 120.0  # 60 % of the run
    _close(d.margin0.flatten(), ref_margin_from_bn(t[1]))  # from the teacher's BN affine parameters
    assert torch.isinf(d.margin1).all() and (d.margin1 < 0).all()  # a conv tap has no margin
    d.train()
    x, y = _xb()
    snapshot = _buffers(d)
    out = d(x, y)
    _restore(snapshot)  # the reference forward sees the same BN state
    z, fs = _taps(s, x, outputs=["1", "3"])
    _, ft = _taps(t, x, outputs=["1", "3"])
    margins = [ref_margin_from_bn(t[1]).view(1, -1, 1, 1), torch.full((1, 12, 1, 1), -math.inf, dtype=D)]
    ref = F.cross_entropy(z, y) + ref_london([fs["1"], fs["3"]], [ft["1"], ft["3"]], d.connectors, margins, 6)
    _close(out["loss"], ref)
    wrt = list(s.parameters()) + list(d.connectors.parameters())
    _close(_grads(out["loss"], wrt), _grads(ref, wrt))
    assert out["lipschitz"] > 0 and out["margin_feature"] > 0


def test_lipschitz_spectral_weight_decays_late_and_default_layers():
    s, t = _net(0), _teacher()
    d = build_distiller(s, t, DistillConfig(method="lipschitz"), epochs=200)
    assert d.student_layers == ["0", "3"] and d.teacher_layers == ["0", "3"]  # the last two convs
    d.eval()
    x, y = _xb()
    early = d(x, y)
    _close(early["loss"], early["ce"] + 0.004 * early["lipschitz"] + 1e-3 * early["margin_feature"])
    d.set_epoch(120)
    late = d(x, y)
    _close(late["loss"], late["ce"] + 0.25 * 0.004 * late["lipschitz"] + 1e-3 * late["margin_feature"])
    with pytest.raises(ConfigError, match="at least two"):
        build_distiller(s, t, DistillConfig(method="lipschitz", params={"student_layer": "3"}), epochs=10)


def test_lipschitz_pools_maps_of_different_sizes_in_the_margin_term():
    """A teacher whose maps are smaller (its first conv unpadded: 6x6 -> 4x4, as airbench's stem against bsnn's
    student) trains: the connector output is average-pooled to the teacher's size for the partial L2 (the authors'
    code assumes equal sizes), as the transmitting matrices already are."""
    s, t = _net(0), _teacher()
    t[0].padding = (0, 0)
    layers = {"student_layer": ["1", "3"], "teacher_layer": ["1", "3"]}
    d = build_distiller(s, t, DistillConfig(method="lipschitz", params=layers), epochs=200)
    d.eval()
    x, y = _xb()
    out = d(x, y)
    _, fs = _taps(s, x, outputs=["1", "3"])
    _, ft = _taps(t, x, outputs=["1", "3"])
    assert fs["1"].shape[-1] == 6 and ft["1"].shape[-1] == 4
    margins = [d.margin0, d.margin1]
    pooled = [F.adaptive_avg_pool2d(d.connectors[i](fs[k]), ft[k].shape[-2:]) for i, k in enumerate(["1", "3"])]
    ref = sum(ref_distillation_loss(pooled[i], ft[k], margins[i]) / 2 ** (1 - i)
              for i, k in enumerate(["1", "3"])) / x.shape[0]
    _close(out["margin_feature"], ref)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in s.parameters())


def test_power_iteration_converges_to_the_spectral_norm():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 5, 4, generator=g, dtype=D)
    _close(spectral_norm_power(m, iterations=200).flatten(), torch.linalg.matrix_norm(m, ord=2))
    few = spectral_norm_power(m, iterations=3).flatten()  # from below once v is a unit vector: ‖K v‖ ≤ λ_max
    assert (few <= torch.linalg.matrix_norm(m, ord=2) + 1e-12).all() and (few > 0.5 * few.new_tensor(1.0)).all()


# --------------------------------------------------------------------------------------------------- SAKD


def ref_gumbel_softmax(logits, u, temperature=5.0, eps=1e-20):
    """zju-vipa/spot-adaptive-pytorch models/gs.py ``gumbel_softmax`` (``u`` = the uniform draw)."""
    y = F.softmax((logits - torch.log(-torch.log(u + eps) + eps)) / temperature, dim=-1)
    shape = y.size()
    _, ind = y.max(dim=-1)
    y_hard = torch.zeros_like(y).view(-1, shape[-1])
    y_hard.scatter_(1, ind.view(-1, 1), 1)
    return (y_hard.view(*shape) - y).detach() + y


def ref_at(f_s, f_t, p=2):
    """spot-adaptive-pytorch distiller_zoo/AT.py ``Attention.at_loss`` (equal map sizes)."""
    at = lambda f: F.normalize(f.pow(p).mean(1).view(f.size(0), -1))  # noqa: E731
    return (at(f_s) - at(f_t)).pow(2).mean()


def ref_kl(y_s, y_t, t=4.0):
    """spot-adaptive-pytorch distiller_zoo/KD.py ``DistillKL``."""
    return F.kl_div(F.log_softmax(y_s / t, dim=1), F.softmax(y_t / t, dim=1), reduction="batchmean") * t ** 2


def ref_sakd(d, s, t, x, y, u, spots=(3,), gamma=2.0, alpha=1.0, beta=1000.0):
    """spot-adaptive-pytorch train.py ``train_epoch`` for AT at the outputs of the Sequential's modules ``spots``:
    returns ``(loss, loss_cls)``, the student's loss and the policy's (agent optimiser) loss."""
    names = [str(i) for i in spots]
    z_t, ft = _taps(t, x, outputs=names, inputs=["7"])
    z_s, fs = _taps(s, x, outputs=names, inputs=["7"])
    z_t = z_t.detach()
    policy_res = d.policy(torch.cat((ft["7:in"].detach(), fs["7:in"].detach()), 1))
    action = ref_gumbel_softmax(policy_res.view(policy_res.size(0), -1, 2), u, temperature=5)
    ac = [action[:, i, 0].contiguous().view(-1) for i in range(action.shape[1])]  # .float(): a no-op in fp32
    b = z_s.shape[0]
    loss_kd = torch.zeros((), dtype=D)
    for k, n in enumerate(names):
        sel = ac[k].detach() > 0.5
        if sel.sum() > 0:
            loss_kd = loss_kd + ref_at(fs[n][sel], ft[n][sel].detach()) * int(sel.sum()) / b
    loss_div = torch.zeros((), dtype=D)
    sel = ac[-1].detach() > 0.5
    if sel.sum() > 0:
        loss_div = loss_div + ref_kl(z_s[sel], z_t[sel]) * int(sel.sum()) / b
    # graft: the segments between the spots (the authors' model(x, begin, end)); the student in eval mode
    s.eval()
    bounds = [0] + [i + 1 for i in spots] + [len(s)]
    to_s, to_t = x, x
    for k in range(len(bounds) - 1):
        mid_s, mid_t = s[bounds[k]:bounds[k + 1]](to_s), t[bounds[k]:bounds[k + 1]](to_t)
        if k < len(spots):
            a = ac[k].view(-1, 1, 1, 1)
            to_t = (1 - a) * d.hints[k](mid_s) + a * mid_t
            to_s = (1 - a) * mid_s + a * d.anti_hints[k](mid_t)
    out_ac = ac[-1].view(-1, 1)
    logit = mid_s * (1 - out_ac) + mid_t * out_ac
    s.train()
    loss_cls = F.cross_entropy(logit, y)
    loss_ori_cls = F.cross_entropy(z_s, y)
    if loss_cls > loss_ori_cls:
        loss_cls = loss_cls * gamma
    if loss_cls < loss_ori_cls:
        loss_cls = loss_cls / gamma
    loss_cls = loss_cls + max(0, b / 2 - sum(ac[-1]))
    return loss_ori_cls + (beta * loss_kd + alpha * loss_div), loss_cls


def _sakd(homo: bool = False, **extra):
    s, t = _net(0), _teacher()
    d = build_distiller(s, t, DistillConfig(method="sakd", params={"homo": homo, **extra}))
    return s, t, d


def _check_sakd(s, t, d, spots, seeds=range(12)) -> int:
    d.train()
    x, y = _xb()
    mixed = 0
    for seed in seeds:
        snapshot = _buffers(d)
        torch.manual_seed(seed)
        out = d(x, y)
        _restore(snapshot)
        torch.manual_seed(seed)
        u = torch.rand(6, len(spots) + 1, 2, dtype=D)
        loss, loss_cls = ref_sakd(d, s, t, x, y, u, spots)
        _close(out["loss"], loss + 0.5 * loss_cls)
        _close(out["policy"], loss_cls.detach())
        _close(_grads(out["loss"], s.parameters()), _grads(loss, s.parameters()))  # the student's optimiser
        agent = list(d.policy.parameters()) + list(d.hints.parameters()) + list(d.anti_hints.parameters())
        _close(_grads(out["loss"], agent), [0.5 * g for g in _grads(loss_cls, agent)])  # the agent's, lr / 2
        mixed += 0.0 < float(out["distill_rate"]) < 1.0
    assert all(m.training for m in s.modules()) and not any(m._forward_hooks or m._forward_pre_hooks
                                                            for m in s.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in t.modules())
    return mixed


def test_sakd_matches_the_authors_train_epoch_value_and_gradients():
    s, t, d = _sakd()
    assert d.student_layers == ["3"] and d.policy_layers == ("7:in", "7:in") and d.gamma == 2.0
    assert d.feature_weight == 1000.0  # AT's published weight (the authors' other_kd)
    assert _check_sakd(s, t, d, (3,)) >= 3  # routes distilling some samples / spots but not others were checked


def test_sakd_grafts_several_spots_like_the_authors_segments():
    s, t, d = _sakd(base_params={"student_layer": ["1", "3"]})
    assert d.policy.out_features == 6 and len(d.hints) == 2
    assert _check_sakd(s, t, d, (1, 3), seeds=range(4)) >= 2


def test_sakd_homo_starts_distilling_everywhere_and_wraps_other_methods():
    s, t, d = _sakd(homo=True)
    x, y = _xb()
    assert float(d.train()(x, y)["distill_rate"]) == 1.0  # bias +10 on "distill": every spot chosen
    s, t, d = _sakd(base="fitnet", base_params={"student_layer": "7:in"})
    assert d.student_layers == ["7:in"] and isinstance(d.hints[0], nn.Linear)
    assert any(k.startswith("base_regressors.") for k in d.state_dict()) and d.feature_weight == 100.0
    out = d.train()(x, y)
    out["loss"].backward()
    assert d.base_regressors[0].weight.grad is not None and d.policy.weight.grad is not None
    assert not any(k.startswith(("teacher", "base_method")) for k in d.state_dict())
    with pytest.raises(ConfigError, match=r"sakd: params.base='kd' cannot be wrapped; valid: .*\bat\b"):
        _sakd(base="kd")
    with pytest.raises(ConfigError, match="unknown key"):
        _sakd(bse="at")


# -------------------------------------------------------------------------------------------------- IE-KD


def ref_factor_transfer(x, y, p=1):
    """aliyun/Revisiting-Knowledge-Distillation-... loss/factor_transfer.py ``_factor_transfer``."""
    x = F.normalize(x.view(x.size(0), -1), p=2, dim=1)
    y = F.normalize(y.view(y.size(0), -1), p=2, dim=1)
    diff = x - y
    diff = diff.norm(p=p).pow(p) / diff.numel()
    return diff.pow(1 / p)


def ref_rec_loss(x, y, p=1):
    """IE-KD loss/reconstruction.py ``RecLoss``."""
    diff = x - y
    return (diff.norm(p=p).pow(p) / diff.numel()).pow(1 / p)


def test_ie_kd_matches_the_authors_train_teacher_value_and_gradient():
    s, t = _net(0), _teacher()
    d = build_distiller(s, t, DistillConfig(method="ie_kd"), epochs=190)
    assert d.hparams["ae_epochs"] == 30.0 and d.student_layers == ["3"]
    assert d.inh_index.tolist() == [0, 1, 2, 3] and d.exp_index.tolist() == [4, 5, 6, 7]  # "natural"
    d.set_epoch(30)  # past the auto-encoder stage
    d.train()
    x, y = _xb()
    snapshot = _buffers(d)
    out = d(x, y)
    _restore(snapshot)
    z, fs = _taps(s, x, outputs=["3"])
    _, ft = _taps(t, x, outputs=["3"])
    d.embed_t.eval()  # the given network's auto-encoder is frozen in this stage (embedS.eval())
    factors_t, _ = d.embed_t(ft["3"])
    feat = fs["3"]
    f_inh = d.embed_inh(feat.index_select(1, torch.arange(4)))
    f_exp = d.embed_exp(feat.index_select(1, torch.arange(4, 8)))
    ref = (F.cross_entropy(z, y) + ref_factor_transfer(f_inh, factors_t.detach())
           - ref_factor_transfer(f_exp, factors_t.detach()))
    _close(out["loss"], ref)
    wrt = list(s.parameters()) + list(d.embed_inh.parameters()) + list(d.embed_exp.parameters())
    _close(_grads(out["loss"], wrt), _grads(ref, wrt))
    assert all(p.grad is None for p in d.embed_t.parameters())


def test_ie_kd_auto_encoder_stage_trains_only_the_teacher_auto_encoder():
    s, t = _net(0), _teacher()
    d = build_distiller(s, t, DistillConfig(method="ie_kd"), epochs=190)
    d.set_epoch(0)
    d.train()
    x, y = _xb()
    bn = s[1].running_mean.clone()
    out = d(x, y)
    _, ft = _taps(t, x, outputs=["3"])
    d.embed_t.train()
    _close(out["loss"], ref_rec_loss(ft["3"], d.embed_t(ft["3"])[1]))
    out["loss"].backward()
    assert all(p.grad is not None for p in d.embed_t.parameters())
    assert all(p.grad is None for p in s.parameters()) and torch.equal(s[1].running_mean, bn)
    assert s.training and out["logits"].shape == (6, K)


def test_ie_kd_coder_is_the_authors_layer_stack():
    c = Coder(4, 6)
    kinds = [type(m).__name__ for m in c.layers]
    assert kinds == ["LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU",
                     "Conv2d", "BatchNorm2d", "LeakyReLU"]
    convs = [m for m in c.layers if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(4, 4), (4, 6), (6, 6)]
    assert all(m.bias is None and m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert all(m.negative_slope == 0.1 for m in c.layers if isinstance(m, nn.LeakyReLU))
    big = Coder(64, 64)  # He-normal, fan-out: std sqrt(2 / (9·64))
    w = [m.weight for m in big.layers if isinstance(m, nn.Conv2d)][0]
    assert abs(float(w.detach().std()) - math.sqrt(2 / (9 * 64))) < 0.005


# -------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method,params", [("sakd", {}), ("lipschitz", {}), ("ie_kd", {"ae_epochs": 1})])
def test_fit_trains_student_and_method_heads(method, params):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, K, (16,), generator=g))
    loader = DataLoader(ds, batch_size=8)
    s, t = _net(0).float(), _teacher().float()
    d = build_distiller(s, t, DistillConfig(method=method, params=params), epochs=2)
    head = {"sakd": lambda: d.policy.weight, "lipschitz": lambda: d.connectors[0][0].weight,
            "ie_kd": lambda: d.embed_t.encoder.layers[1].weight}[method]
    h0, w0 = head().clone(), s[0].weight.clone()
    fit(d, s, loader, TrainConfig(epochs=2, lr=0.01), quiet=True)
    assert not torch.equal(head(), h0) and not torch.equal(s[0].weight, w0)
    assert not t.training


@pytest.mark.parametrize("method", ["sakd", "lipschitz", "ie_kd"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(method):
    s, t = _net(0), _teacher()
    d = build_distiller(s, t, DistillConfig(method=method), epochs=10).train()
    opt = torch.optim.SGD(d.parameters(), lr=0.02)
    x, y = _xb(8)
    losses = []
    for _ in range(12):
        torch.manual_seed(0)  # the same Gumbel noise every step (sakd)
        out = d(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0], losses


def test_phases_scaled_to_a_fraction_of_an_epoch_last_that_fraction():
    """A one-epoch run of ie_kd: its auto-encoder stage, fitted to 30/190 of the run, covers the first batches
    only (``fit`` tells the method its fractional progress before every batch); the student is trained after it."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 1, 8, 8, generator=g, dtype=D), torch.randint(0, K, (64,), generator=g))
    s, t = _net(0), _net(1, 6)
    d = build_distiller(s, t, DistillConfig(method="ie_kd"), epochs=1)
    assert d.hparams["ae_epochs"] == pytest.approx(30 / 190)
    stages, w0 = [], s[-1].weight.clone()
    d.register_forward_pre_hook(lambda m, _a: stages.append(m.in_ae_stage()))
    fit(d, s, DataLoader(ds, batch_size=4), TrainConfig(epochs=1, lr=0.01), quiet=True)
    assert stages == [i / 16 < 30 / 190 for i in range(16)]  # 16 batches: the first 3 train the auto-encoder
    assert not torch.equal(s[-1].weight, w0)  # the student learned in the rest of the epoch
