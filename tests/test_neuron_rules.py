"""Burst and signed neurons (``convert.neuron``): the authors' firing rules, conversion, convergence, cost, refusals.

The oracles (:func:`bsnn.snn.functional.burst_multistep`, :func:`~bsnn.snn.functional.signed_multistep`) are checked
against numbers worked out by hand from the authors' update rules (Li & Zeng's ``SNode.forward``: ``spike =
clamp(floor(mem / θ), 0, Γ)``, ``mem -= spike``; Wang et al.'s ``SPIKE_PosNeg_layer.forward``: ``mem >= θ`` fires
+θ, ``mem <= −θ`` fires −θ only where ``transmitted > 0``, ``mem -= spike``, ``transmitted += spike``); the neuron
modules against the oracles, chunk by chunk.
"""

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from bsnn.config import ConvertConfig
from bsnn.convert import Max, capture, convert
from bsnn.convert.snn_calibration import ann_activations, snn_layer_output
from bsnn.errors import ConfigError, ConversionError
from bsnn.export import to_nir, to_spikingjelly
from bsnn.hardware.constraints import apply_constraints
from bsnn.hardware.config import resolve_hardware
from bsnn.hardware.config import ConstraintConfig
from bsnn.hardware.cost import estimate, latency_ns, sweep_timesteps
from bsnn.hardware.mapping import resolve_layers
from bsnn.modelfile import build_model, load_snn, save_snn
from bsnn.simulate import SimConfig, run_batch, simulate
from bsnn.snn.functional import burst_multistep, if_multistep, signed_multistep
from bsnn.snn.neuron import BurstNeuron, IFNeuron, SignedNeuron
from tests._snn_helpers import input_loader, small_binary_cnn


def _net(seed: int = 1) -> nn.Module:
    return small_binary_cnn(seed)


def _loader(x: torch.Tensor) -> DataLoader:
    return input_loader(x, 16)


def _cfg(**kw) -> ConvertConfig:
    return ConvertConfig(threshold=Max(), per_channel=False, snn_calibration="none", **kw)


# ------------------------------------------------------------------------------------------- oracles
def test_burst_oracle_matches_the_hand_worked_rule():
    # Γ = 2: v 0.6 -> no spike; 0.6 + 2.7 = 3.3 -> floor 3 clamped to 2, v 1.3; 1.3 + 0.2 = 1.5 -> 1, v 0.5
    s, v = burst_multistep(torch.tensor([[0.6], [2.7], [0.2]]), 1.0, 2)
    assert s.flatten().tolist() == [0.0, 2.0, 1.0]
    assert v.item() == pytest.approx(0.5)
    # a threshold of 0.5: 0.6 -> floor(1.2) = 1, v 0.1
    s, v = burst_multistep(torch.tensor([[0.6]]), 0.5, 3)
    assert s.item() == 1.0 and v.item() == pytest.approx(0.1)


def test_signed_oracle_matches_the_hand_worked_rule():
    # +1 at 1.2 (v 0.2, sent 1); -1.3 <= -1 with sent 1 -> -1 (v -0.3, sent 0); -1.3 with sent 0: no spike
    s, v, sent = signed_multistep(torch.tensor([[1.2], [-1.5], [-1.0], [0.3]]), 1.0)
    assert s.flatten().tolist() == [1.0, -1.0, 0.0, 0.0]
    assert v.item() == pytest.approx(-1.0) and sent.item() == 0.0


def test_burst_of_one_is_the_if_neuron():
    x = torch.randn(40, 8, 5) * 0.7
    s_b, v_b = burst_multistep(x, 1.0, 1, 0.5)
    s_i, v_i = if_multistep(x, 1.0, 0.5)
    assert torch.equal(s_b, s_i) and torch.equal(v_b, v_i)


def test_signed_net_count_never_negative_and_rate_converges():
    torch.manual_seed(0)
    a = torch.rand(200) * 1.4 - 0.4  # constant inputs, some negative, some above the threshold
    x = a.expand(4000, 200).clone() + 0.3 * torch.randn(4000, 200)  # noisy: early over-firing gets corrected
    s, _, sent = signed_multistep(x, 1.0)
    assert bool((s.cumsum(0) >= 0).all()) and torch.equal(sent, s.sum(0))
    assert (s.mean(0) - a.clamp(0, 1)).abs().max().item() < 0.02


