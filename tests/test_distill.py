"""Distillation losses (hand-checked values, identities, the authors' reference formulas) and every registered
method's contract.

The ``ref_*`` functions below are written from the authors' public code (repository and file named in each), not
from bsnn's: every method is checked against them for value and gradient at 1e-6 relative, in float64.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import rankdata
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import DistillConfig, TrainConfig, from_dict, load_config
from bsnn.distill import METHODS, DistillWarning, IndexedDataset, build_distiller, list_methods, losses as L
from bsnn.distill.logit import mixed_targets, partial_mixup
from bsnn.errors import ConfigError
from bsnn.pipeline import (check_models, fit_schedules, load_model, make_context, stage_student, stage_teacher,
                           takd_chain)
from bsnn.train import fit
from tests._distill_helpers import grads, taps, xb

K = 5


def _net(seed: int, width: int = 4, k: int = K) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),    # 0 1 2
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),  # 3 4 5
        nn.Flatten(), nn.Linear(4 * width, 8), nn.ReLU(), nn.Linear(8, k),       # 6 7 8 9
    )


def _batch(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, K, (b,), generator=g), torch.arange(b)


# ------------------------------------------------------------------------------------------- pure losses


def test_kd_hand_value_and_reverse():
    z_s = torch.tensor([[0.0, 0.0]])
    z_t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = [3/4, 1/4], p_s = [1/2, 1/2]
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert L.kd_loss(z_s, z_t, 1.0).item() == pytest.approx(fwd, rel=1e-5)
    assert L.kd_loss(2 * z_s, 2 * z_t, 2.0).item() == pytest.approx(4 * fwd, rel=1e-5)  # T² scaling
    assert L.reverse_kd_loss(z_s, z_t, 1.0).item() == pytest.approx(rev, rel=1e-5)


def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 7, dtype=torch.float64) * 3, torch.randn(6, 7, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (6,))
    for t in (1.0, 4.0):
        tckd, nckd = L.dkd_parts(z_s, z_t, y, t, reduction="none")
        p_gt = F.softmax(z_t / t, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        torch.testing.assert_close(L.kd_loss(z_s, z_t, t, reduction="none"), tckd + (1 - p_gt) * nckd)


def test_dkd_two_classes_is_all_target():
    z_s, z_t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0])
    tckd, nckd = L.dkd_parts(z_s, z_t, y, 1.0)
    assert tckd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    assert nckd.item() == pytest.approx(0.0, abs=1e-7)
    assert L.dkd_loss(z_s, z_t, y, 1.0, alpha=2.0, beta=8.0).item() == pytest.approx(2 * tckd.item(), rel=1e-6)


def test_kd_tends_to_logit_matching_for_zero_mean_logits():
    torch.manual_seed(1)
    z_s, z_t = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    z_s, z_t = z_s - z_s.mean(1, keepdim=True), z_t - z_t.mean(1, keepdim=True)
    mse = L.logit_matching_loss(z_s, z_t).item()
    errs = [abs(L.kd_loss(z_s, z_t, t).item() - mse) / mse for t in (10.0, 100.0, 1000.0)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3


def test_dist_zero_on_match_and_row_shift_invariant():
    torch.manual_seed(2)
    z_s, z_t = torch.randn(4, 6), torch.randn(4, 6)
    inter, intra = L.dist_parts(z_t.clone(), z_t, 4.0)  # 0 up to the authors' eps in the Pearson denominator
    assert inter.item() == pytest.approx(0.0, abs=1e-4) and intra.item() == pytest.approx(0.0, abs=1e-4)
    shift = torch.tensor([[3.0], [-1.0], [0.0], [10.0]])
    torch.testing.assert_close(L.dist_loss(z_s + shift, z_t, 4.0), L.dist_loss(z_s, z_t, 4.0))
    torch.testing.assert_close(L.dist_loss(z_s, z_t - shift, 1.0), L.dist_loss(z_s, z_t, 1.0))
    assert L.dist_loss(z_s, z_t).item() > 0


def test_pearson_hand_value():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert L.pearson_rows(a, -a).item() == pytest.approx(-1.0)
    assert L.pearson_rows(a, 2 * a + 1).item() == pytest.approx(1.0)


def test_nkd_hand_value():
    z_s = torch.tensor([[1.0, 0.0, 0.0]])
    z_t = torch.tensor([[2.0, 1.0, 0.0]])
    y = torch.tensor([0])
    target, non = L.nkd_parts(z_s, z_t, y, temperature=1.0, gamma=1.5)
    p_t = torch.softmax(z_t, 1)[0, 0].item()
    log_ps = torch.log_softmax(z_s, 1)[0, 0].item()
    assert target.item() == pytest.approx(-p_t * log_ps, rel=1e-5)
    # non-targets: teacher [1, 0] -> [e/(e+1), 1/(e+1)], student [0, 0] -> log 1/2 each
    assert non.item() == pytest.approx(-1.5 * math.log(0.5), rel=1e-5)


def test_zipf_hand_value_ranks_all_classes_then_drops_the_target():
    z = torch.tensor([[3.0, 0.0, 1.0, 2.0]])  # the target (class 0) is the top class
    q = L.zipf_non_target(z, torch.tensor([0]))
    # ranks over all 4 classes: 1 (target), 4, 3, 2 -> non-targets 1/4, 1/3, 1/2, normalised by 13/12
    torch.testing.assert_close(q, torch.tensor([[3 / 13, 4 / 13, 6 / 13]]))
    ties = L.rank_min(torch.tensor([[4.0, 3.0, 3.0, 2.0, 1.0]]))
    assert ties.tolist() == [[1, 2, 2, 4, 5]]  # ties share the lowest rank
    votes = L.dense_votes(torch.tensor([[[0.0, 5.0, 1.0], [0.0, 4.0, 9.0], [0.0, 7.0, 1.0]]]))
    assert votes.tolist() == [[0.0, 2.0, 1.0]]


def test_tf_nkd_single_sample_target_is_ce_and_top1_target_zipf():
    z = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    y = torch.tensor([2])
    target, non, weak = L.tf_nkd_parts(z, y)
    assert target.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)  # p̃ = p² + 1 − p² = 1
    assert weak.item() == 0.0
    # target top-1: the others rank 2 (0.5) and 3 (−1.0) -> 1/2, 1/3 -> 3/5, 2/5
    torch.testing.assert_close(L.uskd_zipf_non_target(z, y), torch.tensor([[3 / 5, 2 / 5]]))
    assert non.item() == pytest.approx(-(0.6 * F.log_softmax(z[0, :2], 0)[0] + 0.4 * F.log_softmax(z[0, :2], 0)[1])
                                       .item(), rel=1e-6)


def test_bake_propagation_rows_sum_to_one_and_hand_value():
    w = L.propagation_matrix(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), omega=0.5)
    torch.testing.assert_close(w, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    torch.manual_seed(3)
    f, z = torch.randn(6, 10), torch.randn(6, K)
    w = L.propagation_matrix(f, omega=0.7)
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    torch.testing.assert_close(L.bake_targets(z, f).sum(1), torch.ones(6))


def test_ca_mkd_weights_sum_to_one_and_favour_the_confident_teacher():
    y = torch.tensor([0, 1])
    good = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    bad = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    mid = torch.zeros(2, 3)
    w = L.ca_mkd_weights([good, bad, mid], y)
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    assert (w[0] > w[2]).all() and (w[2] > w[1]).all()
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in (good, bad, mid)])
    torch.testing.assert_close(w, (1 - torch.softmax(ce, 0)) / 2)
    with pytest.raises(ValueError, match="at least 2 teachers"):
        L.ca_mkd_weights([good], y)


def test_at_and_sp_hand_values():
    f_s = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    f_t = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert L.at_loss(f_s, f_t).item() == pytest.approx(1.0)  # q_s = [1, 0], q_t = [0, 1]
    assert L.at_loss(f_s, torch.cat([f_s, 2 * f_s], 1)).item() == pytest.approx(0.0)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert L.sp_loss(a, b).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)
    assert L.sp_loss(a, a).item() == 0.0


def test_rkd_pkt_and_distances():
    d = L.pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    torch.testing.assert_close(d, torch.tensor([[0.0, 5.0], [5.0, 0.0]]))
    torch.manual_seed(4)
    f = torch.randn(5, 7)
    assert L.rkd_distance_loss(f, 3 * f).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert L.rkd_angle_loss(f, 3 * f).item() == pytest.approx(0.0, abs=1e-6)
    assert L.rkd_distance_loss(f, torch.randn(5, 3)).item() > 0
    assert L.pkt_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert L.pkt_loss(f, torch.randn(5, 3)).item() > 0


def test_nce_loss_hand_value():
    scores, n = torch.tensor([[0.5, 0.25]]), 4  # m = 1 noise sample, noise prob m/N = 0.25
    expected = -(math.log(0.5 / 0.75) + math.log(0.25 / 0.5))
    assert L.nce_loss(scores, n).item() == pytest.approx(expected, rel=1e-5)


def test_balanced_kl_weights_sum_to_one():
    torch.manual_seed(5)
    z_s, z_t = torch.randn(4, K), torch.randn(4, K)
    w_f, w_r = L.balanced_kl_weights(z_s, z_t)
    torch.testing.assert_close(w_f + w_r, torch.ones(4))
    flat, peaked = torch.zeros(1, K), torch.tensor([[9.0, 0, 0, 0, 0]])
    w_f, w_r = L.balanced_kl_weights(flat, peaked)
    assert w_r.item() > 0.9  # the flat (under-confident) model leans on the mode-seeking reverse KL
    torch.testing.assert_close(L.balanced_kd_loss(flat, peaked), (w_f * L.kd_loss(flat, peaked, 1.0, "none")
                               + w_r * L.reverse_kd_loss(flat, peaked, 1.0, "none")).mean())


# ---------------------------------------------------------------------------------------- every method


_PARAMS = {"crd": {"n_data": 16, "feat_dim": 8, "nce_k": 5}, "tf_nkd": {"weak_layer": "3:in"}}
ALL = ["kd", "dkd", "dist", "nkd", "tf_nkd", "zipf_ls", "bake", "fitnet", "at", "sp", "rkd", "pkt", "crd", "takd",
       "ca_mkd", "dml", "bd_kd", "mixup_kd", "ce", "ls_kd", "logit_mse", "nst", "cc", "vid"]
ALL += ["switokd", "sokd", "byot", "born_again"]  # bsnn/distill/online.py
_PARAMS["born_again"] = {"strict": False}  # the contract teacher is wider than the student
ALL += ["sakd", "lipschitz", "ie_kd"]  # bsnn/distill/adaptive.py
ALL += ["metadistil", "prue", "prune_distill"]  # bsnn/distill/teacher_side.py
ALL += ["ab", "fsp", "ft", "irg", "reviewkd"]  # bsnn/distill/feature_classic.py
ALL += ["universe_ls", "domain_kd"]  # bsnn/distill/levels.py
_PARAMS["fsp"] = {"student_layer": ["0:in", "8"]}  # FSP needs equal channels; the contract teacher is wider


def _teacher_for(method: str):
    if method in ("ca_mkd", "takd"):
        return [_net(10, width=6), _net(11, width=5)]
    return _net(10, width=6)


def test_list_methods_has_every_name():
    assert set(ALL) <= set(list_methods())


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown distillation method 'nope'.*dkd.*kd"):
        build_distiller(_net(0), _net(1), DistillConfig(method="nope"))
    with pytest.raises(ConfigError, match="unknown distillation method"):
        DistillConfig(method="nope").validate()


@pytest.mark.parametrize("method", ALL)
def test_method_contract(method):
    student, teacher = _net(0), _teacher_for(method)
    teachers = teacher if isinstance(teacher, list) else [teacher]
    online = METHODS.get(method).trains_teacher  # bd_kd trains its teacher with the student
    t_state = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    s_bn = student[1].running_mean.clone()
    d = build_distiller(student, teacher, DistillConfig(method=method, params=_PARAMS.get(method, {})), epochs=10)
    torch.testing.assert_close(student[1].running_mean, s_bn)  # building (probe forward) leaves BN stats alone
    d.train()
    assert d.training and student.training and all(t.training == online for t in teachers)
    x, y, idx = _batch()
    out = d(x, y, idx)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    assert out["logits"].shape == (4, K) and "ce" in out
    assert all(not torch.is_tensor(v) or not v.requires_grad for k, v in out.items() if k not in ("loss", "logits"))
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())  # hooks removed
    for t in teachers:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.modules())
    teacher_params = {id(p) for t in teachers for p in t.parameters()}
    if online:
        assert all(p.grad is not None for t in teachers for p in t.parameters())
        assert teacher_params <= {id(p) for p in d.parameters()}  # trained and checkpointed with the student
        return
    for t, state in zip(teachers, t_state):
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():
            assert torch.equal(v, state[k]), k  # eval mode: BN running stats untouched
    assert not any(id(p) in teacher_params for p in d.parameters())
    assert all(not k.startswith("teacher") for k in d.state_dict())


def test_teacher_free_methods_build_without_teacher():
    x, y, _ = _batch()
    for method in ("ce", "tf_nkd", "zipf_ls", "bake", "dml"):
        out = build_distiller(_net(0), None, DistillConfig(method=method, params=_PARAMS.get(method, {})))(x, y)
        assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_distiller(_net(0), None, DistillConfig(method="dkd"))
    with pytest.raises(ConfigError, match="exactly one teacher"):
        build_distiller(_net(0), None, DistillConfig(method="bd_kd"))


def test_multi_teacher_methods_refuse_a_single_teacher():
    with pytest.raises(ConfigError, match="ca_mkd.*at least 2 teachers, got 1.*model.teachers"):
        build_distiller(_net(0), _net(1), DistillConfig(method="ca_mkd"))
    with pytest.raises(ConfigError, match="exactly one teacher"):
        build_distiller(_net(0), [_net(1), _net(2)], DistillConfig(method="bd_kd"))
    base = {"distill": {"method": "ca_mkd"}}
    with pytest.raises(ConfigError, match="model.teachers"):
        check_models(from_dict(base))
    check_models(from_dict({**base, "model": {"teachers": ["small_cnn"]}}))
    with pytest.raises(ConfigError, match="model.assistants"):
        check_models(from_dict({"distill": {"method": "takd"}}))
    check_models(from_dict({"distill": {"method": "takd"}, "model": {"assistants": [{"name": "small_cnn",
                                                                                     "kwargs": {"width": 8}}]}}))
    with pytest.raises(ConfigError, match="model.teachers entries"):
        from_dict({"model": {"teachers": ["nope"]}})


def test_unknown_param_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key.*'gama'.*valid keys: alpha, beta, warmup"):
        build_distiller(_net(0), _net(1), DistillConfig(method="dkd", params={"gama": 1}))


def test_weights_are_separate_and_explicit():
    x, y, _ = _batch()
    d = build_distiller(_net(0), _net(1), DistillConfig(method="kd", ce_weight=0.3, kd_weight=2.0))
    out = d(x, y)
    torch.testing.assert_close(out["loss"], 0.3 * out["ce"] + 2.0 * out["kd"])


def test_dkd_warmup_follows_set_epoch_and_scales_to_the_run():
    x, y, _ = _batch()
    d = build_distiller(_net(0), _net(1), DistillConfig(method="dkd"), epochs=240)
    assert d.hparams["warmup"] == 20.0  # the published 20 of 240 epochs
    assert d(x, y)["warmup"].item() == 1.0  # no epoch given: no warm-up
    d.set_epoch(0)
    out = d(x, y)
    assert out["warmup"].item() == pytest.approx(1 / 20)
    torch.testing.assert_close(out["loss"], out["ce"] + (out["tckd"] + 8 * out["nckd"]) / 20)
    d.set_epoch(19)
    assert d(x, y)["warmup"].item() == 1.0
    short = build_distiller(_net(0), _net(1), DistillConfig(method="dkd"), epochs=24)
    assert short.hparams["warmup"] == pytest.approx(2.0)  # same fraction of a 24-epoch run
    short.set_epoch(0)
    assert short(x, y)["warmup"].item() == pytest.approx(0.5)
    with pytest.warns(DistillWarning, match="epoch count is unknown"):
        assert build_distiller(_net(0), _net(1), DistillConfig(method="dkd")).hparams["warmup"] == 20.0
    with pytest.warns(DistillWarning, match="longer than the run"):
        build_distiller(_net(0), _net(1), DistillConfig(method="dkd", params={"warmup": 20}), epochs=10)
    fitted = fit_schedules(DistillConfig(method="dkd"), 10)  # what the pipeline hands to train_student
    assert fitted.params == {"warmup": pytest.approx(10 / 12)}


def test_feature_layers_named_and_default():
    s, t = _net(0), _net(1, width=6)
    d = build_distiller(s, t, DistillConfig(method="fitnet", params={"student_layer": "4", "teacher_layer": "4"}))
    assert isinstance(d.regressors[0], nn.Conv2d) and d.regressors[0].out_channels == 6
    d2 = build_distiller(s, t, DistillConfig(method="fitnet"))
    assert d2.student_layers == ["9:in"] and isinstance(d2.regressors[0], nn.Linear)
    assert {id(p) for p in d2.regressors.parameters()} <= {id(p) for p in d2.parameters()}  # trained by fit
    assert build_distiller(s, t, DistillConfig(method="at")).student_layers == ["3"]
    with pytest.raises(ConfigError, match="no layer 'conv9'.*valid layer names: 0, 1, 2"):
        build_distiller(s, t, DistillConfig(method="sp", params={"student_layer": "conv9"}))
    d3 = build_distiller(s, t, DistillConfig(method="at", params={"student_layer": ["2", "4"]}))
    x, y, _ = _batch()
    assert torch.isfinite(d3(x, y)["loss"])


def test_fitnet_probe_with_fixed_input_shape():
    class Fixed(nn.Module):  # no adaptive pooling: only 1x5x5 inputs run
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, c, 3)
            self.fc = nn.Linear(c * 9, K)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    s, t = Fixed(2), Fixed(3)
    with pytest.raises(ConfigError, match="input_shape"):
        build_distiller(s, t, DistillConfig(method="fitnet"))
    d = build_distiller(s, t, DistillConfig(method="fitnet", params={"input_shape": [1, 5, 5]}))
    assert d.regressors[0].in_features == 18 and d.regressors[0].out_features == 27
    d = build_distiller(s, t, DistillConfig(method="fitnet"), example_input=torch.randn(8, 1, 5, 5))
    assert torch.isfinite(d(torch.randn(3, 1, 5, 5), torch.tensor([0, 1, 2]))["loss"])


def test_crd_index_memory_bank_and_errors():
    s, t = _net(0), _net(1)
    cfg = DistillConfig(method="crd", params={"feat_dim": 8, "nce_k": 5})
    with pytest.raises(ConfigError, match="n_data"):
        build_distiller(s, t, cfg)
    d = build_distiller(s, t, cfg, n_data=16)
    assert d.needs_index and d.memory_s.shape == (16, 8)
    assert {"memory_s", "memory_t", "z_norm"} <= set(d.state_dict())
    x, y, _ = _batch()
    with pytest.raises(ConfigError, match="index"):
        d(x, y)
    before = d.memory_s.clone()
    idx = torch.tensor([3, 7, 8, 15])
    d.train()(x, y, idx)
    changed = (d.memory_s != before).any(1)
    assert changed[idx].all() and not changed[[0, 1, 2, 4]].any()
    torch.testing.assert_close(d.memory_s[idx].norm(dim=1), torch.ones(4))
    assert (d.z_norm > 0).all()


def test_mixup_kd_teacher_sees_the_mixed_input():
    seen = []
    t = _net(1)
    t.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    d = build_distiller(_net(0), t, DistillConfig(method="mixup_kd", params={"partmixup": 0.0}))
    x, y, _ = _batch()
    torch.manual_seed(0)
    out = d.train()(x, y)
    assert not torch.equal(seen[-1], x) and out["mixed"].item() == 1.0
    d.eval()(x, y)
    assert torch.equal(seen[-1], x)


def test_dml_peer_is_trained_jointly():
    s = _net(0)
    d = build_distiller(s, None, DistillConfig(method="dml", params={"num_peers": 2}))
    assert len(d.peers) == 2 and not torch.equal(d.peers[0][0].weight, s[0].weight)  # re-initialised copies
    assert any(k.startswith("peers.") for k in d.state_dict())
    x, y, _ = _batch()
    out = d(x, y)
    out["loss"].backward()
    assert all(p.grad is not None for p in d.peers.parameters())


def test_bd_kd_trains_the_given_teacher_online():
    s, t = _net(0), _net(7, width=8)
    d = build_distiller(s, t, DistillConfig(method="bd_kd"))
    assert d.online_teacher is t and any(k.startswith("online_teacher.") for k in d.state_dict())
    x, y, _ = _batch()
    out = d.train()(x, y)
    assert t.training and {"teacher_ce", "teacher_kd"} <= set(out)
    out["loss"].backward()
    assert all(p.grad is not None for p in t.parameters())


def test_takd_chain_trains_assistant_then_student(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, K, (8,), generator=g))
    loader = DataLoader(ds, batch_size=4)
    teacher, assistant, student = _net(1, width=6), _net(2, width=5), _net(3)
    a0 = assistant[0].weight.clone()
    hist = takd_chain(teacher, [assistant], student, loader, DistillConfig(method="takd"),
                      TrainConfig(epochs=1, lr=0.01), checkpoint_path=tmp_path / "ck.pt", quiet=True)
    assert len(hist) == 2 and not torch.equal(assistant[0].weight, a0)
    assert not assistant.training and not any(p.requires_grad for p in assistant.parameters())
    assert (tmp_path / "ck_step1.pt").is_file() and (tmp_path / "ck_step2.pt").is_file()


def test_fit_trains_method_owned_heads_and_uses_index():
    g = torch.Generator().manual_seed(0)
    ds = IndexedDataset(TensorDataset(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, K, (8,), generator=g)))
    assert ds[5][2] == 5 and len(ds) == 8
    loader = DataLoader(ds, batch_size=4)
    s, t = _net(0), _net(1)
    d = build_distiller(s, t, DistillConfig(method="crd", params={"feat_dim": 8, "nce_k": 3}), n_data=len(ds))
    w0, m0 = d.embed_s.linear.weight.clone(), d.memory_s.clone()
    fit(d, s, loader, TrainConfig(epochs=1, lr=0.01), quiet=True)
    assert not torch.equal(d.embed_s.linear.weight, w0) and not torch.equal(d.memory_s, m0)
    assert not t.training


# ------------------------------------------------------------------- the authors' code as reference formulas
#
# Each ref_* below restates the authors' public training code (repository/file in the docstring) in a few lines of
# torch/numpy, independently of bsnn. Every method is compared for value and gradient (float64, 1e-6 relative)
# with the weights, temperature and parameters a user gets from DistillConfig(method=...).

D = torch.float64
RTOL, ATOL = 1e-6, 1e-12

PUBLISHED = {  # method: (ce_weight, kd_weight, temperature or None when unused, params that must be published)
    "ce": (1.0, None, None, {}),
    "kd": (0.1, 0.9, 4.0, {}),
    "dkd": (1.0, 1.0, 4.0, {"alpha": 1.0, "beta": 8.0}),
    "dist": (1.0, 2.0, 4.0, {"beta": 1.0, "gamma": 1.0}),
    "nkd": (1.0, 1.0, 3.0, {"gamma": 3.5}),
    "tf_nkd": (1.0, 1.0, None, {"target_weight": 0.1, "non_target_weight": 0.1, "mu": 0.1}),
    "zipf_ls": (1.0, 0.1, None, {"power": 1.0, "upsample": True}),
    "bake": (1.0, 1.0, 4.0, {"omega": 0.5}),
    "fitnet": (1.0, 100.0, None, {}),
    "at": (1.0, 1000.0, None, {"p": 2.0}),
    "sp": (1.0, 3000.0, None, {}),
    "rkd": (1.0, 1.0, None, {"distance_weight": 25.0, "angle_weight": 50.0}),
    "pkt": (1.0, 30000.0, None, {}),
    "crd": (1.0, 0.8, None, {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_momentum": 0.5}),
    "takd": (0.1, 0.9, 4.0, {}),
    "ca_mkd": (1.0, 1.0, 4.0, {"feature_weight": 50.0}),
    "dml": (1.0, 1.0, 1.0, {}),
    "bd_kd": (1.0, 1.0, 4.0, {"teacher_kd_weight": 1.0}),
    "mixup_kd": (0.1, 0.9, None, {"partmixup": 0.9, "beta_a": 1.0}),
    "ls_kd": (0.1, 9.0, 2.0, {}),
    "logit_mse": (0.0, 1.0, None, {}),
    "nst": (1.0, 50.0, None, {}),
    "cc": (1.0, 0.02, None, {"feat_dim": 128}),
    "vid": (1.0, 1.0, None, {"init_pred_var": 5.0}),
    "ab": (1.0, 1.0, None, {"margin": 1.0, "init_epochs": None}),
    "fsp": (1.0, 1.0, None, {"init_epochs": None}),
    "ft": (1.0, 200.0, None, {"rate": 0.5, "p1": 2.0, "p2": 1.0, "init_epochs": None}),
    "irg": (1.0, 0.005, None, {}),
    "reviewkd": (1.0, 5.0, None, {"warmup": None}),
    "switokd": (1.0, 1.0, 1.0, {}),
    "sokd": (1.0, 1.0, 4.0, {"branch_ce_weight": 1.0, "branch_teacher_weight": 1.0, "branch_student_weight": 1.0}),
    "byot": (0.9, 0.1, 3.0, {"feature_weight": 1e-6}),
    "born_again": (1.0, 1.0, 1.0, {"generations": 1}),
    "sakd": (1.0, 1.0, 4.0, {"base": "at", "policy_temperature": 5.0, "policy_weight": 0.5, "homo": True}),
    "lipschitz": (1.0, 0.004, None, {"feature_weight": 1e-3, "power_iterations": 10, "decay_factor": 0.25}),
    "ie_kd": (1.0, 1.0, None, {"inh_weight": 1.0, "exp_weight": 1.0, "factor_rate": 0.5, "divide": "natural"}),
    "metadistil": (0.1, 0.9, 4.0, {"pilot_lr": 0.05, "pilot_decay": 0.1, "quiz_fraction": 0.1}),
    "prue": (0.9, 0.1, 4.0, {"sparsity": 0.5}),
    "prune_distill": (0.05, 0.95, 10.0, {"pruning_ratio": 0.8, "round_fraction": 0.2, "student_plan": False}),
    "universe_ls": (0.1, 0.9, 4.0, {"confidence": None}),
    "domain_kd": (0.1, 0.9, 4.0, {"class_targets": None}),
}


def test_published_defaults_table_covers_every_method():
    assert set(PUBLISHED) == set(list_methods())
    cfg = DistillConfig()
    assert (cfg.temperature, cfg.ce_weight, cfg.kd_weight) == (None, None, None)  # None = the method's own
    for method, (ce, kd, t, params) in PUBLISHED.items():
        cls = METHODS.get(method)
        assert cls.default_ce_weight == ce, method
        assert kd is None or cls.default_kd_weight == kd, method
        assert t is None or cls.default_temperature == t, method
        assert {k: cls.param_defaults[k] for k in params} == params, method


def _net2(seed: int, width: int = 4, k: int = K) -> nn.Sequential:
    """A student/teacher ending global-average-pool -> Linear (dense votes, CA-MKD maps) with a mid stage."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),       # 0 1 2 (mid-level map)
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),                      # 3 4 (last map)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, k),            # 5 6 7
    ).double()


