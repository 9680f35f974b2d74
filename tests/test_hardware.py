"""Tests of bsnn.hardware: presets, mapping, SpikeSim-exact dense costs, event-driven costs, constraints, CLI."""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import bsnn.hardware as H
from bsnn.binary import binarize_
from bsnn.config import ConvertConfig
from bsnn.convert import Max, capture, convert
from bsnn.convert.snn_calibration import calibrate_snn_
from bsnn.errors import ConfigError
from bsnn.hardware.cli import add_cost_parser
from bsnn.hardware.constraints import (ConstraintConfig, adc_quantize, constrained, constraint_plan, exact_adc_bits,
                                       fixed_point, row_partition, simulate_with_constraints)
from bsnn.hardware.cost import digital_energy_pj, layer_energy_pj
from bsnn.hardware.mapping import LayerSpec
from bsnn.simulate import run_batch, simulate

ROOT = Path(__file__).resolve().parents[1]
VGG9 = ROOT / "configs" / "hardware" / "vgg9_cifar10_layers.csv"

# SpikeSim's RRAM constants (ela_spikesim.py), typed in again here so the test does not read them from bsnn.
E_XBAR, E_ADC, E_MUX, E_HTREE, E_FETCH, E_NEURON = 1.76423, 2.03084, 0.094245, 19.64 * 8, 4.64, 1.274 * 4.0
E_SUB, E_TEMP, E_TILE = 1.15e-6, 0.2, 397.0
A_XBAR, A_ADC, A_MUX, A_SUB, A_TEMP, A_TILE, A_HTREE, A_BIT = (26.2144, 693.633, 45.9, 13411.41498, 484.643999,
                                                               0.7391 * 64 * 128, 216830 * 2, 0.7391)


def spikesim_literal(in_ch, out_ch, in_dim, out_dim, k=3, X=64, ppt=8, T=5, clk=250.0):
    """SpikeSim's compute_energy / compute_area / latency_gen, written out as in its source."""
    pe_ar = k * k * E_XBAR + (X / 8) * (E_ADC + E_MUX)
    pe_cycle = E_HTREE + E_FETCH + E_NEURON + X / 8 * pe_ar + (X / 8) * 16 * E_SUB + (X / 8) * E_TEMP + E_TILE
    energy = sum(math.ceil(o / X) * math.ceil(i / X) * d * d * pe_cycle * T for i, o, d in zip(in_ch, out_ch, out_dim))
    n_pe = sum(math.ceil(i / X) * math.ceil(o / X) for i, o in zip(in_ch, out_ch))
    tiles = math.ceil(n_pe / ppt)
    tile = (X / 8) * A_SUB + A_TEMP + A_TILE + ppt * (k * k * A_XBAR + (X / 8) * (A_ADC + A_MUX)) + A_HTREE
    area = tile * tiles + sum(i * d * d for i, d in zip(in_ch, in_dim)) * A_BIT * 22 + \
        sum(o * d * d for o, d in zip(out_ch[:5], out_dim[:5])) * A_BIT * 22
    cp = [int(0.75 * d * d * o) * T for o, d in zip(out_ch, out_dim)]
    latency = (sum(cp[:-1]) + out_dim[-1] ** 2 * out_ch[-1] * T) * 26 * (1000 / clk)
    return energy, latency, area, n_pe, tiles


VGG9_LISTS = ([3, 64, 64, 128, 128, 256, 256], [64, 64, 128, 128, 256, 256, 256], [32, 32, 16, 16, 8, 8, 8],
              [32, 16, 16, 8, 8, 8, 4])