@pytest.mark.parametrize("cls,kw", [(BurstNeuron, {"max_burst": 3}), (SignedNeuron, {})])
@pytest.mark.parametrize("time_chunk", [1, 4])
def test_neuron_modules_equal_their_oracles_across_chunks(cls, kw, time_chunk):
    torch.manual_seed(0)
    x = torch.randn(12, 4, 3, 2, 2) * 1.5  # [T, B, C, H, W]
    th = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    m = cls(th, v_init_frac=0.5, channel_shape=(3, 1, 1), **kw)
    m.kernel = "torch"
    outs = []
    for start in range(0, 12, time_chunk):
        m.time_chunk = time_chunk
        outs.append(m(x[start:start + time_chunk].flatten(0, 1)).unflatten(0, (time_chunk, 4)))
    got = torch.cat(outs)
    if cls is BurstNeuron:
        want, _ = burst_multistep(x / th, 1.0, 3, 0.5)
    else:
        want, _, _ = signed_multistep(x / th, 1.0, 0.5)
    assert torch.equal(got, want)
    # every spike is one event: a burst of k counts k, a -1 spike counts 1
    assert sum(m.spike_count) == pytest.approx(want.abs().sum().item())


# ---------------------------------------------------------------------------------------- conversion
def test_burst_thresholds_are_the_if_thresholds_over_gamma():
    net, x = _net(), torch.randn(32, 1, 8, 8)
    snn_if = convert(net, _loader(x), _cfg())
    snn_b = convert(net, _loader(x), _cfg(neuron="burst", max_burst=4))
    assert snn_b.meta["thresholds"] == snn_if.meta["thresholds"]  # the same balanced λ
    for i, (a, b) in enumerate(zip(snn_if.neurons().values(), snn_b.neurons().values())):
        assert type(a) is IFNeuron and type(b) is BurstNeuron and b.max_burst == 4
        # a burst spike stands for λ/Γ: the first layer (analog input) gets θ/Γ; later layers' inputs are
        # spikes worth 1/Γ as much too, so their stored-domain θ = (λ/Γ) / (s_in/Γ) is the IF one
        torch.testing.assert_close(b.threshold, a.threshold / 4 if i == 0 else a.threshold)
    assert snn_b.meta["convert"]["neuron"] == "burst"


@pytest.mark.parametrize("kw", [dict(neuron="burst", max_burst=3), dict(neuron="signed")])
def test_saved_networks_keep_their_firing_rule(tmp_path, kw):
    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4, "hidden": 16},
            "binary": {}, "activation": {"kind": "relu"}}
    torch.manual_seed(0)
    ann, x = build_model(arch).eval(), torch.rand(32, 1, 8, 8)
    snn = convert(ann, _loader(x), _cfg(**kw))
    save_snn(tmp_path / "snn.pt", snn, arch)
    loaded, _ = load_snn(tmp_path / "snn.pt")
    assert [type(m) for m in loaded.neurons().values()] == [type(m) for m in snn.neurons().values()]
    assert [getattr(m, "max_burst", None) for m in loaded.neurons().values()] == \
        [getattr(m, "max_burst", None) for m in snn.neurons().values()]
    torch.testing.assert_close(run_batch(loaded, x[:8], 16, 4), run_batch(snn, x[:8], 16, 4))


@pytest.mark.parametrize("kw", [dict(neuron="burst", max_burst=2), dict(neuron="burst", max_burst=4),
                                dict(neuron="signed"), dict(neuron="signed", v_init=0.5)])
