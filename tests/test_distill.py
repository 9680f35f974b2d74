"""Distillation losses (hand-checked values, identities) and every registered method's contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import DistillConfig, TrainConfig
from bsnn.distill import IndexedDataset, build_distiller, list_methods, losses as L, takd_chain
from bsnn.errors import ConfigError

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
    inter, intra = L.dist_parts(z_t.clone(), z_t, 4.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-5) and intra.item() == pytest.approx(0.0, abs=1e-5)
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


def test_zipf_targets_hand_value():
    z = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    q = L.zipf_targets(z, torch.tensor([0]), alpha=0.1)
    # non-target ranks: class 1 -> 1, class 3 -> 2, class 2 -> 3; mass 1, 1/2, 1/3 normalised by 11/6
    expected = torch.tensor([[0.9, 0.1 * 6 / 11, 0.1 * 2 / 11, 0.1 * 3 / 11]])
    torch.testing.assert_close(q, expected)
    assert not q.requires_grad


def test_tf_nkd_single_sample_target_is_ce():
    z = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    y = torch.tensor([2])
    target, non = L.tf_nkd_parts(z, y)
    assert target.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)  # p̃ = p² + 1 − p² = 1
    assert non.item() > 0


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
    torch.testing.assert_close(L.ca_mkd_weights([good], y), torch.ones(1, 2))


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


_PARAMS = {"crd": {"n_data": 16, "feat_dim": 8, "nce_k": 5}}
ALL = ["kd", "dkd", "dist", "nkd", "tf_nkd", "zipf_ls", "bake", "fitnet", "at", "sp", "rkd", "pkt", "crd", "takd",
       "ca_mkd", "dml", "bd_kd", "mixup_kd", "ce"]


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
    t_state = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    s_bn = student[1].running_mean.clone()
    d = build_distiller(student, teacher, DistillConfig(method=method, params=_PARAMS.get(method, {})))
    torch.testing.assert_close(student[1].running_mean, s_bn)  # building (probe forward) leaves BN stats alone
    d.train()
    assert d.training and student.training and all(not t.training for t in teachers)
    x, y, idx = _batch()
    out = d(x, y, idx)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    assert out["logits"].shape == (4, K) and "ce" in out
    assert all(not torch.is_tensor(v) or not v.requires_grad for k, v in out.items() if k not in ("loss", "logits"))
    out["loss"].backward()
    for t, state in zip(teachers, t_state):
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():
            assert torch.equal(v, state[k]), k  # eval mode: BN running stats untouched
    assert all(p.grad is not None for p in student.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())  # hooks removed
    for t in teachers:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.modules())
    teacher_params = {id(p) for t in teachers for p in t.parameters()}
    assert not any(id(p) in teacher_params for p in d.parameters())
    assert all(not k.startswith("teacher") for k in d.state_dict())


def test_teacher_free_methods_build_without_teacher():
    x, y, _ = _batch()
    for method in ("ce", "tf_nkd", "zipf_ls", "bake", "dml", "bd_kd"):
        out = build_distiller(_net(0), None, DistillConfig(method=method))(x, y)
        assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_distiller(_net(0), None, DistillConfig(method="dkd"))


def test_unknown_param_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key.*'gama'.*valid keys: alpha, beta, warmup"):
        build_distiller(_net(0), _net(1), DistillConfig(method="dkd", params={"gama": 1}))


def test_weights_are_separate_and_explicit():
    x, y, _ = _batch()
    d = build_distiller(_net(0), _net(1), DistillConfig(method="kd", ce_weight=0.3, kd_weight=2.0))
    out = d(x, y)
    torch.testing.assert_close(out["loss"], 0.3 * out["ce"] + 2.0 * out["kd"])


def test_dkd_warmup_follows_set_epoch():
    x, y, _ = _batch()
    d = build_distiller(_net(0), _net(1), DistillConfig(method="dkd", ce_weight=1.0, kd_weight=1.0))
    assert d(x, y)["warmup"].item() == 1.0  # no epoch given: no warm-up
    d.set_epoch(0)
    out = d(x, y)
    assert out["warmup"].item() == pytest.approx(1 / 20)
    torch.testing.assert_close(out["loss"], out["ce"] + (out["tckd"] + 8 * out["nckd"]) / 20)
    d.set_epoch(19)
    assert d(x, y)["warmup"].item() == 1.0


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
    d = build_distiller(_net(0), t, DistillConfig(method="mixup_kd"))
    x, y, _ = _batch()
    torch.manual_seed(0)
    out = d.train()(x, y)
    assert not torch.equal(seen[-1], x) and 0 < out["lam"].item() < 1
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
    given = _net(7, width=3)
    d2 = build_distiller(s, None, DistillConfig(method="bd_kd"), peer=given)
    assert d2.peers[0] is given and {"peer_ce", "peer_kl"} <= set(d2(x, y))


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
    from bsnn.train import fit

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
