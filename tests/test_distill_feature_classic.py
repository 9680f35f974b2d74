"""ab, ft, fsp, irg, reviewkd (bsnn.distill.feature_classic) against references restated from the authors' code.

Every ``ref_*`` below is written from the authors' public code (repository and file in its docstring), not from
bsnn's: the methods are compared for value and gradient at 1e-6 relative in float64 with the published defaults.
IRG's reference gradient is the authors' hand-written Caffe backward, restated with loops.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import DistillConfig, TrainConfig
from bsnn.distill import build_distiller
from bsnn.distill import feature_classic as FC
from bsnn.errors import ConfigError
from bsnn.pipeline import fit_schedules
from bsnn.train import fit
from tests._distill_helpers import grads, xb

D = torch.float64
RTOL, ATOL = 1e-6, 1e-12
K = 5


def _net(seed: int, width: int = 4, k: int = K) -> nn.Sequential:
    """Two stages (8x8 then 4x4), global average pool, Linear: stage ends '2' and '7', pool '8'."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),               # 0 1 2   8x8
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),  # 3 4 5 4x4
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),                         # 6 7     4x4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, k),                  # 8 9 10
    ).double()


_xb = partial(xb, side=8)


_grads = grads


def _build(method: str, student, teacher, params=None, epoch=None):
    x, _ = _xb()
    d = build_distiller(student, teacher, DistillConfig(method=method, params=params or {}), epochs=270,
                        example_input=x)
    d.eval()  # BatchNorm on running statistics: the reference sees the same network
    if epoch is not None:
        d.set_epoch(epoch)
    return d


def _agrees(d, reference, x=None, y=None):
    """bsnn's loss and its gradient w.r.t. every distiller parameter (student and heads) equal ``reference``'s."""
    if x is None:
        x, y = _xb()
    wrt = list(d.parameters())
    out = d(x, y)
    ref = reference(x, y)
    torch.testing.assert_close(out["loss"], ref, rtol=RTOL, atol=0)
    torch.testing.assert_close(_grads(out["loss"], wrt), _grads(ref, wrt), rtol=RTOL, atol=ATOL)
    return out


def _pure_agrees(ours, ref, *leaves):
    a = [v.clone().requires_grad_(True) for v in leaves]
    b = [v.clone().requires_grad_(True) for v in leaves]
    va, vb = ours(*a), ref(*b)
    torch.testing.assert_close(va, vb, rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.autograd.grad(va, a), torch.autograd.grad(vb, b), rtol=RTOL, atol=ATOL)


def _pre(net, x, upto):
    """The input of module ``upto`` of a Sequential (plain slicing, no hooks)."""
    return net[:upto](x)


# --------------------------------------------------------------------------------------------------- AB


def ref_ab_alternative_l2(source, target, margin):
    """bhheo/AB_distillation cifar10_AB_distillation.py criterion_alternative_L2."""
    loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float().to(source.dtype)
            + (source - margin) ** 2 * ((source <= margin) & (target > 0)).float().to(source.dtype))
    return torch.abs(loss).sum()


def ref_ab(sources, targets, margin=1.0):
    """The authors' CIFAR loop (deepest layer / batch, the one before / batch / 2, ...), then ``/ 1000 * 3``."""
    b = sources[0].shape[0]
    loss = 0.0
    for depth, (s, t) in enumerate(zip(reversed(sources), reversed(targets))):
        loss = loss + ref_ab_alternative_l2(s, t, margin) / b / 2 ** depth
    return loss / 1000 * 3


def test_ab_alternative_l2_hand_value():
    s = torch.tensor([[0.5, -2.0, 0.5, 3.0]])
    t = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    # 0.5 should be off (t <= 0): (0.5 + 1)² ; -2 is already off beyond the margin: 0 ; 0.5 should be on: (0.5 - 1)²
    # 3 is on beyond the margin: 0
    assert FC.ab_alternative_l2(s, t, 1.0).item() == pytest.approx(1.5 ** 2 + 0.5 ** 2)
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(3, 4, 5, 5, generator=g, dtype=D), torch.randn(3, 6, 2, 2, generator=g, dtype=D)]
    tgt = [torch.randn(3, 4, 5, 5, generator=g, dtype=D), torch.randn(3, 6, 2, 2, generator=g, dtype=D)]
    _pure_agrees(lambda a, b: FC.ab_loss([a, b], tgt, 1.0), lambda a, b: ref_ab([a, b], tgt, 1.0), *src)