def test_time_averaged_output_converges_to_the_ann(kw):
    net, x = _net(), torch.randn(48, 1, 8, 8)
    snn = convert(net, _loader(x), _cfg(**kw))
    logits = net(x).detach()
    mem = run_batch(snn, x, 2048, 256)
    err = {t: ((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in (4, 32, 2048)}
    assert err[2048] < 0.01 and err[2048] < err[32] < err[4], err


def test_bursts_cut_the_early_error():
    net, x = _net(), torch.randn(64, 1, 8, 8)
    logits = net(x).detach()
    errs = {}
    for g in (1, 2, 4):
        snn = convert(net, _loader(x), _cfg(neuron="burst", max_burst=g, v_init=0.5))
        mem = run_batch(snn, x, 8, 8)
        errs[g] = ((mem[7] / 8 - logits).norm() / logits.norm()).item()
    assert errs[4] < errs[2] < errs[1], errs


def test_options_are_checked():
    with pytest.raises(ConfigError, match="convert.neuron"):
        _cfg(neuron="lif").validate()
    with pytest.raises(ConfigError, match="max_burst"):
        _cfg(neuron="burst", max_burst=0).validate()
    with pytest.raises(ConfigError, match="offset_correction"):
        _cfg(neuron="signed", offset_correction="cos").validate()


# ------------------------------------------------------------------------------------ simulation, cost
@pytest.mark.parametrize("kw", [dict(neuron="burst", max_burst=3), dict(neuron="signed")])
def test_synapse_modes_stay_bit_identical(kw):
    net, x = _net(), torch.rand(32, 1, 8, 8)
    snn = convert(net, _loader(x), _cfg(**kw))
    ref = simulate(snn, _loader(x), [1, 4, 16], SimConfig(synapse="float", record_predictions=True), quiet=True)
    for mode in ("bf16", "int"):
        got = simulate(snn, _loader(x), [1, 4, 16], SimConfig(synapse=mode, record_predictions=True), quiet=True)
        assert got.accuracy == ref.accuracy and got.spike_counts == ref.spike_counts
        assert torch.equal(got.predictions, ref.predictions)


def _specs(snn):
    return {s.name: s for s in resolve_layers(snn)}


@pytest.mark.parametrize("kw,passes", [(dict(), 1), (dict(neuron="burst", max_burst=3), 2),
                                       (dict(neuron="burst", max_burst=4), 3), (dict(neuron="signed"), 2)])
def test_cost_charges_every_crossbar_pass(kw, passes):
    net, x = _net(), torch.rand(32, 1, 8, 8)
    base = convert(net, _loader(x), _cfg())
    snn = convert(net, _loader(x), _cfg(**kw))
    specs = _specs(snn)
    assert [s.input_passes for s in specs.values() if not s.analog_input] == [passes] * 3  # conv2, fc1, fc2
    rep, ref = estimate(snn, None, timesteps=8), estimate(base, None, timesteps=8)
    for a, b in zip(rep.layers, ref.layers):
        spiking = not specs[a.name].analog_input
        assert a.energy_pj == pytest.approx(b.energy_pj * (passes if spiking else 1))
        assert a.latency_ns == pytest.approx(b.latency_ns * (passes if spiking else 1))


def test_event_driven_cost_of_bursts_splits_the_events_over_the_passes():
    net, x = _net(), torch.rand(32, 1, 8, 8)
    snn = convert(net, _loader(x), _cfg(neuron="burst", max_burst=3))
    name = [s.name for s in resolve_layers(snn) if not s.analog_input][0]
    dense = estimate(snn, None, timesteps=4)
    rates = {s.name: [1.6] * 4 for s in resolve_layers(snn) if not s.analog_input}  # 1.6 events per neuron-step
    ev = estimate(snn, rates, timesteps=4, mode="event_driven")
    d, e = ({l.name: l for l in r.layers}[name] for r in (dense, ev))
    # row-driven parts scale with r / passes = 0.8 per pass
    assert e.breakdown_pj["xbar"] == pytest.approx(0.8 * d.breakdown_pj["xbar"])
    assert e.energy_pj < d.energy_pj


@pytest.mark.parametrize("method", ["cos", "srp"])
def test_offset_pre_steps_are_charged_in_energy_and_latency(method):
    net, x = _net(), torch.rand(32, 1, 8, 8)
    plain = convert(net, _loader(x), _cfg(v_init=0.5))
    snn = convert(net, _loader(x), _cfg(v_init=0.5, offset_correction=method, offset_pre_steps=3))
    T = 8
    a, b = estimate(snn, None, timesteps=T), estimate(plain, None, timesteps=T)
    for la, lb in zip(a.layers, b.layers):
        assert la.energy_pj == pytest.approx(lb.energy_pj * (T + 3) / T)
    lat_steps = T + (3 * len(snn.neuron_names) if method == "cos" else 3)
    hw = resolve_hardware(a.hardware)
    assert a.total.latency_ns == pytest.approx(latency_ns(resolve_layers(snn), hw, lat_steps)[0])
    assert any("pre-steps" in n for n in a.notes)
    # event-driven: the pre-steps at the rates of the first real steps
    res = simulate(snn, _loader(x), [T], quiet=True)
    ev = estimate(snn, res, timesteps=T)
    ev_plain_rates = estimate(plain, res, timesteps=T)  # same layers, same rates, no pre-steps
    for la, lb in zip(ev.layers, ev_plain_rates.layers):
        if la.input_rate is None:
            continue
        assert la.energy_pj > lb.energy_pj
    # the cost-vs-T sweeps charge them too
    (row,) = sweep_timesteps(snn, None, "spikesim-rram-65nm", [T], "dense")
    assert row["energy_pj"] == pytest.approx(a.total.energy_pj) and row["latency_ns"] == pytest.approx(
        a.total.latency_ns)


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw", [dict(neuron="burst"), dict(neuron="signed"), dict(offset_correction="cos"),
                                dict(offset_correction="srp")])