_xb = xb


_taps = taps


_grads = grads


def _method_agrees(method: str, reference, student: nn.Module, teacher=None, params=None, epoch=None,
                   extra_params=(), **context):
    """bsnn's method (published defaults) vs ``reference(d, x, y)``: loss value and gradient w.r.t. the student's
    (and ``extra_params(d)``'s) parameters."""
    d = build_distiller(student, teacher, DistillConfig(method=method, params=params or {}), epochs=240, **context)
    d.eval()
    if epoch is not None:
        d.set_epoch(epoch)
    x, y = _xb()
    wrt = list(student.parameters()) + list(extra_params(d) if callable(extra_params) else extra_params)
    out = d(x, y)
    ref = reference(d, x, y)
    torch.testing.assert_close(out["loss"], ref, rtol=RTOL, atol=0)
    torch.testing.assert_close(_grads(out["loss"], wrt), _grads(ref, wrt), rtol=RTOL, atol=ATOL)
    return d, out


def ref_kd(z_s, z_t, t):
    """RepDistiller distiller_zoo/KD.py DistillKL."""
    return F.kl_div(F.log_softmax(z_s / t, dim=1), F.softmax(z_t / t, dim=1), reduction="sum") * t ** 2 / z_s.shape[0]


def ref_dkd(z_s, z_t, y, alpha, beta, t):
    """mdistiller mdistiller/distillers/DKD.py dkd_loss (masks, cat_mask, the −1000 trick)."""
    gt = torch.zeros_like(z_s).scatter_(1, y.unsqueeze(1), 1).bool()
    other = ~gt
    p_s, p_t = F.softmax(z_s / t, dim=1), F.softmax(z_t / t, dim=1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)  # noqa: E731
    b_s, b_t = cat(p_s), cat(p_t)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * t ** 2 / y.shape[0]
    nckd = F.kl_div(F.log_softmax(z_s / t - 1000.0 * gt, dim=1), F.softmax(z_t / t - 1000.0 * gt, dim=1),
                    reduction="sum") * t ** 2 / y.shape[0]
    return alpha * tckd + beta * nckd