def test_ref_ab_init_phase_then_ce():
    s, t = _net(0), _net(1, 6)
    d = _build("ab", s, t, epoch=0)
    assert d.student_layers == ["2:in", "7:in"] == d.teacher_layers  # pre-ReLU stage ends
    assert d.hparams["init_epochs"] == pytest.approx(30.0) and d.init_epochs == 30
    conv, bn = d.connectors[0]
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.out_channels == 6 and bn.num_features == 6

    def reference(x, y):
        src = [d.connectors[0](_pre(s, x, 2)), d.connectors[1](_pre(s, x, 7))]
        return ref_ab(src, [_pre(t, x, 2), _pre(t, x, 7)])

    out = _agrees(d, reference)
    assert out["init_phase"] == 1.0
    assert torch.autograd.grad(out["loss"], s[10].weight, allow_unused=True)[0] is None  # classifier untouched
    d.set_epoch(30)  # second stage: CE only (RepDistiller's loss_kd = 0)
    out = _agrees(d, lambda x, y: F.cross_entropy(s(x), y))
    assert out["init_phase"] == 0.0
    same = _build("ab", _net(0), _net(1))
    assert all(isinstance(c, nn.Identity) for c in same.connectors)  # equal channels: no connector


def test_ab_refuses_spatial_mismatch():
    with pytest.raises(ConfigError, match="spatial size"):
        _build("ab", _net(0), _net(1), params={"student_layer": "2:in", "teacher_layer": "7:in"})


# -------------------------------------------------------------------------------------------------- FSP


def ref_fsp_matrix(bot, top):
    """RepDistiller distiller_zoo/FSP.py FSP.compute_fsp (one pair)."""
    b_h, t_h = bot.shape[2], top.shape[2]
    if b_h > t_h:
        bot = F.adaptive_avg_pool2d(bot, (t_h, t_h))
    elif b_h < t_h:
        top = F.adaptive_avg_pool2d(top, (b_h, b_h))
    bot = bot.unsqueeze(1)
    top = top.unsqueeze(2)
    bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
    top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
    return (bot * top).mean(-1)


def ref_fsp(g_s, g_t):
    """RepDistiller FSP.forward + compute_loss, summed as helper/pretrain.py init does."""
    return sum((ref_fsp_matrix(g_s[i], g_s[i + 1]) - ref_fsp_matrix(g_t[i], g_t[i + 1])).pow(2).mean()
               for i in range(len(g_s) - 1))


def test_fsp_matrix_hand_value():
    bot = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    top = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    assert FC.fsp_matrix(bot, top).item() == pytest.approx((1 + 4) / 4)
    big = torch.arange(16.0).view(1, 1, 4, 4)  # pooled to 2x2: [[2.5, 4.5], [10.5, 12.5]]
    assert FC.fsp_matrix(big, top).item() == pytest.approx((2.5 + 12.5) / 4)


def test_ref_fsp_init_phase_then_ce():
    s, t = _net(0), _net(1)  # FSP needs equal channel counts
    d = _build("fsp", s, t, epoch=3)
    assert d.student_layers == ["2", "7"]  # the stem is the first stage end here

    def reference(x, y):
        return ref_fsp([s[:3](x), s[:8](x)], [t[:3](x), t[:8](x)])

    out = _agrees(d, reference)
    assert out["init_phase"] == 1.0
    d.set_epoch(30)
    _agrees(d, lambda x, y: F.cross_entropy(s(x), y))
    three = _build("fsp", _net(0), _net(1), params={"student_layer": ["2", "5", "7"]}, epoch=0)
    _agrees(three, lambda x, y: ref_fsp([three.student[:3](x), three.student[:6](x), three.student[:8](x)],
                                        [three.teacher[:3](x), three.teacher[:6](x), three.teacher[:8](x)]))
    with pytest.raises(ConfigError, match="equal channel counts"):
        _build("fsp", _net(0), _net(1, 6))
    with pytest.raises(ConfigError, match="at least 2 layers"):
        _build("fsp", _net(0), _net(1), params={"student_layer": "2"})