def test_exporters_refuse_what_an_if_graph_cannot_carry(kw):
    net, x = _net(), torch.rand(32, 1, 8, 8)
    snn = convert(net, _loader(x), _cfg(v_init=0.5, **kw))
    with pytest.raises(ConversionError, match="convert.neuron|offset_correction"):
        to_nir(snn)
    with pytest.raises(ConversionError, match="convert.neuron|offset_correction"):
        to_spikingjelly(snn)


@pytest.mark.parametrize("field", ["adc_bits", "membrane_bits"])
def test_hardware_constraints_refuse_burst_networks(field):
    net, x = _net(), torch.rand(32, 1, 8, 8)
    snn = convert(net, _loader(x), _cfg(neuron="burst"))
    with pytest.raises(ConfigError, match="convert.neuron"):
        with apply_constraints(snn, ConstraintConfig(**{field: 16})):
            pass


@pytest.mark.parametrize("mode", ["potential", "bias", "advanced"])
@pytest.mark.parametrize("kw", [dict(neuron="burst", max_burst=3), dict(neuron="signed")])
def test_snn_calibration_corrects_burst_and_signed_networks(mode, kw):
    # the correction is computed in units of one spike's value (λ/Γ for bursts): it must lower the error at the
    # calibrated T, and the network must still converge
    net, x = _net(), torch.randn(64, 1, 8, 8)
    base = _cfg(v_init=0.5, **kw)
    extra = dict(snn_calibration_weight_iters=20, snn_calibration_weight_batch=16) if mode == "advanced" else {}
    plain = convert(net, _loader(x), base)
    cal = convert(net, _loader(x), dataclasses.replace(base, snn_calibration=mode, snn_calibration_timesteps=4,
                                                       snn_calibration_samples=64, **extra))
    logits = net(x).detach()

    def err(snn, t):
        return ((run_batch(snn, x, t, t)[-1] / t - logits).norm() / logits.norm()).item()

    def first_layer_bias(snn, t=4):  # |per-channel mean of (ANN activation - λ·count/T)| of the first IF layer
        name = snn.neuron_names[0]
        neuron = snn.neurons()[name]
        lam = torch.as_tensor(snn.meta["thresholds"][neuron.name]).float() / neuron.levels
        out = lam * snn_layer_output(snn, name, x, t) / t
        return (ann_activations(capture(net, x[:1]), x)[neuron.name] - out).mean(dim=(0, 2, 3)).abs().mean().item()

    assert first_layer_bias(cal) < 0.5 * first_layer_bias(plain)
    if kw["neuron"] == "burst":
        assert err(cal, 4) < err(plain, 4)
    if mode != "advanced":  # advanced moves the limit to the calibrated synapses (see bsnn.convert.snn_calibration)
        assert err(cal, 1024) < 0.02


def test_bsnn_run_with_burst_neurons_charges_the_passes(tmp_path):
    """``bsnn run convert.neuron=burst``: the saved network keeps its burst layers and the run's cost report
    charges the bit-serial passes (Γ = 3: two per step; its notes say so)."""
    import json

    from bsnn.cli import main

    out = tmp_path / "run"
    args = ["data.name=digits", "data.limit_train=256", "data.limit_test=64", "train.epochs=1", "student.epochs=1",
            "convert.neuron=burst", "convert.max_burst=3", "convert.calib_samples=64",
            "convert.snn_calibration_samples=32", "simulate.timesteps=[1,4,8]", "--quiet"]
    assert main(["run", "--out", str(out), *args]) == 0
    snn, _ = load_snn(out / "snn.pt")
    assert {type(m) for m in snn.neurons().values()} == {BurstNeuron}
    cost = json.loads((out / "cost.json").read_text())
    text = json.dumps(cost)
    assert "2 passes per timestep" in text