def _net(seed=0, n=16, side=8):
    """conv(FP) -> avgpool -> IF -> 1x1 binary conv -> IF -> flatten -> binary linear -> IF -> linear(FP)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.ReLU(),
                        nn.Conv2d(8, 16, 1, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False),
                        nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * (side // 4) ** 2, 16, bias=False),
                        nn.ReLU(), nn.Linear(16, 3))
    binarize_(net).eval()
    x = torch.randn(n, 1, side, side)
    with torch.no_grad():
        y = net(x).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    return net, convert(net, loader, ConvertConfig(threshold=Max())), loader


# --------------------------------------------------------------------------------------------- config
def test_presets_validate_and_yaml_files_load_equal():
    assert {"spikesim-rram-65nm", "xnor-sram-65nm", "isaac-rram-32nm", "digital-45nm"} <= set(H.list_presets())
    for name in H.list_presets():
        assert H.load_hardware_config(ROOT / "configs" / "hardware" / f"{name}.yaml") == H.preset(name)
    hw = H.load_hardware_config(ROOT / "configs" / "hardware" / "example-spikesim-128x128.yaml", ["energy.adc_pj=1"])
    assert (hw.xbar_rows, hw.pe_per_tile, hw.adc_bits, hw.energy.adc_pj) == (128, 4, 5, 1.0)
    assert hw.adc_energy_pj == 2.0  # Walden scaling 2^(5-4)
    s = H.preset("spikesim-rram-65nm")
    assert (s.pe_per_tile, s.clock_mhz, s.adc_bits, s.cols_per_adc, s.pe_cycle_ns) == (8, 250.0, 4, 8, 104.0)
    with pytest.raises(ConfigError, match="valid names"):
        H.preset("nope")
    with pytest.raises(ConfigError, match="valid keys"):
        H.preset("spikesim-rram-65nm", ["energy.bogus_pj=1"])
    with pytest.raises(ConfigError, match="mapping"):
        H.preset("spikesim-rram-65nm", ["mapping=diagonal"])


# -------------------------------------------------------------------------------------------- mapping
def test_mapping_by_hand():
    conv = LayerSpec("c", 100, 70, (3, 3), (8, 8), (8, 8))
    hw = H.preset("spikesim-rram-65nm")
    m = H.map_layer(conv, hw)  # ceil(100/64)=2 row groups, ceil(70/64)=2 column groups, 9 crossbars per PE
    assert (m.row_groups, m.col_groups, m.pes, m.crossbars) == (2, 2, 4, 36)
    assert m.utilisation == pytest.approx(100 * 9 * 70 / (36 * 64 * 64))
    assert m.rows_per_conversion == 9 * 64 and m.adc_bits_exact == 10 + 1
    u = H.map_layer(conv, hw.replace(mapping="unrolled"))  # rows 900 -> 15 groups of 64
    assert (u.row_groups, u.pes, u.crossbars, u.rows_per_conversion, u.adc_bits_exact) == (15, 30, 30, 64, 8)
    p = H.map_layer(conv, hw.replace(mapping="unrolled", sign_handling="paired"))  # 140 columns -> 3 groups
    assert (p.cols_per_output, p.col_groups, p.pes, p.adc_bits_exact) == (2, 3, 45, 7)
    pc = H.map_layer(conv, hw.replace(mapping="unrolled", sign_handling="popcount"))
    assert (pc.pes, pc.adc_bits_exact) == (30, 7)
    # popcount correction: popcount of 900 rows (900/8 int8 adds) + 70 outputs x 15 partial sums subtractions
    e = layer_energy_pj(conv, pc, hw.replace(mapping="unrolled", sign_handling="popcount"), T=1)
    assert e["sign_correction"] == pytest.approx(64 * (900 / 8 + 70 * 15) * 0.03)


def test_layer_table_csv(tmp_path):
    specs = H.load_layer_table(VGG9)
    assert [s.in_channels for s in specs] == VGG9_LISTS[0] and [s.out_size[0] for s in specs] == VGG9_LISTS[3]
    assert specs[0].analog_input and not specs[1].analog_input
    bad = tmp_path / "bad.csv"
    bad.write_text("name,in_channels,out_channels,in_size,kernel\nc,3,4,8,3\n")
    with pytest.raises(ConfigError, match="out_size"):
        H.load_layer_table(bad)


# ----------------------------------------------------------------------------------------- dense cost
def test_one_layer_by_hand():
    spec = LayerSpec("conv", 64, 64, (3, 3), (16, 16), (16, 16))
    r = H.estimate([spec], None, "spikesim-rram-65nm", timesteps=3)
    pe_cycle = (E_HTREE + E_FETCH + E_NEURON + 8 * (9 * E_XBAR + 8 * (E_ADC + E_MUX)) + 8 * 16 * E_SUB + 8 * E_TEMP
                + E_TILE)
    assert r.mode == "dense"
    assert r.total.energy_pj == pytest.approx(1 * 256 * 3 * pe_cycle, rel=1e-12)
    assert r.total.latency_ns == pytest.approx(16 * 16 * 64 * 3 * 104.0, rel=1e-12)  # one layer: no overlap
    tile = 8 * A_SUB + A_TEMP + A_TILE + 8 * (9 * A_XBAR + 8 * (A_ADC + A_MUX)) + A_HTREE
    assert r.total.area_um2 == pytest.approx(tile + 2 * 64 * 256 * A_BIT * 22, rel=1e-12)
    assert r.total.edp_pj_ns == pytest.approx(r.total.energy_pj * r.total.latency_ns)
    assert r.total.tops_per_w == pytest.approx(2 * 256 * 64 * 64 * 9 / r.total.energy_pj)
    assert r.total.breakdown_pj["adc"] == pytest.approx(256 * 3 * 64 * E_ADC)
    assert sum(r.total.breakdown_pj.values()) == pytest.approx(r.total.energy_pj)


@pytest.mark.parametrize("X,ppt", [(64, 8), (128, 4)])
def test_spikesim_vgg9_reproduced_exactly(X, ppt):
    e, lat, area, n_pe, tiles = spikesim_literal(*VGG9_LISTS, X=X, ppt=ppt)
    hw = H.preset("spikesim-rram-65nm", [f"xbar_rows={X}", f"xbar_cols={X}", f"pe_per_tile={ppt}"])
    r = H.estimate(VGG9, None, hw, timesteps=5, mode="dense")
    assert (r.total.pes, r.total.tiles) == (n_pe, tiles)
    assert r.total.energy_pj == pytest.approx(e, rel=1e-12)
    assert r.total.latency_ns == pytest.approx(lat, rel=1e-12)
    assert r.total.area_um2 == pytest.approx(area, rel=1e-12)
    if X == 64:  # the reference setup's numbers (REFERENCE §5): 48 PEs, 6 tiles
        assert (n_pe, tiles) == (48, 6)
        assert r.total.energy_pj == pytest.approx(15_906_934.03, abs=0.01)
        assert r.total.latency_ns == pytest.approx(62_832_640.0)
        assert r.total.area_um2 == pytest.approx(8_425_528.76, abs=0.01)


def test_dense_linear_in_T_and_edp_quadratic():
    for name in ("spikesim-rram-65nm", "xnor-sram-65nm", "isaac-rram-32nm"):
        r1 = H.estimate(VGG9, None, name, timesteps=1)
        for T in (2, 5, 16):
            rT = H.estimate(VGG9, None, name, timesteps=T)
            assert rT.total.energy_pj == pytest.approx(T * r1.total.energy_pj, rel=1e-12)
            assert rT.total.latency_ns == pytest.approx(T * r1.total.latency_ns, rel=1e-12)
            assert rT.total.edp_pj_ns == pytest.approx(T * T * r1.total.edp_pj_ns, rel=1e-12)
            assert rT.total.area_um2 == r1.total.area_um2


# ---------------------------------------------------------------------------------- event-driven cost
def test_event_driven_monotone_and_dense_at_rate_one():
    specs = H.load_layer_table(VGG9)
    T = 5
    for name in ("spikesim-rram-65nm", "xnor-sram-65nm", "isaac-rram-32nm", "digital-45nm"):
        dense = H.estimate(specs, None, name, timesteps=T, mode="dense").total.energy_pj
        energies = [H.estimate(specs, H.Activity.uniform(specs, r, T), name, timesteps=T,
                               mode="event_driven").total.energy_pj for r in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)]
        assert all(a < b for a, b in zip(energies, energies[1:])), (name, energies)
        assert energies[-1] == pytest.approx(dense, rel=1e-12)
    # per-timestep rates are used step by step: a burst costs what its steps cost
    burst = H.estimate(specs, H.Activity.uniform(specs, [1, 0, 0, 0, 0], T), "isaac-rram-32nm", timesteps=T)
    one = H.estimate(specs, H.Activity.uniform(specs, 1.0, 1), "isaac-rram-32nm", timesteps=1)
    zero = H.estimate(specs, H.Activity.uniform(specs, 0.0, 4), "isaac-rram-32nm", timesteps=4)
    assert burst.total.energy_pj == pytest.approx(one.total.energy_pj + zero.total.energy_pj, rel=1e-12)


def test_firing_rate_applied_once():
    spec = LayerSpec("c", 64, 64, (3, 3), (16, 16), (16, 16))
    hw = H.preset("spikesim-rram-65nm")
    m = H.map_layer(spec, hw)
    r, T = 0.1, 4
    dense = layer_energy_pj(spec, m, hw, T)
    ev = layer_energy_pj(spec, m, hw, T, [r] * T)
    assert ev["xbar"] == pytest.approx(r * dense["xbar"], rel=1e-12)  # not r²·dense (double counting)
    assert ev["xbar"] != pytest.approx(r * r * dense["xbar"])
    p = 1 - (1 - r) ** (64 * 9)
    assert ev["adc"] == pytest.approx(p * dense["adc"], rel=1e-12)
    # digital baseline: E_SNN = ops·rate·T·E_AC, so E_ANN / E_SNN = E_MAC / (rate·T·E_AC) = 4.6 / (0.1·4·0.9)
    d = H.preset("digital-45nm")
    snn = sum(digital_energy_pj(spec, T, d, [r] * T).values())
    ann = sum(digital_energy_pj(spec, T, d, ann=True).values())
    assert snn == pytest.approx(spec.macs * r * T * 0.9)
    assert ann / snn == pytest.approx(4.6 / (r * T * 0.9))
    assert ann / snn != pytest.approx(4.6 / (r * r * T * 0.9))


def test_network_path_and_measured_activity():
    net, snn, loader = _net()
    res = simulate(snn, loader, [2, 6], quiet=True)
    specs = H.layer_specs_from_network(snn)
    assert [s.kind for s in specs] == ["conv", "conv", "conv", "linear", "linear"]
    assert specs[0].analog_input and not specs[0].binary and specs[1].binary
    assert specs[1].input_neurons == [snn.neuron_names[0]] and specs[0].neuron_size == (4, 4)
    assert specs[2].out_size == (4, 4) and specs[2].neuron_size == (2, 2)
    rep = H.estimate(snn, res, "spikesim-rram-65nm")  # T and mode from the simulation
    assert rep.mode == "event_driven" and rep.timesteps == 6
    rates = res.firing_rates(6)
    assert rep.layers[1].input_rate == pytest.approx(rates[snn.neuron_names[0]])
    assert rep.layers[0].input_rate is None  # analog input: dense
    assert rep.total.energy_pj < rep.comparisons["snn_dense_imc"]["energy_pj"]
    assert set(rep.comparisons) == {"snn_dense_imc", "ann_bit_serial_imc", "digital_snn", "digital_ann"}
    with pytest.raises(ConfigError, match="covers 6 timesteps"):
        H.estimate(snn, res, "spikesim-rram-65nm", timesteps=7)
    with pytest.raises(ConfigError, match="needs measured activity"):
        H.estimate(snn, None, "spikesim-rram-65nm", timesteps=4, mode="event_driven")


def test_peer_spikingjelly_spikesim_energy():
    """spikingjelly 2.0's SpikeSim estimator on the same converted network. Conventions: it counts Conv2d only
    (no Linear), sums over the batch and all T folded into it (bsnn: per sample), and in event mode counts
    in-map active rows and spatially active patches (bsnn: rates, independent rows)."""
    sj = pytest.importorskip("spikingjelly.activation_based.op_counter.spikesim")
    _, snn, loader = _net()
    x = next(iter(loader))[0]
    B, T = x.shape[0], 4
    hw = H.preset("spikesim-rram-65nm")
    convs = [l["name"] for l in snn.layers if l["type"] == "Conv2d"]
    reports = {}
    for mode in ("dense", "event"):
        snn.reset()
        snn.set_time_chunk(T)
        reports[mode] = sj.estimate_spikesim_energy(snn, x.repeat(T, 1, 1, 1),
                                                    config=sj.SpikeSimEnergyConfig(activity_mode=mode))
        counts = {n: list(m.spike_count) for n, m in snn.neurons().items()}
        neurons = {n: m.neurons_per_sample for n, m in snn.neurons().items()}
    snn.reset()
    act = {"spike_counts": counts, "neurons": neurons, "samples": B, "timesteps": [T]}
    dense = H.estimate(snn, act, hw, timesteps=T, mode="dense")
    event = H.estimate(snn, act, hw, timesteps=T, mode="event_driven")
    by_name = {k.rsplit(".", 1)[-1]: v for k, v in reports["dense"].energy_by_stage.items()}
    assert sorted(by_name) == sorted(convs)
    for l in dense.layers:
        if l.name in convs:
            assert by_name[l.name] / B == pytest.approx(l.energy_pj, rel=1e-12)
    # event mode: the 1x1 conv (every input row covered once, no padding) has identical crossbar energy
    ev = {k.rsplit(".", 1)[-1]: v for k, v in reports["event"].energy_by_component["by_stage"].items()}
    one = next(l for l in event.layers if l.name == convs[1])
    assert ev[convs[1]]["xbar_pj"] / B == pytest.approx(one.breakdown_pj["xbar"], rel=1e-9)
    total_conv = sum(l.energy_pj for l in event.layers if l.name in convs)
    # totals differ by the activity model (its exact spatial gating and in-map rows vs rates): within 10 % here
    assert reports["event"].energy_total_pj / B == pytest.approx(total_conv, rel=0.1)


# ----------------------------------------------------------------------------------------- constraints
def test_constraint_math_by_hand():
    assert exact_adc_bits(64) == 8 and exact_adc_bits(576) == 11 and exact_adc_bits(16, unit=0.25) == 8
    p = torch.tensor([-64.0, -5.0, 0.0, 3.0, 64.0])
    assert torch.equal(adc_quantize(p, 8, 64), p)  # LSB 1, ±127 levels
    assert torch.equal(adc_quantize(p, 4, 64), torch.tensor([-64.0, 64 / 7 * -1, 0.0, 0.0, 64.0]))  # LSB 64/7
    assert torch.equal(fixed_point(torch.tensor([0.3, -9.0, 7.9]).double(), 4, 1),
                       torch.tensor([0.5, -4.0, 3.5]).double())
    assert row_partition(3, 4, 2, "spikesim") == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]]
    assert row_partition(3, 4, 5, "unrolled") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    with pytest.raises(ConfigError, match="membrane_bits"):
        ConstraintConfig(membrane_bits=4, membrane_frac_bits=4).validate()


def _dyadic(snn):
    """Make every value of the ideal simulation exactly representable: thresholds powers of two, first-layer
    weights on a 1/16 grid, zero biases in the binary layers (so ideal fp32 arithmetic is exact), calibrated
    bias currents and initial potentials (units of θ) on a 1/64 grid."""
    with torch.no_grad():
        for m in snn.neurons().values():
            m.threshold.copy_(2.0 ** torch.round(torch.log2(m.threshold)))
            m.i_bias.copy_(torch.round(m.i_bias * 64) / 64)
            m.v_init_bias.copy_(torch.round(m.v_init_bias * 64) / 64)
        first = snn.synaptic_modules()[snn.layers[0]["name"]]
        first.weight.copy_(torch.round(first.weight * 16) / 16)
        first.bias.zero_()
    return snn


def _calibrated(net, snn, loader):
    """``snn`` after both post-conversion corrections (bias currents, then initial potentials), so that
    constraints are tested on a network with non-zero ``i_bias`` and ``v_init_bias``."""
    x = next(iter(loader))[0]
    gm = capture(net, x)
    calibrate_snn_(snn, gm, x, 4, "bias")
    calibrate_snn_(snn, gm, x, 4, "potential")
    return snn


@pytest.mark.parametrize("mapping", ["spikesim", "unrolled"])
def test_constraints_exact_at_high_precision_and_differ_at_low(mapping):
    net, snn, loader = _net(seed=1)
    snn = _dyadic(_calibrated(net, snn, loader))
    neurons = list(snn.neurons().values())
    assert all(bool(m.i_bias.any()) and bool(m.v_init_bias.any()) for m in neurons)  # a calibrated network
    x = torch.round(next(iter(loader))[0] * 16) / 16
    loader = DataLoader(TensorDataset(x, net(x).argmax(1).detach()), batch_size=8)
    rows = 8
    bits = exact_adc_bits(rows * 9 if mapping == "spikesim" else rows)
    hi = ConstraintConfig(xbar_rows=rows, mapping=mapping, adc_bits=bits, membrane_bits=40, membrane_frac_bits=24)
    plan = constraint_plan(snn, hi)
    assert plan[snn.layers[0]["name"]].startswith("ideal") and plan[snn.layers[1]["name"]] == "crossbar+adc"
    assert plan[snn.layers[-1]["name"]].startswith("ideal") and plan[snn.neuron_names[0]] == "fixed-point"
    ideal, got, table = simulate_with_constraints(snn, loader, [3, 8], hi, quiet=True)
    assert got.spike_counts == ideal.spike_counts and got.accuracy == ideal.accuracy
    assert table == [[3, ideal.accuracy[3], ideal.accuracy[3], 0.0], [8, ideal.accuracy[8], ideal.accuracy[8], 0.0]]
    hi_snn = constrained(snn, hi)
    torch.testing.assert_close(run_batch(hi_snn, x, 8, 3), run_batch(snn, x, 8, 3), rtol=0, atol=1e-5)
    float_membrane = constrained(snn, dataclasses.replace(hi, membrane_bits=None))  # ideal neurons, copied
    assert torch.equal(run_batch(float_membrane, x, 8, 3), run_batch(snn, x, 8, 3))
    assert type(snn.neurons()[snn.neuron_names[0]]).__name__ == "IFNeuron"  # restored
    lo = constrained(snn, ConstraintConfig(xbar_rows=rows, mapping=mapping, adc_bits=2, membrane_bits=6,
                                           membrane_frac_bits=1))
    low = simulate(lo, loader, [3, 8], quiet=True)
    assert low.spike_counts != ideal.spike_counts
    assert simulate(snn, loader, [3, 8], quiet=True).spike_counts == ideal.spike_counts  # original untouched


@pytest.mark.parametrize("pool, unit", [(nn.AvgPool2d(2, divisor_override=3), 1 / 3), (nn.AvgPool2d(2), 1 / 4),
                                        (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), 1 / 36)])
def test_crossbar_adc_step_is_the_pooled_input_quantum(pool, unit):
    """A fine enough ADC reproduces the partial sums of pooled spikes whatever the pooling divisors (its LSB is
    the input quantum: 1/k², or 1/lcm of the divisors PyTorch uses)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(8, 8, 3, padding=1, bias=False),
                        nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 1, 7, 7))
    binarize_(net).eval()
    x = torch.randn(16, 1, 7, 7)
    snn = convert(net, DataLoader(TensorDataset(x, torch.zeros(16).long()), batch_size=16),
                  ConvertConfig(threshold=Max()))
    hw = constrained(snn, ConstraintConfig(xbar_rows=64, adc_bits=16))  # LSB = max(unit, full scale / 32767)
    xbar = hw.graph_module.get_submodule(snn.layers[1]["name"])
    assert type(xbar).__name__ == "CrossbarSynapse" and xbar.unit == pytest.approx(unit)
    torch.testing.assert_close(run_batch(hw, x, 6, 3), run_batch(snn, x, 6, 3), rtol=0, atol=1e-4)