# --------------------------------------------------------------------------------------------------- FT


def ref_factor(f, p1=2):
    """RepDistiller distiller_zoo/FT.py FactorTransfer.factor."""
    return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))


def ref_ft(f_s, f_t, p1=2, p2=1):
    """RepDistiller FactorTransfer.factor_loss."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    if p2 == 1:
        return (ref_factor(f_s, p1) - ref_factor(f_t, p1)).abs().mean()
    return (ref_factor(f_s, p1) - ref_factor(f_t, p1)).pow(p2).mean()


def test_ft_loss_pure_and_pooling():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 4, 4, generator=g, dtype=D), torch.randn(3, 2, 2, 2, generator=g, dtype=D)
    _pure_agrees(FC.ft_loss, ref_ft, a, b)
    _pure_agrees(lambda u, v: FC.ft_loss(u, v, 2.0, 2.0), lambda u, v: ref_ft(u, v, 2, 2), b, a)
    assert FC.ft_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-12)  # factors are normalised


def test_ref_ft_paraphraser_phase_then_factor_transfer():
    s, t = _net(0), _net(1, 6)
    d = _build("ft", s, t, epoch=0)
    assert d.student_layers == ["7"] and d.teacher_layers == ["7"]
    assert d.paraphraser.encoder[0].in_channels == 12 and d.paraphraser.encoder[4].out_channels == 6
    assert d.translator.encoder[0].in_channels == 8 and d.translator.encoder[-3].out_channels == 6
    run_mean = s[1].running_mean.clone()
    d.train()
    out = d(*_xb())
    torch.testing.assert_close(s[1].running_mean, run_mean)  # the student stays in eval mode in this phase
    d.eval()

    def rec(x, y):
        f_t = t[:8](x)
        return F.mse_loss(d.paraphraser.decoder(d.paraphraser.encoder(f_t)), f_t)

    out = _agrees(d, rec)
    assert out["init_phase"] == 1.0
    assert all(g is None for g in torch.autograd.grad(out["loss"], list(s.parameters()), allow_unused=True))
    d.set_epoch(30)

    def reference(x, y):
        f_s = s[:8](x)
        factor_t = d.paraphraser.encoder(t[:8](x)).detach()  # fixed in the second stage (not in the optimiser)
        return F.cross_entropy(s(x), y) + 200.0 * ref_ft(d.translator.encoder(f_s), factor_t)

    out = _agrees(d, reference)
    assert out["init_phase"] == 0.0
    d(*_xb())["loss"].backward()
    assert all(p.grad is None for p in d.paraphraser.parameters())


# -------------------------------------------------------------------------------------------------- IRG


def ref_caffe_map(x):
    """yufanLIU/IRG batch_euclidean_map_layer.cpp Forward_cpu (loops) -> (top, max_d)."""
    n = x.shape[0]
    top = torch.zeros(n, n, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            top[i, j] = ((x[i] - x[j]) ** 2).sum()
    max_d = top.max()
    return top / max_d, max_d


def ref_caffe_map_backward(x, top_diff, max_d):
    """batch_euclidean_map_layer.cpp Backward_cpu: bottom_diff[n] += top_diff[n, nn] * 2 / max_d * (x_n - x_nn)."""
    n = x.shape[0]
    grad = torch.zeros_like(x)
    for i in range(n):
        for j in range(n):
            grad[i] += top_diff[i, j] * 2.0 / max_d * (x[i] - x[j])
    return grad


def ref_caffe_vector(a, b):
    """batch_euclidean_vector_layer.cpp Forward_cpu -> (top, max_d)."""
    d = torch.stack([((a[i] - b[i]) ** 2).sum() for i in range(a.shape[0])])
    return d / d.max(), d.max()


def ref_irg_value_and_grad(e_s, e_t, pairs_s=(), pairs_t=()):
    """Caffe EuclideanLoss (bottoms: teacher, student; sum (a - b)² / 2N) on the layers above, forward and backward
    by hand: returns the loss and its gradient w.r.t. ``e_s`` and every student pair member."""
    map_s, max_s = ref_caffe_map(e_s)
    map_t, _ = ref_caffe_map(e_t)
    b = e_s.shape[0]
    loss = ((map_t - map_s) ** 2).sum() / (2 * b)
    grads = [ref_caffe_map_backward(e_s, (map_s - map_t) / b, max_s)]
    for (a_s, b_s), (a_t, b_t) in zip(pairs_s, pairs_t):
        v_s, m_s = ref_caffe_vector(b_s, a_s)
        v_t, _ = ref_caffe_vector(b_t, a_t)
        loss = loss + ((v_t - v_s) ** 2).sum() / 2  # blob [1, 1, 1, B]: N = 1
        top_diff = v_s - v_t
        g_later = torch.stack([top_diff[i] * 2.0 / m_s * (b_s[i] - a_s[i]) for i in range(b)])
        grads += [-g_later, g_later]
    return loss, grads


def test_irg_loss_matches_the_caffe_layers_value_and_backward():
    g = torch.Generator().manual_seed(2)
    e_s, e_t = torch.randn(5, 7, generator=g, dtype=D), torch.randn(5, 3, generator=g, dtype=D)
    pairs_s = [(torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, 4, generator=g, dtype=D))]
    pairs_t = [(torch.randn(5, 6, generator=g, dtype=D), torch.randn(5, 6, generator=g, dtype=D))]
    ref, ref_grads = ref_irg_value_and_grad(e_s, e_t, pairs_s, pairs_t)
    leaves = [e_s.clone().requires_grad_(True)] + [v.clone().requires_grad_(True) for v in pairs_s[0]]
    ours = FC.irg_loss(leaves[0], e_t, [(leaves[1], leaves[2])], pairs_t)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    torch.testing.assert_close(list(torch.autograd.grad(ours, leaves)), ref_grads, rtol=RTOL, atol=ATOL)
    edge_s = FC.irg_edge_map(e_s)
    torch.testing.assert_close(edge_s, ref_caffe_map(e_s)[0], rtol=RTOL, atol=ATOL)
    assert edge_s.max().item() == pytest.approx(1.0) and torch.all(edge_s.diagonal() == 0)


def test_ref_irg_method_with_a_transformation_pair():
    s, t = _net(0), _net(1, 6)
    d = _build("irg", s, t, params={"transform_layers": [["5", "7"]]})
    assert d.student_layers == ["10:in", "5", "7"]

    def reference_value(x, y):
        e_s, e_t = s[:10](x), t[:10](x)
        pair_s = [(s[:6](x).mean((2, 3)), s[:8](x).mean((2, 3)))]
        pair_t = [(t[:6](x).mean((2, 3)), t[:8](x).mean((2, 3)))]
        return e_s, pair_s, ref_irg_value_and_grad(e_s.detach(), e_t, [tuple(v.detach() for v in pair_s[0])], pair_t)

    x, y = _xb()
    out = d(x, y)
    e_s, pair_s, (irg, g_feats) = reference_value(x, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(s(x), y) + 0.005 * irg, rtol=RTOL, atol=0)
    wrt = list(s.parameters())
    # reference gradient: CE by autograd plus 0.005 · the Caffe backward chained into the student by autograd
    ce_g = _grads(F.cross_entropy(s(x), y), wrt)
    feat_g = torch.autograd.grad([e_s, pair_s[0][0], pair_s[0][1]], wrt, [0.005 * g for g in g_feats],
                                 allow_unused=True)
    ref_g = [a + (b if b is not None else 0) for a, b in zip(ce_g, feat_g)]
    torch.testing.assert_close(_grads(out["loss"], wrt), ref_g, rtol=RTOL, atol=ATOL)
    with pytest.raises(ConfigError, match="equal channel counts"):
        _build("irg", _net(0), _net(1), params={"transform_layers": [["2", "7"]]})


# --------------------------------------------------------------------------------------------- ReviewKD


def ref_hcl(fstudent, fteacher):
    """dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py hcl."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def ref_abf(abf, x, y=None, shape=None, out_shape=None):
    """ReviewKD ABF.forward, on the distiller's ABF parameters (conv1, conv2, att_conv)."""
    n, _, h, w = x.shape
    x = abf.conv1(x)
    if abf.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = torch.cat([x, y], dim=1)
        z = abf.att_conv(z)
        x = (x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w))
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    y = abf.conv2(x)
    return y, x