def ref_dist(z_s, z_t, beta, gamma, tau):
    """hunto/DIST_KD (image_classification_sota lib/models/losses/dist_kd.py)."""
    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau ** 2 * (1 - pearson(y_s, y_t).mean())
    intra = tau ** 2 * (1 - pearson(y_s.t(), y_t.t()).mean())
    return beta * inter + gamma * intra


def ref_nkd(z_s, z_t, y, temp, gamma):
    """yzd-v/cls_KD mmcls/models/dis_losses/nkd.py NKDLoss."""
    label = y.view(-1, 1)
    n = z_s.shape[0]
    s_t = torch.gather(F.log_softmax(z_s, 1), 1, label)
    t_t = torch.gather(F.softmax(z_t, 1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(z_s).scatter_(1, label, 0).bool()
    s_i = F.log_softmax(z_s[mask].reshape(n, -1) / temp, 1)
    t_i = F.softmax(z_t[mask].reshape(n, -1) / temp, 1)
    return loss_t - gamma * temp ** 2 * (t_i * s_i).sum(1).mean()


def ref_uskd(z_s, y, w_fc, alpha, beta, mu):
    """yzd-v/cls_KD mmcls/models/dis_losses/uskd.py USKDLoss.forward (hard labels)."""
    label = y.view(-1, 1)
    value = torch.ones_like(label)
    n, c = z_s.shape
    s_t = torch.gather(F.softmax(z_s, dim=1), 1, label)
    p_t = (s_t ** 2 + value - (s_t ** 2).mean(0, True)).detach()
    s_i = F.log_softmax(z_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    loss_t = -(p_t * s_t).sum(dim=1).mean()
    target = torch.zeros_like(z_s).scatter_(1, label, 0.9) + 0.1 * torch.ones_like(z_s) / c
    w_i = F.log_softmax(w_fc, dim=1)
    loss_weak = -(mu * target * w_i).sum(dim=1).mean()
    w_i = F.softmax(w_fc, dim=1)
    w_t = torch.gather(w_i, 1, label)
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + s_i / (1 - s_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    z_i = (1 / torch.arange(1, c + 1, dtype=z_s.dtype)).repeat(n, 1)
    z_i = torch.gather(z_i, dim=1, index=torch.argsort(rank))
    mask = torch.ones_like(z_s).scatter_(1, label, 0).bool()
    ns_i = F.log_softmax(z_s[mask].reshape(n, -1), dim=1)
    nz_i = z_i[mask].reshape(n, -1)
    nz_i = (nz_i / nz_i.sum(dim=1, keepdim=True)).detach()
    loss_non = -(nz_i * ns_i).sum(dim=1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak


def ref_zipf(z, y, scores, power=1.0):
    """megvii-research/zipfls pytorch_zipfls/losses.py gen_pdf (rank 'hard', rank_zipf) + kl_loss (no mask)."""
    rank = rankdata(-scores.detach().numpy(), axis=1, method="min")
    dist = (1.0 / rank) ** power
    mask = torch.ones_like(z).scatter_(1, y.unsqueeze(1), 0.0)
    dist = dist[mask.bool().numpy()].reshape(z.shape[0], -1)
    pdf = torch.tensor(dist / dist.sum(axis=1, keepdims=True), dtype=z.dtype)
    res = F.log_softmax(z[mask.bool()].view(z.shape[0], -1), dim=1)
    return F.kl_div(res, pdf, reduction="none").sum(dim=1).mean()


def ref_votes(dense_argmax: torch.Tensor, c: int) -> torch.Tensor:
    """zipfls utils gen_pdf_from_dense_argmax's vote counting (a loop)."""
    idx = dense_argmax.numpy()
    scores = np.zeros((idx.shape[0], c))
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            scores[i][int(idx[i][j])] += 1
    return torch.tensor(scores)


def ref_bake(feats, z, temp, omega):
    """megvii-research/zipfls pytorch_zipfls/losses.py knowledge_ensemble + KDLoss (BAKE)."""
    with torch.no_grad():
        masks = torch.eye(z.shape[0], dtype=z.dtype)
        f = F.normalize(feats.detach(), p=2, dim=1)
        p = F.softmax(z.detach() / temp, dim=1)
        w = F.softmax(f @ f.t() - masks * 1e9, dim=1)
        target = (1 - omega) * torch.inverse(masks - omega * w) @ p
    return F.kl_div(F.log_softmax(z / temp, dim=1), target, reduction="sum") * temp ** 2 / z.shape[0]


def ref_at(f_s, f_t, p=2.0):
    """RepDistiller distiller_zoo/AT.py."""
    at = lambda f: F.normalize(f.pow(p).mean(1).view(f.size(0), -1))  # noqa: E731
    return (at(f_s) - at(f_t)).pow(2).mean()


def ref_sp(f_s, f_t):
    """RepDistiller distiller_zoo/SP.py."""
    b = f_s.shape[0]
    g_s = F.normalize(torch.mm(f_s.view(b, -1), f_s.view(b, -1).t()))
    g_t = F.normalize(torch.mm(f_t.view(b, -1), f_t.view(b, -1).t()))
    return ((g_t - g_s) ** 2).view(-1, 1).sum(0)[0] / (b * b)


def ref_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    """RepDistiller distiller_zoo/RKD.py RKDLoss."""
    def pdist(e, eps=1e-12):
        sq = e.pow(2).sum(dim=1)
        res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res
    s, t = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(t)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(s.unsqueeze(0) - s.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return w_d * loss_d + w_a * F.smooth_l1_loss(s_angle, t_angle)


def ref_pkt(f_s, f_t, eps=1e-7):
    """RepDistiller distiller_zoo/PKT.py cosine_similarity_loss."""
    def cond(o):
        o = o.view(o.shape[0], -1)
        o = o / (torch.sqrt(torch.sum(o ** 2, dim=1, keepdim=True)) + eps)
        s = (torch.mm(o, o.t()) + 1.0) / 2.0
        return s / torch.sum(s, dim=1, keepdim=True)
    m, t = cond(f_s), cond(f_t)
    return torch.mean(t * torch.log((t + eps) / (m + eps)))


def ref_crd_nce(x, n_data, eps=1e-7):
    """RepDistiller crd/criterion.py ContrastLoss."""
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1.0 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
    return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)[0]) / bsz


def ref_camkd_logit(z_s, z_ts, y, t):
    """Rorozhl/CA-MKD helper/loops.py, ensemble_method == 'CAMKD' (DistillKL with is_ca=True)."""
    loss_t = torch.stack([F.cross_entropy(zt, y, reduction="none") for zt in z_ts], dim=0)
    attention = (1.0 - F.softmax(loss_t, dim=0)) / (len(z_ts) - 1)
    div = torch.stack([(nn.KLDivLoss(reduction="none")(F.log_softmax(z_s / t, 1), F.softmax(zt / t, 1)) * t ** 2)
                       .sum(-1) for zt in z_ts], dim=0)
    return torch.mul(attention, div).sum() / (1.0 * div.shape[1] * len(z_ts))


def ref_camkd_feature(trans_s, mid_t, out_t, y):
    """Rorozhl/CA-MKD distiller_zoo/CAMKD.py CAMKD.forward."""
    bsz = y.shape[0]
    loss_t = torch.stack([nn.CrossEntropyLoss(reduction="none")(o, y) for o in out_t], dim=0)
    weight = (1.0 - F.softmax(loss_t, dim=0)) / (len(trans_s) - 1)
    loss_st = torch.stack([nn.MSELoss(reduction="none")(s, t).reshape(bsz, -1).mean(-1)
                           for s, t in zip(trans_s, mid_t)], dim=0)
    return torch.mul(weight, loss_st).sum() / (1.0 * bsz * len(trans_s))


def ref_takd(z_s, z_t, y, lam, t):
    """imirzadeh/Teacher-Assistant-Knowledge-Distillation train.py (nn.KLDivLoss() default 'mean')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that 'mean' divides by B·K: that is what the authors ran
        kd = nn.KLDivLoss()(F.log_softmax(z_s / t, dim=1), F.softmax(z_t / t, dim=1))
    return (1 - lam) * F.cross_entropy(z_s, y) + lam * t * t * kd


def ref_mixstd(z_s, z_t, target, gamma, alpha):
    """hchoi71/MIX-KD distiller_zoo/MIXSTD.py MIXSTDLoss (returns loss_cls + loss_div)."""
    stdt, stds = torch.std(z_t, dim=-1, keepdim=True), torch.std(z_s, dim=-1, keepdim=True)
    loss_cls = gamma * torch.sum(-F.log_softmax(z_s / stds, -1) * target) / z_s.shape[0]
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(z_s / stds, dim=1), F.softmax(z_t / stdt, dim=1))
    return loss_cls + alpha * kl


def _z(b=6, k=7, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=D) * scale


def _pure_agrees(ours, ref, *leaves):
    a = [v.clone().requires_grad_(True) for v in leaves]
    b = [v.clone().requires_grad_(True) for v in leaves]
    va, vb = ours(*a), ref(*b)
    torch.testing.assert_close(va, vb, rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.autograd.grad(va, a), torch.autograd.grad(vb, b), rtol=RTOL, atol=ATOL)


def test_ref_kd_and_ce():
    t = _net2(1, 6)
    _method_agrees("kd", lambda d, x, y: 0.1 * F.cross_entropy(d.student(x), y) + 0.9 * ref_kd(d.student(x), t(x), 4.0),
                   _net2(0), t)
    _method_agrees("ce", lambda d, x, y: F.cross_entropy(d.student(x), y), _net2(0))


def test_ref_dkd_with_its_warmup():
    t = _net2(1, 6)
    for epoch in (4, 30):  # authors' 1-based epoch 5 (factor 5/20) and past the warm-up
        factor = min((epoch + 1) / 20, 1.0)
        _method_agrees("dkd", lambda d, x, y: F.cross_entropy(d.student(x), y)
                       + factor * ref_dkd(d.student(x), t(x), y, 1.0, 8.0, 4.0), _net2(0), t, epoch=epoch)


def test_ref_dist():
    t = _net2(1, 6)
    _method_agrees("dist", lambda d, x, y: F.cross_entropy(d.student(x), y) + 2.0 * ref_dist(d.student(x), t(x),
                                                                                               1.0, 1.0, 4.0),
                   _net2(0), t)


def test_ref_nkd():
    t = _net2(1, 6)
    _method_agrees("nkd", lambda d, x, y: F.cross_entropy(d.student(x), y) + ref_nkd(d.student(x), t(x), y, 3.0, 3.5),
                   _net2(0), t)


def test_ref_tf_nkd_with_the_weak_head():
    def reference(d, x, y):
        z, f = _taps(d.student, x, outputs=["2"])  # the weak head sits on the mid-level map (input of conv 3)
        w_fc = d.weak_head(F.adaptive_avg_pool2d(f["2"], 1).flatten(1))
        return F.cross_entropy(z, y) + ref_uskd(z, y, w_fc, 0.1, 0.1, 0.1)

    d, _ = _method_agrees("tf_nkd", reference, _net2(0), extra_params=lambda d: d.weak_head.parameters())
    assert d.weak_layers == ["3:in"]
    z, y = _z(k=K), torch.tensor([0, 1, 2, 3, 4, 0])  # the ranking and target term alone (no weak head)
    _pure_agrees(lambda z: sum(L.tf_nkd_parts(z, y)[:2]), lambda z: ref_uskd(z, y, torch.zeros_like(z), 1.0, 1.0, 0.0)
                 - 0.0, z)


def test_ref_zipf_ls_dense_votes_and_logits():
    def dense_reference(d, x, y):
        z, f = _taps(d.student, x, outputs=["4"])
        fc = d.student[7]
        up = F.interpolate(f["4"].detach(), scale_factor=2.0, mode="bilinear")
        n, c, h, w = up.shape
        votes = ref_votes(fc(up.permute(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h * w, -1).argmax(axis=2),
                          z.shape[1])
        return F.cross_entropy(z, y) + 0.1 * ref_zipf(z, y, votes)

    d, _ = _method_agrees("zipf_ls", dense_reference, _net2(0))
    assert d.dense_layers == ["5:in"]
    flat = _net(0).double()  # an MLP head: no dense votes, ranks from the logits
    d, _ = _method_agrees("zipf_ls", lambda d, x, y: F.cross_entropy(d.student(x), y)
                          + 0.1 * ref_zipf(d.student(x), y, d.student(x)), flat)
    assert d.dense_layers == []
    tied = torch.tensor([[1.0, 1.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]], dtype=D)  # ties take the lowest rank
    _pure_agrees(lambda z: L.zipf_ls_loss(z, torch.tensor([3, 1]), tied), lambda z: ref_zipf(z, torch.tensor([3, 1]),
                                                                                               tied), _z(2, 4))


def test_ref_bake():
    def reference(d, x, y):
        z, f = _taps(d.student, x, inputs=["7"])
        return F.cross_entropy(z, y) + ref_bake(f["7:in"], z, 4.0, 0.5)

    _method_agrees("bake", reference, _net2(0))


def test_ref_feature_methods():
    t = _net2(1, 6)

    def taps(d, x, spec):
        zs, fs = _taps(d.student, x, **spec)
        _, ft = _taps(t, x, **spec)
        key = next(iter(fs))
        return zs, fs[key], ft[key]

    pen = {"inputs": ["7"]}
    for method, weight, ref in (("sp", 3000.0, ref_sp), ("rkd", 1.0, ref_rkd), ("pkt", 30000.0, ref_pkt)):
        def reference(d, x, y, weight=weight, ref=ref):
            zs, fs, ft = taps(d, x, pen)
            return F.cross_entropy(zs, y) + weight * ref(fs, ft)
        _method_agrees(method, reference, _net2(0), t)

    def at_reference(d, x, y):
        zs, fs, ft = taps(d, x, {"outputs": ["3"]})
        return F.cross_entropy(zs, y) + 1000.0 * ref_at(fs, ft)
    _method_agrees("at", at_reference, _net2(0), t)

    def fitnet_reference(d, x, y):
        zs, fs, ft = taps(d, x, pen)
        return F.cross_entropy(zs, y) + 100.0 * nn.MSELoss()(d.regressors[0](fs), ft)
    _method_agrees("fitnet", fitnet_reference, _net2(0), t, extra_params=lambda d: d.regressors.parameters())


def test_ref_crd_contrast_and_nce():
    g = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(4, 8, generator=g, dtype=D), dim=1)
    bank = F.normalize(torch.randn(4, 6, 8, generator=g, dtype=D), dim=2)

    def ours(v):
        out = L.contrast_scores(v, bank, 0.07)
        return L.nce_loss(out / (out.mean().detach() * 50), 50)

    def ref(v):
        out = torch.exp(torch.div(torch.bmm(bank, v.view(4, 8, 1)), 0.07)).squeeze(2).contiguous()
        return ref_crd_nce(out / (out.mean().detach() * 50), 50)

    _pure_agrees(ours, ref, v)


@pytest.mark.parametrize("n_data", [5, 400])  # B·(K+1) = 24 rows: gathered (N = 400) or one [B, N] product (N = 5)
def test_bank_contrast_scores_equal_the_gathered_rows(n_data):
    g = torch.Generator().manual_seed(4)
    v = F.normalize(torch.randn(4, 8, generator=g, dtype=D), dim=1)
    bank = F.normalize(torch.randn(n_data, 8, generator=g, dtype=D), dim=1)
    idx = torch.randint(0, n_data, (4, 6), generator=g)
    idx[:, 0] = torch.tensor([0, 1, 2, 3]) % n_data
    _pure_agrees(lambda v: L.nce_loss(L.bank_contrast_scores(v, bank, idx, 0.07) / 50.0, n_data),
                 lambda v: ref_crd_nce(torch.exp(torch.bmm(bank[idx], v.unsqueeze(2)).squeeze(2) / 0.07) / 50.0,
                                       n_data), v)


def test_ref_takd_from_the_last_assistant():
    teacher, assistant = _net2(1, 8), _net2(2, 6)
    _method_agrees("takd", lambda d, x, y: ref_takd(d.student(x), assistant(x), y, 0.9, 4.0), _net2(0),
                   [teacher, assistant])


def test_ref_ca_mkd_logit_and_feature_terms():
    teachers = [_net2(1, 6), _net2(2, 5), _net2(3, 6)]

    def reference(d, x, y, feature=True):
        zs, fs = _taps(d.student, x, inputs=["5"])
        outs = [_taps(t, x, inputs=["5"]) for t in teachers]
        z_ts = [o[0].detach() for o in outs]
        loss = F.cross_entropy(zs, y) + ref_camkd_logit(zs, z_ts, y, 4.0)
        if not feature:
            return loss
        trans = [e(fs["5:in"]) for e in d.embeds]  # maps are equal-sized here: no resizing
        heads = [t[7](F.adaptive_avg_pool2d(s, 1).flatten(1)) for t, s in zip(teachers, trans)]
        return loss + 50.0 * ref_camkd_feature(trans, [o[1]["5:in"].detach() for o in outs], heads, y)

    d, out = _method_agrees("ca_mkd", reference, _net2(0), teachers, epoch=1,
                            extra_params=lambda d: d.embeds.parameters())
    assert d.student_layers == ["5:in"] and "feature" in out
    _method_agrees("ca_mkd", lambda d, x, y: reference(d, x, y, feature=False), _net2(0), teachers, epoch=0)
    z_s, y = _z(k=K), torch.tensor([0, 1, 2, 3, 4, 0])
    z_ts = [_z(k=K, seed=s) for s in (1, 2)]
    _pure_agrees(lambda z: L.ca_mkd_loss(z, z_ts, y, 4.0), lambda z: ref_camkd_logit(z, z_ts, y, 4.0), z_s)


def test_ref_mixup_kd_std_scaled_losses():
    t = _net2(1, 6)

    def eval_reference(d, x, y):  # eval mode: no mixing, one-hot targets
        zs = d.student(x)
        return ref_mixstd(zs, t(x), F.one_hot(y, K).to(D), 0.1, 0.9)

    _method_agrees("mixup_kd", eval_reference, _net2(0), t)
    g = torch.Generator().manual_seed(5)
    target = torch.softmax(torch.randn(6, K, generator=g, dtype=D) * 3, dim=1)
    z_t = _z(k=K, seed=1)
    _pure_agrees(lambda z: 0.1 * L.std_kd_parts(z, z_t, target)[0] + 0.9 * L.std_kd_parts(z, z_t, target)[1],
                 lambda z: ref_mixstd(z, z_t, target, 0.1, 0.9), _z(k=K))
    x, y = _xb()
    torch.manual_seed(0)
    x_mix, a, perm = partial_mixup(x, unmixed=0.5)
    torch.testing.assert_close(x_mix, a.view(-1, 1, 1, 1) * x + (1 - a.view(-1, 1, 1, 1)) * x[perm])
    mt = mixed_targets(y, K, a, perm)
    torch.testing.assert_close(mt.sum(1), torch.ones(6, dtype=D))
    assert (a == 1).sum() >= 1  # int(6 · 0.5) = 3 draws (with replacement) left unmixed


def test_ref_dml():
    def reference(d, x, y):
        zs, zp = d.student(x), d.peers[0](x)
        kl = lambda a, b: F.kl_div(F.log_softmax(a, 1), F.softmax(b.detach(), 1), reduction="batchmean")  # noqa
        return F.cross_entropy(zs, y) + kl(zs, zp) + F.cross_entropy(zp, y) + kl(zp, zs)

    _method_agrees("dml", reference, _net2(0), extra_params=lambda d: d.peers.parameters())


def test_ref_bd_kd_paper_reading():
    """No authors' code is public: the formula here restates bsnn's reading of the paper (docstring of BDKD)."""
    def reference(d, x, y):
        zs, zt = d.student(x), d.online_teacher(x)
        t = 4.0
        h = lambda z: -(F.softmax(z.detach() / t, 1) * F.log_softmax(z.detach() / t, 1)).sum(1)  # noqa: E731
        w_rev = h(zs) / (h(zs) + h(zt))
        fwd = (F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt.detach() / t, 1), reduction="none").sum(1)) * t * t
        rev = (F.softmax(zs / t, 1) * (F.log_softmax(zs / t, 1) - F.log_softmax(zt.detach() / t, 1))).sum(1) * t * t
        teacher_rev = F.kl_div(F.log_softmax(zt / t, 1), F.softmax(zs.detach() / t, 1), reduction="batchmean") * t * t
        return (F.cross_entropy(zs, y) + ((1 - w_rev) * fwd + w_rev * rev).mean()
                + F.cross_entropy(zt, y) + teacher_rev)

    _method_agrees("bd_kd", reference, _net2(0), _net2(1, 8), extra_params=lambda d: d.online_teacher.parameters())


def test_tf_nkd_without_a_mid_stage_warns_and_leaves_the_weak_head_out():
    with pytest.warns(DistillWarning, match="weak head is left out"):
        d = build_distiller(_net(0), None, DistillConfig(method="tf_nkd"))
    assert d.weak_head is None and d.weak_layers == []


# ------------------------------------------------------------------------------ the pipeline's extra models


def test_pipeline_trains_further_teachers_assistants_and_the_online_teacher(tmp_path):
    base = ["data.name=digits", "data.limit_train=256", "train.epochs=1", "student.epochs=1", "run.quiet=true"]

    def ctx_for(name, *extra):
        return make_context(load_config(None, [*base, f"run.out_dir={tmp_path / name}", *extra]))

    ctx = ctx_for("ca", "distill.method=ca_mkd", "model.teachers=[small_cnn]")
    stage_student(ctx, stage_teacher(ctx))
    assert (tmp_path / "ca" / "teacher_1.pt").is_file() and {"teacher_1", "student"} <= set(ctx.run.metrics())
    mtime = (tmp_path / "ca" / "teacher_1.pt").stat().st_mtime_ns
    again = make_context(ctx.cfg, reuse=("data", "model", "train"))  # bsnn distill on the same folder
    stage_student(again, load_model(tmp_path / "ca" / "teacher.pt")[0])
    assert (tmp_path / "ca" / "teacher_1.pt").stat().st_mtime_ns == mtime  # same recipe: reused, not retrained

    ctx = ctx_for("ta", "distill.method=takd", "model.assistants=[{name: small_cnn, kwargs: {width: 8}}]")
    stage_student(ctx, stage_teacher(ctx))
    assistant, record = load_model(tmp_path / "ta" / "assistant_1.pt")
    assert record["arch"]["kwargs"] == {"width": 8} and record["recipe"]["distill"]["method"] == "takd"

    ctx = ctx_for("bd", "distill.method=bd_kd")
    stage_student(ctx, None)
    assert (tmp_path / "bd" / "online_teacher.pt").is_file() and not (tmp_path / "bd" / "teacher.pt").exists()
    student = load_model(tmp_path / "bd" / "student.pt")[1]
    assert student["distill"]["method"] == "bd_kd"


# ------------------------------------------------------ logit standardisation, logit regression, NST, CC


def ref_ls_kd(z_s, z_t, t):
    """sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py: ``normalize`` then ``kd_loss``."""
    def normalize(z):
        return (z - z.mean(dim=-1, keepdims=True)) / (1e-7 + z.std(dim=-1, keepdims=True))
    log_p = F.log_softmax(normalize(z_s) / t, dim=1)
    q = F.softmax(normalize(z_t) / t, dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(1).mean() * t ** 2


def ref_nst(f_s, f_t):
    """HobbitLong/RepDistiller distiller_zoo/NST.py ``nst_loss`` (full_loss=True), written with explicit channel
    loops: MMD² with the kernel k(a, b) = ⟨a, b⟩² between normalised channel maps."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    a = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    b = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def mean_k(u, v):
        return torch.stack([torch.stack([(u[:, i] * v[:, j]).sum(-1) ** 2 for i in range(u.shape[1])])
                            for j in range(v.shape[1])]).mean()
    return mean_k(b, b).detach() + mean_k(a, a) - 2 * mean_k(a, b)


def ref_cc(e_s, e_t):
    """HobbitLong/RepDistiller distiller_zoo/CC.py ``Correlation``, as an explicit sum over consecutive pairs."""
    delta = (e_s - e_t).abs()
    return sum((delta[b] * delta[b + 1]).sum() for b in range(delta.shape[0] - 1)) / (delta.shape[0] - 1)


def test_ref_ls_kd_logit_mse_nst_cc_methods():
    t = _net2(1, 6)
    _method_agrees("ls_kd", lambda d, x, y: 0.1 * F.cross_entropy(d.student(x), y)
                   + 9.0 * ref_ls_kd(d.student(x), t(x).detach(), 2.0), _net2(0), t)
    _method_agrees("logit_mse", lambda d, x, y: 0.5 * ((d.student(x) - t(x).detach()) ** 2).sum(1).mean(),
                   _net2(0), t)

    def nst_reference(d, x, y):
        zs, fs = _taps(d.student, x, outputs=["3"])
        _, ft = _taps(t, x, outputs=["3"])
        return F.cross_entropy(zs, y) + 50.0 * ref_nst(fs["3"], ft["3"])
    _method_agrees("nst", nst_reference, _net2(0), t)

    def cc_reference(d, x, y):
        zs, fs = _taps(d.student, x, inputs=["7"])
        _, ft = _taps(t, x, inputs=["7"])
        e_s, e_t = d.embed_s.linear(fs["7:in"].flatten(1)), d.embed_t.linear(ft["7:in"].flatten(1))  # no L2 norm
        return F.cross_entropy(zs, y) + 0.02 * ref_cc(e_s, e_t)
    d, _ = _method_agrees("cc", cc_reference, _net2(0), t,
                          extra_params=lambda d: list(d.embed_s.parameters()) + list(d.embed_t.parameters()))
    assert d.embed_s.linear.out_features == 128


def test_nst_pools_the_larger_map_and_vanishes_for_equal_maps():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 6, 6, generator=g, dtype=D)
    assert float(L.nst_loss(f, f)) == pytest.approx(0.0, abs=1e-12)
    big = torch.randn(3, 5, 8, 8, generator=g, dtype=D)
    torch.testing.assert_close(L.nst_loss(big, f), ref_nst(big, f))


def test_logit_standardisation_ignores_the_teacher_s_shift_and_scale():
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(5, K, generator=g, dtype=D), torch.randn(5, K, generator=g, dtype=D)
    a = L.ls_kd_loss(z_s, z_t, 2.0)
    torch.testing.assert_close(L.ls_kd_loss(z_s, 7.0 * z_t + 3.0, 2.0), a, rtol=1e-6, atol=0)
    assert not torch.allclose(L.kd_loss(z_s, 7.0 * z_t + 3.0, 2.0), L.kd_loss(z_s, z_t, 2.0))


def test_kd_gradient_approaches_logit_regression_as_temperature_grows():
    """Hinton 2015 §2.1: for zero-mean logits, T²·∂KD/∂z_s → (z_s − z_t)/K as T → ∞, i.e. KD tends to logit
    regression (``logit_mse`` = K · that limit)."""
    g = torch.Generator().manual_seed(2)
    z_s = torch.randn(4, K, generator=g, dtype=D)
    z_t = torch.randn(4, K, generator=g, dtype=D)
    z_s, z_t = (z_s - z_s.mean(1, keepdim=True)).requires_grad_(), z_t - z_t.mean(1, keepdim=True)
    g_mse = torch.autograd.grad(L.logit_mse_loss(z_s, z_t), z_s)[0]
    errs = []
    for t in (10.0, 100.0, 1000.0):
        g_kd = torch.autograd.grad(K * L.kd_loss(z_s, z_t, t), z_s)[0]
        errs.append(float((g_kd - g_mse).norm() / g_mse.norm()))
    assert errs[2] < 1e-3 and all(8 < a / b < 12 for a, b in zip(errs, errs[1:])), errs  # the gap falls as 1/T


def ref_vid(f_s, f_t, regressor, log_scale, eps=1e-5):
    """HobbitLong/RepDistiller distiller_zoo/VIDLoss.forward (pool for dimension match, softplus variance)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    pred_mean = regressor(f_s)
    pred_var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - f_t) ** 2 / pred_var + torch.log(pred_var)))


def test_ref_vid_method_and_its_initial_variance():
    t = _net2(1, 6)

    def reference(d, x, y):
        zs, fs = _taps(d.student, x, outputs=["3"])
        _, ft = _taps(t, x, outputs=["3"])
        head = d.heads[0]
        return F.cross_entropy(zs, y) + ref_vid(fs["3"], ft["3"], head.regressor, head.log_scale)
    d, _ = _method_agrees("vid", reference, _net2(0), t, extra_params=lambda d: d.heads.parameters())
    var = torch.log(1.0 + torch.exp(d.heads[0].log_scale)) + 1e-5
    torch.testing.assert_close(var, torch.full_like(var, 5.0))  # init_pred_var
    assert [m.bias for m in d.heads[0].regressor if isinstance(m, nn.Conv2d)] == [None] * 3


def test_distilling_from_a_label_smoothed_teacher_warns(tmp_path):
    cfg = load_config(None, ["data.name=digits", "data.limit_train=128", "data.limit_test=64", "train.epochs=1",
                             "student.epochs=1", "train.label_smoothing=0.1", f"run.out_dir={tmp_path}", "run.quiet=true"])
    with make_context(cfg) as ctx:
        teacher = stage_teacher(ctx)
        with pytest.warns(DistillWarning, match="label smoothing 0.1.*distil worse"):
            stage_student(ctx, teacher)