def test_constraints_from_hardware():
    c = ConstraintConfig.from_hardware(H.preset("isaac-rram-32nm"), membrane_bits=16)
    assert (c.xbar_rows, c.mapping, c.adc_bits, c.membrane_bits) == (128, "unrolled", 9, 16)


# ------------------------------------------------------------------------------------------------ CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="bsnn")
    add_cost_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cost", *argv])
    return args.fn(args)


def test_cli_cost_layers(tmp_path, capsys):
    out = tmp_path / "c"
    assert _cli(["--preset", "spikesim-rram-65nm", "--layers", str(VGG9), "--xbar", "64", "--timesteps", "5",
                 "--mode", "dense", "--out", str(out), "energy.tile_buff_pj=397"]) == 0
    d = json.loads((out / "cost.json").read_text())
    assert {"energy_pj", "latency_ns", "area_um2"} <= set(d["total"]) and len(d["layers"]) == 7
    assert d["total"]["energy_pj"] == pytest.approx(15_906_934.03, abs=0.01) and "breakdown_pj" in d
    assert [r["T"] for r in d["vs_T"]["dense"]] == [1, 2, 3, 4, 5]
    for f in ("cost.md", "cost_breakdown.png", "cost_vs_T.png"):
        assert (out / f).stat().st_size > 0
    assert "energy 1.591e+07 pJ" in capsys.readouterr().out
    assert _cli(["--layers", str(VGG9), "--mode", "event_driven", "--rate", "0.1", "--adc-bits", "5",
                 "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "cost.json").read_text())
    assert d["mode"] == "event_driven" and d["config"]["adc_bits"] == 5 and "event_driven" in d["vs_T"]
    with pytest.raises(ConfigError, match="--rate"):
        _cli(["--layers", str(VGG9), "--mode", "event_driven", "--out", str(out)])


def test_cli_cost_run_folder(tmp_path):
    from bsnn.config import BinaryConfig
    from bsnn.models import create_model
    from bsnn.pipeline import save_snn
    from bsnn.io import atomic_write_json

    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 2, "hidden": 8},
            "binary": dataclasses.asdict(BinaryConfig()), "activation": {"kind": "relu"}}
    torch.manual_seed(0)
    model = binarize_(create_model("small_cnn", num_classes=3, in_channels=1, width=2, hidden=8)).eval()
    x = torch.randn(8, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=8)
    snn = convert(model, loader, ConvertConfig(threshold=Max()))
    save_snn(tmp_path / "snn.pt", snn, arch)
    atomic_write_json(tmp_path / "sweep.json", simulate(snn, loader, [2, 4], quiet=True).to_dict())
    out = tmp_path / "cost"
    assert _cli(["--run", str(tmp_path), "--mode", "event_driven", "--preset", "xnor-sram-65nm",
                 "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "cost.json").read_text())
    assert d["timesteps"] == 4 and d["mode"] == "event_driven" and d["hardware"] == "xnor-sram-65nm"
    assert len(d["layers"]) == len(snn.layers) and d["total"]["energy_pj"] > 0


def test_operating_point_is_the_smallest_T_within_tolerance_of_the_ann():
    from bsnn.hardware.report import operating_point

    sweep = {"accuracy": {"1": 40.0, "2": 80.0, "4": 97.2, "8": 98.0, "64": 98.4}, "ann_accuracy": 98.1}
    assert operating_point(sweep)[0] == 4
    assert operating_point(sweep, tolerance=0.3)[0] == 8
    t, reason = operating_point(sweep, tolerance=0.0)
    assert t == 64 and "smallest simulated T within 0 point" in reason
    t, reason = operating_point({"accuracy": {"1": 10.0, "8": 50.0}, "ann_accuracy": 98.0})
    assert t == 8 and "no simulated T reaches" in reason
    t, reason = operating_point({"accuracy": {"1": 10.0, "8": 50.0}, "ann_accuracy": None})
    assert t == 8 and "no ANN accuracy" in reason


def test_cost_of_a_run_is_at_its_operating_point(tmp_path):
    import json

    from bsnn.cli import main

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", "data.name=digits", "train.epochs=2", "student.epochs=2",
                 "simulate.timesteps=[1,2,4,8,16,32]", "simulate.record_predictions=true"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sweep = json.loads((out / "sweep.json").read_text())
    val = sweep["validation"]  # the operating point is chosen on the validation sweep, never on test labels
    ann, acc = val["ann_accuracy"], {int(t): a for t, a in val["accuracy"].items()}
    expected = next((t for t in sorted(acc) if acc[t] >= ann - 1.0), max(acc))
    assert set(acc) == {int(t) for t in sweep["accuracy"]} and val["samples"] > 0
    cost = json.loads((out / "cost.json").read_text())
    assert cost["timesteps"] == expected == metrics["cost"]["timesteps"]
    assert cost["operating_point"]["reason"].startswith(f"T={expected}") and "validation split" in \
        cost["operating_point"]["reason"]
    assert "Operating point: T=" in (out / "cost.md").read_text()
    front = cost["front"]  # test accuracy vs energy over every simulated T, the ANN beside it (a report)
    test_acc = {int(t): a for t, a in sweep["accuracy"].items()}
    assert [r["T"] for r in front["rows"]] == sorted(test_acc) and (out / "cost_front.png").is_file()
    assert [r["accuracy"] for r in front["rows"]] == [test_acc[t] for t in sorted(test_acc)]
    energies = [r["energy_dense_pj"] for r in front["rows"]]
    assert energies == sorted(energies) and front["ann"]["accuracy"] == sweep["ann_accuracy"]
    wins = [r["T"] for r in front["rows"] if r["energy_event_pj"] < front["ann"]["energy_bit_serial_pj"]]
    assert front["snn_wins_up_to_T"] == (max(wins) if wins else None)
    assert front["summary"] in (out / "cost_front.md").read_text()
    chosen = metrics["early_exit"]["chosen"]  # the early-exit rule chosen on validation, stated with its cost bound
    assert chosen is not None  # this seeded run has a rule within 1 point of the ANN on validation
    ee = cost["operating_point"]["early_exit"]
    covering = min(t for t in test_acc if t >= chosen["mean_timesteps"])
    assert ee["mean_timesteps"] == chosen["mean_timesteps"] and ee["bound_timesteps"] == covering
    assert ee["energy_pj_upper_bound"] == pytest.approx(
        next(r["energy_event_pj"] for r in front["rows"] if r["T"] == covering))
    assert f"{chosen['mean_timesteps']:.2f} timesteps per sample" in (out / "cost.md").read_text()
    assert main(["cost", "--run", str(out), "--out", str(tmp_path / "c"), "--mode", "event_driven",
                 "--tolerance", "100", "--quiet"]) == 0
    again = json.loads((tmp_path / "c" / "cost.json").read_text())
    assert again["timesteps"] == 1  # any T is within 100 points
    assert again["operating_point"]["early_exit"] == ee  # bsnn cost --run states the run's early-exit rule too


def test_operation_counts_are_acs_for_spikes_macs_for_the_analog_layer():
    from bsnn.hardware.cost import estimate
    from bsnn.hardware.mapping import LayerSpec
    from bsnn.hardware.ops import AC_PJ, MAC_PJ, operation_counts

    layers = [LayerSpec("c1", 3, 8, (3, 3), (8, 8), (8, 8), analog_input=True),
              LayerSpec("c2", 8, 8, (3, 3), (8, 8), (8, 8), input_neurons=["if1"]),
              LayerSpec("fc", 512, 10, kind="linear", input_neurons=["if2"])]
    rates = {"c2": [0.5, 0.25, 0.25, 0.0], "fc": 0.1}
    ops = operation_counts(layers, rates, 4)
    c1, c2, fc = ops["layers"]
    assert c1["macs"] == 4 * 8 * 8 * 8 * 3 * 9 and c1["acs"] == 0  # analog input: a MAC per weight per step
    assert c2["acs"] == pytest.approx(8 * 8 * 8 * 8 * 9 * 1.0) and c2["macs"] == 0  # Σ rates = 1
    assert fc["acs"] == pytest.approx(512 * 10 * 0.4) and fc["neuron_updates"] == 10 * 4
    assert ops["total"]["energy_pj"] == pytest.approx(ops["total"]["acs"] * AC_PJ + ops["total"]["macs"] * MAC_PJ)
    digital = estimate(layers, rates, "digital-45nm", timesteps=4, mode="event_driven")
    assert ops["total"]["energy_pj"] == pytest.approx(digital.total.energy_pj)  # the digital baseline, same counts
    dense = operation_counts(layers, None, 4)
    assert dense["rates"] == "dense" and dense["layers"][1]["acs"] == 4 * c2["macs_per_step"]


def test_first_layer_alternatives_and_its_share_of_the_energy():
    from bsnn.hardware.config import preset
    from bsnn.hardware.cost import estimate
    from bsnn.hardware.mapping import LayerSpec

    layers = [LayerSpec("c1", 3, 16, (3, 3), (32, 32), (32, 32), analog_input=True),
              LayerSpec("c2", 16, 16, (3, 3), (32, 32), (32, 32), input_neurons=["if1"])]
    T = 8
    base = preset("spikesim-rram-65nm")
    per_step = estimate(layers, None, base, timesteps=T, mode="dense")
    once = estimate(layers, None, base.replace(first_layer="once"), timesteps=T, mode="dense")
    digital = estimate(layers, None, base.replace(first_layer="digital"), timesteps=T, mode="dense")
    e = {r.name: r.energy_pj for r in per_step.layers}
    e_once = {r.name: r.energy_pj for r in once.layers}
    # SpikeSim's convention: one pass per step; once: 8 bit-serial passes in all (8 = T here: the same energy)
    assert e_once["c1"] == pytest.approx(e["c1"] * 8 / T) and e_once["c2"] == e["c2"]
    assert estimate(layers, None, base.replace(first_layer="once"), timesteps=32, mode="dense").layers[0].energy_pj \
        == pytest.approx(e_once["c1"])  # independent of T
    assert digital.layers[0].energy_pj == pytest.approx(layers[0].macs * base.energy.mac_pj)
    share = 100.0 * e["c1"] / per_step.total.energy_pj
    assert any(f"{share:.1f} % of the energy" in n and "SpikeSim's convention" in n for n in per_step.notes)
    assert any("digital core" in n for n in digital.notes)
    with pytest.raises(ConfigError, match="first_layer must be one of"):
        base.replace(first_layer="analog")


def test_cost_reports_name_the_constants_not_verified_against_their_source():
    from bsnn.hardware.config import preset
    from bsnn.hardware.cost import estimate
    from bsnn.hardware.mapping import LayerSpec

    layers = [LayerSpec("c1", 3, 8, (3, 3), (8, 8), (8, 8), analog_input=True)]
    for name, listed in (("spikesim-rram-65nm", False), ("isaac-rram-32nm", True), ("xnor-sram-65nm", True)):
        hw = preset(name)
        notes = estimate(layers, None, hw, timesteps=2, mode="dense").notes
        said = [n for n in notes if "not verified against their source" in n]
        assert bool(said) == listed, (name, notes)
        assert all(c in said[0] for c in hw.unverified) if listed else not hw.unverified
    assert "adc_pj" not in preset("isaac-rram-32nm").unverified  # ISAAC's ADC figure is confirmed (REFERENCE §5)