def ref_review(abfs_shallow_to_deep, feats, shapes, out_shapes):
    """ReviewKD.forward: features reversed, the deepest ABF first, results inserted at the front."""
    x = feats[::-1]
    abfs = abfs_shallow_to_deep[::-1]
    results = []
    out_features, res_features = abfs[0](x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = abf(features, res_features, shape, out_shape)
        results.insert(0, out_features)
    return results


def test_hcl_hand_value():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 1, 2, 2)
    # full size MSE 1, pooled to 1x1 MSE 1 (weight 1/2; sizes 4 and 2 are not below H = 2): (1 + 1/2) / 1.5
    assert FC.hcl_loss([a], [b]).item() == pytest.approx(1.0)
    c = torch.tensor([2.0, 0.0, 0.0, 2.0]).view(1, 1, 2, 2)
    assert FC.hcl_loss([a], [c]).item() == pytest.approx((2.0 + 0.5 * 1.0) / 1.5)


def test_ref_reviewkd_with_its_warmup():
    s, t = _net(0), _net(1, 6)
    d = _build("reviewkd", s, t, epoch=5)
    assert d.student_layers == ["2", "7", "8"] and d.teacher_layers == ["2:in", "7:in", "8"]
    assert d.hparams["warmup"] == pytest.approx(22.5)  # 20 of 240 epochs, for a 270-epoch run
    assert [a.att_conv is not None for a in d.abfs] == [True, True, False]
    assert d.abfs[0].conv1[0].out_channels == 8  # mid = min(512, channels of the deepest student level)

    def reference(x, y):
        feats = [s[:3](x), s[:8](x), s[:9](x)]
        t_feats = [t[:2](x), t[:7](x), t[:9](x)]
        abfs = [lambda *a, m=m, **k: ref_abf(m, *a, **k) for m in d.abfs]
        outs = ref_review(abfs, feats, [f.shape[-1] for f in feats][::-1], [f.shape[-1] for f in t_feats][::-1])
        return F.cross_entropy(s(x), y) + 5.0 * min(1.0, 5 / 22.5) * ref_hcl(outs, t_feats)

    out = _agrees(d, reference)
    assert out["warmup"] == pytest.approx(5 / 22.5)
    # teacher levels of other sizes (the authors' out_shapes, e.g. MobileNet -> ResNet50): outputs resized to them
    sized = _build("reviewkd", s, t, params={"student_layer": ["2", "7"], "teacher_layer": ["5:in", "8"]})

    def reference_sized(x, y):
        feats, t_feats = [s[:3](x), s[:8](x)], [t[:5](x), t[:9](x)]
        abfs = [lambda *a, m=m, **k: ref_abf(m, *a, **k) for m in sized.abfs]
        outs = ref_review(abfs, feats, [8, 4][::-1], [4, 1][::-1])
        assert [o.shape[-1] for o in outs] == [4, 1]
        return F.cross_entropy(s(x), y) + 5.0 * ref_hcl(outs, t_feats)

    _agrees(sized, reference_sized)
    d.set_epoch(0)
    assert d(*_xb())["loss"].item() == pytest.approx(d(*_xb())["ce"].item())  # the authors' 0-based epoch 0


