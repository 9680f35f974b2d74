"""SNN Calibration's advanced pipeline (Li et al., ICML 2021; yhhhli/SNN_Calibration models/calibration.py):
the quantiser and loss against the authors' formulas, a full-precision layer's fit against a float64 re-run of the
authors' optimisation loop, ±1 weights kept exactly, and convergence with the option on."""

import copy
import importlib

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.convert import Max, capture, convert
from bsnn.convert.config import ConvertConfig
from bsnn.errors import ConfigError
from bsnn.simulate import run_batch
from bsnn.snn.neuron import IFNeuron, Integrator

cal = importlib.import_module("bsnn.convert.snn_calibration")  # bsnn.convert (the function) shadows the package


def _net(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return binarize_(net).eval()


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=32)


def _authors_floor_ste(x):  # models/calibration.py floor_ste
    return (x.floor() - x).detach() + x


def test_quantiser_and_loss_match_the_authors_formulas():
    """``v0 = 0``: the authors' ``floor_ste(clamp(z/θ·T, 0, T))`` (value and gradient); the loss is their
    ``lp_loss(p=2, reduction='none')``."""
    torch.manual_seed(0)
    z = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2).requires_grad_(True)
    theta = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1)
    target = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    z_ref = z.detach().clone().requires_grad_(True)
    out = cal.quantised_count(z, theta, 8) * theta / 8
    ref = _authors_floor_ste(torch.clamp(z_ref / theta * 8, min=0, max=8)) * theta / 8
    torch.testing.assert_close(out, ref)
    loss, loss_ref = cal.layer_loss(out, target), (ref - target).abs().pow(2.0).sum(1).mean()
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    assert (z.grad[(z <= 0) | (z >= theta)] == 0).all() and (z.grad != 0).any()


def test_quantiser_is_the_if_neurons_spike_count_for_a_constant_input():
    """With bsnn's shift ``v0`` the quantiser is exact: an IF neuron (reset by subtraction, initial membrane
    v0·θ) fed the constant current z fires ``clamp(floor(T·z/θ + v0), 0, T)`` times in T steps."""
    torch.manual_seed(1)
    z = torch.randn(2000, dtype=torch.float64) * 1.5
    theta, v0 = 1.3, 0.5
    for T in (1, 3, 8, 17):
        v, count = torch.full_like(z, v0 * theta), torch.zeros_like(z)
        for _ in range(T):
            v = v + z
            s = (v >= theta).double()
            v, count = v - s * theta, count + s
        torch.testing.assert_close(cal.quantised_count(z, torch.tensor(theta, dtype=torch.float64), T, v0), count)


def _first_layer_setup(T: int = 4):
    net, x = _net(), torch.randn(40, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig(threshold=Max(), v_init=0.0, per_channel=False,
                                                 snn_calibration="none"))
    gm = capture(copy.deepcopy(net), x[:2])
    return net, x, snn, gm


def test_time_averaged_input_is_the_image_then_the_spike_rate():
    net, x, snn, gm = _first_layer_setup()
    syn = cal.synapse_of(snn)
    assert syn == {"if_2": "0", "if_6": "4", "if_9": "8"}
    torch.testing.assert_close(cal.time_averaged_input(snn, "0", x, 5), x)
    rate = cal.snn_layer_output(snn, "if_6", x, 5) / 5  # the linear layer reads the flattened IF layer's spikes
    torch.testing.assert_close(cal.time_averaged_input(snn, "8", x, 5), rate.flatten(1))


def test_full_precision_layer_fit_equals_the_authors_loop():
    """The first (full-precision) layer: Adam on the weight only, cosine learning rate to 0, random batches,
    floor-STE quantiser, squared error summed over channels — re-run here in float64 from the authors'
    ``weights_cali_layer`` (same draws) ends at the same weights."""
    net, x, snn, gm = _first_layer_setup()
    T, wcfg = 4, cal.WeightCalibration(iterations=25, lr=1e-2, batch_size=8, seed=3)
    target = cal.ann_activations(gm, x)["2"]
    conv = snn.graph_module.get_submodule("0")
    # the authors' parameters live in the ANN's domain: real weight = (λ/θ)·stored weight (BN gain per channel)
    lam = float(torch.as_tensor(snn.meta["thresholds"]["2"]))
    scale = (lam / snn.neurons()["if_2"].threshold.double()).view(-1)
    w = (conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).requires_grad_(True)
    b = conv.bias.detach().double() * scale
    opt = torch.optim.Adam([w], lr=wcfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=wcfg.iterations, eta_min=0.0)
    gen = torch.Generator().manual_seed(wcfg.seed)
    for _ in range(wcfg.iterations):
        idx = torch.randperm(len(x), generator=gen)[:wcfg.batch_size]
        opt.zero_grad()
        out = nn.functional.conv2d(x[idx].double(), w, b, padding=1)
        out = _authors_floor_ste(torch.clamp(out / lam * T, min=0, max=T)) * lam / T
        (out - target[idx].double()).abs().pow(2.0).sum(1).mean().backward()
        opt.step()
        sched.step()
    before, after = cal.calibrate_layer_(snn, "if_2", "0", False, x, target, T, wcfg)
    torch.testing.assert_close(conv.weight.detach(), (w.detach() / scale.view(-1, 1, 1, 1)).float(), rtol=1e-4,
                               atol=1e-5)
    assert after < before, (before, after)


