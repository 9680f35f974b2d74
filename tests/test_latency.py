"""Latency-reduction options: each changes what it should."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.activations import QCFS, ClipReLU, qcfs, qcfs_reference, replace_activations_
from bsnn.binary import binarize_
from bsnn.config import ConvertConfig, SimConfig
from bsnn.convert import Max, convert
from bsnn.convert.graph import capture
from bsnn.convert.snn_calibration import calibrate_snn_
from bsnn.early_exit import EarlyExit, apply_early_exit, early_exit_curve, stable_run_length
from bsnn.simulate import run_batch, simulate


def _net(seed=0):
    torch.manual_seed(seed)
    return binarize_(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                                   nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))).eval()


def _loader(x, y=None):
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_qcfs_closed_form():
    x = torch.tensor([-0.2, 0.0, 0.1, 0.124, 0.126, 0.3, 0.9, 2.0])
    lam = torch.tensor(1.0)
    # λ/L · clip(floor(x·L/λ + 1/2), 0, L) with L = 4
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25, 0.25, 1.0, 1.0])
    torch.testing.assert_close(qcfs(x, lam, 4), expected)
    m = QCFS(clip=1.0, levels=4)
    torch.testing.assert_close(m(x), expected)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    assert m.clip.grad is not None and xg.grad is not None  # straight-through floor: trainable


def test_qcfs_gradient_flows_over_the_clip_range_as_in_the_authors_code():
    # the authors clamp x/λ to [0, 1] before the floor: x gets the gradient wherever 0 < x < λ (also where the
    # output is level 0 or L), λ gets q/L - m·x/λ
    x = torch.tensor([-1.0, 0.1, 0.5, 1.0, 2.9, 3.2, 5.0], requires_grad=True)
    lam = torch.tensor(3.0, requires_grad=True)
    y = qcfs(x, lam, 4)
    y.sum().backward()
    inside = torch.tensor([0.0, 1, 1, 1, 1, 0, 0])
    torch.testing.assert_close(x.grad, inside)
    q = y.detach() / 3.0
    torch.testing.assert_close(lam.grad, (q - inside * x.detach() / 3.0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qcfs_equals_its_op_by_op_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(8, 5, 7, 7, generator=g)).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.5, 3.0])  # the level / clip boundaries exactly
    grad_out = torch.randn(x.shape, generator=g).to(dtype)
    res = {}
    for f in (qcfs_reference, qcfs):
        xi = x.clone().requires_grad_()
        lam = torch.tensor(3.0, dtype=dtype, requires_grad=True)
        y = f(xi, lam, 4)
        y.backward(grad_out)
        res[f] = (y.detach(), xi.grad, lam.grad)
    (y_ref, gx_ref, gl_ref), (y, gx, gl) = res[qcfs_reference], res[qcfs]
    assert torch.equal(y, y_ref)  # the same ops in the same order: bit for bit
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gl, gl_ref, rtol=1e-5, atol=1e-5)


def test_shift_sets_initial_potential_half_threshold():
    net, x = _net(), torch.randn(16, 1, 8, 8)
    plain = convert(net, _loader(x), ConvertConfig.plain())
    shifted = convert(net, _loader(x), ConvertConfig.plain(v_init=0.5))
    for n in shifted.neurons().values():
        v0 = n.initial_potential(torch.zeros(2, *n.v_init_bias.shape))
        assert torch.all(v0 == 0.5)  # units of θ: v0 = θ/2
    for n in plain.neurons().values():
        assert torch.all(n.initial_potential(torch.zeros(1)) == 0)
    # an input of 0.6 θ: no spike at t=1 without the shift, a spike with it
    s_plain = plain.neurons()["if_2"]
    s_plain.reset(), s_plain.__setattr__("time_chunk", 1)
    th = s_plain.threshold
    out = s_plain(0.6 * th.expand(1, 6, 8, 8).clone())
    assert out.sum() == 0
    s_shift = shifted.neurons()["if_2"]
    s_shift.reset(), s_shift.__setattr__("time_chunk", 1)
    assert s_shift(0.6 * s_shift.threshold.expand(1, 6, 8, 8).clone()).sum() == 6 * 8 * 8


def test_threshold_scale_multiplies_thresholds():
    net, x = _net(), torch.randn(16, 1, 8, 8)
    a = convert(net, _loader(x), ConvertConfig.plain())
    b = convert(net, _loader(x), ConvertConfig.plain(threshold_scale=0.8))
    for k, lam in a.meta["thresholds"].items():  # every λ scaled ...
        torch.testing.assert_close(torch.tensor(b.meta["thresholds"][k]), 0.8 * torch.tensor(lam))
    first = a.neuron_names[0]  # ... so the first IF threshold (analog input) scales; later ratios λ_l/λ_{l-1} do not
    torch.testing.assert_close(b.neurons()[first].threshold, 0.8 * a.neurons()[first].threshold)


@pytest.mark.parametrize("mode", ["bias", "potential"])
def test_snn_calibration_reduces_layer_error(mode):
    net, x = _net(1), torch.randn(64, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig.plain())
    gm = capture(net, x)
    before = calibrate_snn_(snn, gm, x, timesteps=8, mode=mode)   # corrects; returns errors before correcting
    after = calibrate_snn_(snn, gm, x, timesteps=8, mode=mode)    # errors of the corrected network
    assert sum(after.values()) < sum(before.values())
    first = snn.neuron_names[0]
    assert after[first] < before[first]
    field = "i_bias" if mode == "bias" else "v_init_bias"
    assert any(getattr(n, field).abs().sum() > 0 for n in snn.neurons().values())


def test_qcfs_and_clip_convert_with_trained_threshold():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    lam = convert(_net(), _loader(x), ConvertConfig.plain()).meta["thresholds"]
    net = replace_activations_(_net(), "qcfs", levels=4).eval()
    for name, value in lam.items():  # clip each QCFS at its layer's activation range (as training would)
        net.get_submodule(name).clip.data.fill_(value)
    snn = convert(net, _loader(x))
    assert snn.meta["thresholds"] == pytest.approx(lam)
    assert all(n.v_init_frac.item() == 0.5 for n in snn.neurons().values())  # QCFS's built-in shift
    with torch.no_grad():
        z = net(x)
        err = {t: (run_batch(snn, x, t, 16)[-1] / t - z).abs().mean().item() for t in (4, 64)}
    # QCFS + θ/2 shift is accurate at T = L = 4: far closer to its ANN than plain max-norm conversion of the
    # same weights with ReLU is to its own ANN
    plain_net = _net()
    plain = convert(plain_net, _loader(x), ConvertConfig.plain())
    with torch.no_grad():
        err_plain = (run_batch(plain, x, 4, 16)[-1] / 4 - plain_net(x)).abs().mean().item()
    assert err[4] < 0.5 * err_plain, (err, err_plain)
    clip = replace_activations_(_net(), "clip", clip=3.0).eval()
    snn_c = convert(clip, _loader(x), ConvertConfig.plain())
    assert isinstance(clip[2], ClipReLU) and snn_c.meta["thresholds"]["2"] == pytest.approx(3.0)
    assert all(n.v_init_frac.item() == 0.0 for n in snn_c.neurons().values())  # no built-in shift: v_init rules


def test_percentile_search_picks_best_recorded_candidate():
    net = _net(2)
    x = torch.randn(96, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    snn = convert(net, _loader(x, y), ConvertConfig(search_percentiles=[99.0, 99.9, 100.0], search_timesteps=8,
                                                   search_samples=96))
    scores = snn.meta["threshold_search"]
    assert set(scores) == {"p99", "p99.9", "p100"}
    assert scores[snn.meta["convert"]["threshold"]] == max(scores.values())


def test_early_exit_rule_by_hand():
    preds = torch.tensor([[0, 1], [1, 1], [1, 2], [1, 2], [1, 2]])  # [T=5, N=2]
    assert stable_run_length(preds).tolist() == [[1, 1], [1, 2], [2, 1], [3, 2], [4, 3]]
    margins = torch.ones(5, 2)
    r = apply_early_exit(preds, margins, torch.tensor([1, 2]), EarlyExit(patience=2))
    assert r["exit_timesteps"].tolist() == [3, 2] and r["accuracy"] == 50.0 and r["mean_timesteps"] == 2.5
    r = apply_early_exit(preds, margins, torch.tensor([1, 2]), EarlyExit(patience=3))
    assert r["exit_timesteps"].tolist() == [4, 5] and r["accuracy"] == 100.0
    r = apply_early_exit(preds, margins * 0, torch.tensor([1, 2]), EarlyExit(patience=1, margin=0.5))
    assert r["exit_timesteps"].tolist() == [5, 5]  # margin never reached: run to the end


def test_early_exit_curve_from_simulation():
    net, x = _net(3), torch.randn(48, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    snn = convert(net, _loader(x, y), ConvertConfig.plain())
    res = simulate(snn, _loader(x, y), [32], SimConfig(record_predictions=True), quiet=True)
    assert res.predictions.shape == (32, 48)
    assert (res.predictions[-1].long() == y).float().mean().item() * 100 == pytest.approx(res.accuracy[32])
    curve = early_exit_curve(res, patiences=(1, 4, 32), margins=(0.0,))
    assert curve[0]["mean_timesteps"] == 1.0  # patience 1 exits everyone at the first step
    assert all(a["mean_timesteps"] < b["mean_timesteps"] and a["accuracy"] < b["accuracy"]
               for a, b in zip(curve, curve[1:]))  # a Pareto front: more time buys more accuracy
    grid = early_exit_curve(res, patiences=(1, 2, 4, 8, 32), margins=(0.0, 0.5, 2.0))
    for p in (1, 2, 4, 8, 32):  # every rule of the grid is on the front or dominated by a point of it
        for m in (0.0, 0.5, 2.0):
            r = apply_early_exit(res.predictions, res.margins, res.labels, EarlyExit(p, m))
            assert any(f["mean_timesteps"] <= r["mean_timesteps"] + 1e-9 and f["accuracy"] >= r["accuracy"] - 1e-9
                       for f in grid)


def test_architecture_checks_warn_before_conversion():
    import warnings

    from bsnn.convert.checks import ConversionWarning, architecture_findings, warn_architecture

    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                        nn.GELU())
    found = architecture_findings(bad)
    assert not any("MaxPool2d" in f for f in found)  # max-pools convert (spiking max-pool)
    assert any("GELU" in f for f in found)
    assert any("2 layer(s)" in f and "bias" in f for f in found)  # conv+BN, conv with its own bias
    assert not any("bias" in f for f in architecture_findings(bad, v_init=0.5))  # compensated: no bias finding
    good = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.AvgPool2d(2))
    assert architecture_findings(good) == []
    with pytest.warns(ConversionWarning, match="GELU"):
        warn_architecture(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_architecture(good)


def test_early_exit_rules_are_chosen_on_validation_and_reported_on_test():
    """The rule grid's front and the chosen rule come from the validation result only: relabelling the test
    split changes the test accuracies reported but not which rules are listed or chosen."""
    from types import SimpleNamespace

    from bsnn.early_exit import validated_early_exit

    g = torch.Generator().manual_seed(0)

    def result(n):
        labels = torch.randint(0, 4, (n,), generator=g)
        preds = torch.where(torch.rand(16, n, generator=g) < torch.linspace(0.3, 0.95, 16).view(-1, 1),
                            labels.view(1, -1), torch.randint(0, 4, (16, n), generator=g))
        margins = torch.linspace(0.1, 3.0, 16).view(-1, 1).expand(16, n).clone()
        return SimpleNamespace(predictions=preds.to(torch.int16), margins=margins, labels=labels)

    val, test = result(300), result(300)
    a = validated_early_exit(val, test, ann_val_accuracy=95.0)
    shuffled = SimpleNamespace(predictions=test.predictions, margins=test.margins, labels=test.labels.flip(0))
    b = validated_early_exit(val, shuffled, ann_val_accuracy=95.0)
    assert [(r["patience"], r["margin"]) for r in a["rows"]] == [(r["patience"], r["margin"]) for r in b["rows"]]
    assert [r["val_accuracy"] for r in a["rows"]] == [r["val_accuracy"] for r in b["rows"]]
    assert (a["chosen"]["patience"], a["chosen"]["margin"]) == (b["chosen"]["patience"], b["chosen"]["margin"])
    assert a["chosen"]["val_accuracy"] >= 94.0 - 1e-9 and a["target"] == 94.0
    cheaper = [r for r in a["rows"] if r["val_mean_timesteps"] < a["chosen"]["val_mean_timesteps"]]
    assert all(r["val_accuracy"] < 94.0 for r in cheaper)  # the cheapest rule within 1 point on validation
    for r in a["rows"]:  # each rule's test numbers are that rule applied to the test split
        t = apply_early_exit(test.predictions, test.margins, test.labels, EarlyExit(r["patience"], r["margin"]))
        assert (r["accuracy"], r["mean_timesteps"]) == (t["accuracy"], t["mean_timesteps"])