# -------------------------------------------------------------------------------------- training smoke


@pytest.mark.parametrize("method,weights,epoch", [
    ("ab", {}, 0), ("fsp", {}, 0), ("ft", {}, 0), ("ft", {}, None), ("irg", {"ce_weight": 0.0, "kd_weight": 1.0}, None),
    ("reviewkd", {}, None)])
def test_a_few_steps_reduce_the_loss(method, weights, epoch):
    s, t = _net(0), _net(1, 6 if method != "fsp" else 4)
    d = build_distiller(s, t, DistillConfig(method=method, **weights), epochs=270)
    if epoch is not None:
        d.set_epoch(epoch)
    d.train()
    opt = torch.optim.SGD(d.parameters(), lr=0.05 if method != "ft" or epoch is None else 1e-3, momentum=0.9)
    x, y = _xb(16, seed=3)
    key = {"ab": "ab", "fsp": "fsp", "irg": "irg", "reviewkd": "reviewkd"}.get(method, "ft")
    key = "paraphraser_rec" if method == "ft" and epoch == 0 else key
    first = None
    for _ in range(12):
        out = d(x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        first = out[key].item() if first is None else first
    assert d(x, y)[key].item() < first


def test_fit_runs_the_init_phase_then_trains_the_student():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 1, 8, 8, generator=g, dtype=D), torch.randint(0, K, (16,), generator=g))
    loader = DataLoader(ds, batch_size=8)
    s, t = _net(0), _net(1, 6)
    d = build_distiller(s, t, DistillConfig(method="ab", params={"init_epochs": 1}), epochs=2)
    w_conn, w_fc = d.connectors[0][0].weight.clone(), s[10].weight.clone()
    fit(d, s, loader, TrainConfig(epochs=2, lr=0.01), quiet=True)
    assert d.epoch == 1 and not d.in_init()
    assert not torch.equal(d.connectors[0][0].weight, w_conn) and not torch.equal(s[10].weight, w_fc)
    assert any(k.startswith("connectors.") for k in d.state_dict())
    assert not any(k.startswith("connectors") for k in s.state_dict())  # the student stays a plain network