def test_advanced_keeps_binary_weights_and_folds_gains_exactly():
    """Binary layers: weights still exactly ±1 after calibration, the fitted gain and bias live in θ and the bias,
    and the folded network reproduces the fitted loss; the full-precision first layer's weights changed. Without
    the θ/2 shift (the authors' floor quantiser) every layer's fit removes most of its error."""
    net, x = _net(), torch.randn(48, 1, 8, 8)
    base = ConvertConfig(threshold=Max(), v_init=0.0, snn_calibration_samples=48, snn_calibration_timesteps=4)
    ref = convert(net, _loader(x), base)
    cfg = ConvertConfig(threshold=Max(), v_init=0.0, snn_calibration_samples=48, snn_calibration_timesteps=4,
                        snn_calibration="advanced", snn_calibration_weight_iters=60, snn_calibration_weight_lr=1e-2)
    snn = convert(net, _loader(x), cfg)
    binary = {l["name"]: l["binary"] for l in snn.layers}
    assert binary == {"0": False, "4": True, "8": True, "10": False}
    for name, m in snn.synaptic_modules().items():
        if binary[name]:
            assert set(m.weight.unique().tolist()) == {-1.0, 1.0}, name
            torch.testing.assert_close(m.weight, ref.synaptic_modules()[name].weight)
    assert not torch.equal(snn.synaptic_modules()["0"].weight, ref.synaptic_modules()["0"].weight)
    assert not torch.equal(snn.neurons()["if_6"].threshold, ref.neurons()["if_6"].threshold)
    torch.testing.assert_close(snn.synaptic_modules()["10"].weight, ref.synaptic_modules()["10"].weight)
    losses = snn.meta["weight_calibration"]
    assert set(losses) == {"if_2", "if_6", "if_9"}
    assert all(v["loss_after"] < 0.75 * v["loss_before"] for v in losses.values()), losses
    # the folded layer (±1 weights, bias b/g, threshold θ/g) gives the loss the fit ended at
    fitted = convert(net, _loader(x), ConvertConfig(**{**cfg.__dict__, "snn_calibration": "none"}))
    gm = capture(copy.deepcopy(net), x[:2])
    for name, syn in (("if_6", "4"), ("if_9", "8")):  # inputs from the calibrated SNN, as during the fit
        for n in ("0", "4", "8"):
            fitted.synaptic_modules()[n].load_state_dict(snn.synaptic_modules()[n].state_dict())
        for n, neuron in fitted.neurons().items():
            neuron.threshold.copy_(snn.neurons()[n].threshold)
        x_avg = cal.time_averaged_input(fitted, syn, x, 4)
        m, neuron = fitted.synaptic_modules()[syn], fitted.neurons()[name]
        z = m(x_avg)
        lam = torch.as_tensor(fitted.meta["thresholds"][neuron.name])
        lam = lam.view(-1, *([1] * (z.dim() - 2))) if lam.numel() > 1 else lam
        out = lam * cal.quantised_count(z, neuron.threshold, 4, neuron.v_init_frac) / 4
        loss = cal.layer_loss(out, cal.ann_activations(gm, x)[neuron.name]).item()
        assert loss == pytest.approx(losses[name]["loss_after"], rel=2e-3), name


def test_advanced_with_no_steps_is_the_potential_correction():
    net, x = _net(), torch.randn(32, 1, 8, 8)
    kw = dict(threshold=Max(), snn_calibration_samples=32, snn_calibration_timesteps=4)
    a = convert(net, _loader(x), ConvertConfig(snn_calibration="potential", **kw))
    b = convert(net, _loader(x), ConvertConfig(snn_calibration="advanced", snn_calibration_weight_iters=0, **kw))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb)


class _RateLimit(fx.Interpreter):
    """The SNN's T -> ∞ limit: each IF layer's rate clamp(x/θ, 0, 1) for a constant input (one step)."""

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, IFNeuron):
            return torch.clamp(args[0] / m.threshold, 0, 1)
        if isinstance(m, Integrator):
            return args[0]
        return super().call_module(target, args, kwargs)


def test_advanced_snn_converges_to_its_calibrated_limit_close_to_the_ann():
    """Weight calibration changes the network for every T: the time-averaged output converges (as 1/T) to the
    calibrated network's limit, not to the ANN's logits. That limit stays near them (here 5-7 % relative error
    for learning rates 1e-3..3e-2; the potential correction alone ends at 1e-4): the test bounds the drift at 10 %."""
    net, x = _net(), torch.randn(48, 1, 8, 8)
    cfg = ConvertConfig(threshold=Max(), snn_calibration_samples=48, snn_calibration_timesteps=4,
                        snn_calibration="advanced", snn_calibration_weight_iters=60, snn_calibration_weight_lr=2e-2)
    snn = convert(net, _loader(x), cfg)
    with torch.no_grad():
        limit = _RateLimit(snn.graph_module).run(x)
        logits = net(x)
    mem = run_batch(snn, x, 2048, 256)
    err = {t: ((mem[t - 1] / t - limit).norm() / limit.norm()).item() for t in (4, 32, 2048)}
    assert err[2048] < err[32] / 10 and err[2048] < 4e-3, err
    to_ann = {t: ((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in (1, 2048)}
    assert to_ann[2048] < to_ann[1] / 3, to_ann
    drift = ((limit - logits).norm() / logits.norm()).item()
    assert drift < 0.1 and abs(to_ann[2048] - drift) < 4e-3, (to_ann, drift)


def test_advanced_config_errors():
    with pytest.raises(ConfigError, match="snn_calibration"):
        ConvertConfig(snn_calibration="advance").validate()
    with pytest.raises(ConfigError, match="snn_calibration_weight"):
        ConvertConfig(snn_calibration="advanced", snn_calibration_weight_batch=0).validate()