def test_default_stage_ends_and_fractional_init_phase():
    assert FC.stage_ends(_net(0), pre_activation=True) == ["2:in", "7:in"]
    assert FC.stage_ends(_net(0), with_stem=True) == ["2", "7"]
    d = build_distiller(_net(0), _net(1), DistillConfig(method="fsp"), epochs=10)
    assert d.init_epochs == pytest.approx(30 * 10 / 270)  # the published fraction of the run, 1.11 epochs
    assert not d.in_init()  # no epoch set: past the initialisation, as DKD's warm-up
    d.set_epoch(0)
    assert d.in_init()
    d.set_progress(1.1)  # 10 % into the second epoch: still initialising
    assert d.in_init() and d.epoch == 1
    d.set_progress(1.12)
    assert not d.in_init()
    none = build_distiller(_net(0), _net(1), DistillConfig(method="fsp", params={"init_epochs": 0}), epochs=10)
    none.set_epoch(0)
    assert not none.in_init()


@pytest.mark.parametrize("method", ["ab", "fsp", "ft"])
def test_init_phase_keeps_the_contract(method):
    s, t = _net(0), _net(1, 6 if method != "fsp" else 4)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    d = build_distiller(s, t, DistillConfig(method=method), epochs=270)
    d.set_epoch(0)
    d.train()
    out = d(*_xb())
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (6, K) and out["init_phase"] == 1.0
    out["loss"].backward()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in list(s.modules()) + list(t.modules()))
    assert all(torch.equal(v, state[k]) for k, v in t.state_dict().items()) and not t.training
    assert not any(k.startswith("teacher") for k in d.state_dict())


def test_pipeline_fits_the_init_phase_to_the_run():
    assert fit_schedules(DistillConfig(method="ab"), 27).params["init_epochs"] == pytest.approx(3.0)
    assert fit_schedules(DistillConfig(method="reviewkd"), 24).params["warmup"] == pytest.approx(2.0)
    DistillConfig(method="ft", params={"rate": 0.25}).validate()
    with pytest.raises(ConfigError, match="valid keys"):
        DistillConfig(method="irg", params={"transform": []}).validate()
