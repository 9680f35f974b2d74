"""The ADC-resolution accuracy-energy front (bsnn.hardware.front.adc_front, issue #18).

Energies are checked against SpikeSim's PE-cycle formula written out here (ela_spikesim.py compute_energy, L55-57,
with the ADC energy scaled 2^(bits - 4)); accuracies against the constrained simulation run directly
(apply_constraints + simulate) and against the exact-ADC identity (an ADC with at least ceil(log2(rows+1)) + 1
bits reproduces the ideal partial sums, so the constrained network is the ideal one).
"""

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import bsnn.hardware as H
from bsnn.binary import binarize_
from bsnn.config import ConvertConfig
from bsnn.convert import Max, convert
from bsnn.errors import ConfigError
from bsnn.hardware.constraints import ConstraintConfig, apply_constraints
from bsnn.hardware.front import ADC_FRONT_FILES, adc_front, adc_front_markdown, write_adc_front
from bsnn.simulate import SimConfig, simulate

# SpikeSim's RRAM constants (ela_spikesim.py L40-53), typed in again
E_XBAR, E_ADC4, E_MUX, E_HTREE, E_FETCH, E_NEURON, E_SUB, E_TEMP, E_TILE = (
    1.76423, 2.03084, 0.094245, 19.64 * 8, 4.64, 1.274 * 4.0, 1.15e-6, 0.2, 397.0)
WIDTHS = [(16, 48), (48, 32), (32, 24), (24, 3)]  # (in, out) of the four linear layers
T = 6
SIM = SimConfig(kernel="torch")  # no compile step in tests; every kernel equals the oracle


def pe_cycle_pj(X, bits, k=1):
    """SpikeSim's PE_cycle_energy with the ADC at ``bits`` (Walden scaling from its 4-bit figure)."""
    adc = E_ADC4 * 2.0 ** (bits - 4)
    pe_ar = k * k * E_XBAR + (X / 8) * (adc + E_MUX)
    return E_HTREE + E_FETCH + E_NEURON + X / 8 * pe_ar + (X / 8) * 16 * E_SUB + (X / 8) * E_TEMP + E_TILE


def dense_literal(X, bits):
    """SpikeSim's compute_energy for the MLP: ceil(out/X)·ceil(in/X) PEs, one position, T steps."""
    return sum(math.ceil(o / X) * math.ceil(i / X) * pe_cycle_pj(X, bits) * T for i, o in WIDTHS)


@pytest.fixture(scope="module")
def mlp():
    """flatten -> linear(FP) -> IF -> binary linear (48 rows) -> IF -> binary linear -> IF -> linear(FP)."""
    torch.manual_seed(3)
    layers = []
    for n, (i, o) in enumerate(WIDTHS):
        layers.append(nn.Linear(i, o, bias=False))
        if n < len(WIDTHS) - 1:
            layers.append(nn.ReLU())
    net = binarize_(nn.Sequential(nn.Flatten(), *layers)).eval()
    x = torch.randn(48, 1, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=24)
    return convert(net, loader, ConvertConfig(threshold=Max())), loader


def test_one_row_per_setting_with_costs_from_the_formula(mlp):
    snn, loader = mlp
    bits = [3, 4, 5, 6, 8]
    front = adc_front(snn, loader, "spikesim-rram-65nm", T, adc_bits=bits, xbar_rows=[16, 64], sim_cfg=SIM)
    rows = front["rows"]
    assert [(r["xbar_rows"], r["adc_bits"]) for r in rows] == [(x, b) for x in (16, 64) for b in bits]
    for r in rows:
        assert r["T"] == T and r["constraint_adc_bits"] == r["adc_bits"]  # sign_handling none: no extra bit
        # exact signed bits of the quantised layers (48 and 32 spike rows): ceil(log2(rows + 1)) + 1 per conversion
        assert r["exact_adc_bits"] == max(math.ceil(math.log2(min(n, r["xbar_rows"]) + 1)) + 1 for n in (48, 32))
        assert r["energy_dense_pj"] == pytest.approx(dense_literal(r["xbar_rows"], r["adc_bits"]), rel=1e-12)
        assert r["adc_pj_per_conversion"] == pytest.approx(E_ADC4 * 2.0 ** (r["adc_bits"] - 4), rel=1e-12)
    for x in (16, 64):  # more ADC bits never cost less (here: strictly more, the ADC energy doubles per bit)
        dense = [r["energy_dense_pj"] for r in rows if r["xbar_rows"] == x]
        assert all(a < b for a, b in zip(dense, dense[1:])), dense
    assert front["samples"] == 48 and front["hardware"] == "spikesim-rram-65nm"
    # the two binary layers fed by spikes are quantised; the full-precision first and last layers stay exact
    names = [l["name"] for l in snn.layers]
    assert front["constrained_layers"] == names[1:3] and sorted(front["ideal_layers"]) == sorted([names[0], names[3]])
    assert "ADC-quantised layers: " + ", ".join(names[1:3]) in adc_front_markdown(front)


def test_accuracy_is_the_constrained_simulation(mlp):
    snn, loader = mlp
    front = adc_front(snn, loader, "spikesim-rram-65nm", T, adc_bits=[3, 8], xbar_rows=[64], sim_cfg=SIM)
    ideal = simulate(snn, loader, [T], SIM, quiet=True)
    assert front["ideal"]["accuracy"] == ideal.accuracy[T]
    for r in front["rows"]:
        hw = H.preset("spikesim-rram-65nm", [f"adc_bits={r['adc_bits']}"])
        with apply_constraints(snn, ConstraintConfig(xbar_rows=64, mapping="spikesim", adc_bits=r["adc_bits"])):
            res = simulate(snn, loader, [T], SIM, quiet=True)
        assert r["accuracy"] == res.accuracy[T]
        assert r["accuracy_drop"] == pytest.approx(ideal.accuracy[T] - res.accuracy[T])
        ev = H.estimate(snn, res, hw, timesteps=T, mode="event_driven", compare=False).total
        assert r["energy_event_pj"] == pytest.approx(ev.energy_pj, rel=1e-12)
        assert r["adc_event_pj"] == pytest.approx(ev.breakdown_pj["adc"], rel=1e-12)
    three, eight = front["rows"]
    # 48 rows need ceil(log2 49) + 1 = 7 signed bits: 8 bits are exact, so the network is the ideal one ...
    assert eight["accuracy"] == ideal.accuracy[T] and eight["accuracy_drop"] == 0
    ev_ideal = H.estimate(snn, ideal, H.preset("spikesim-rram-65nm", ["adc_bits=8"]), timesteps=T,
                          mode="event_driven", compare=False).total.energy_pj
    assert eight["energy_event_pj"] == pytest.approx(ev_ideal, rel=1e-12)
    # ... while 3 bits (LSB = 48/3 = 16 rows) change the spikes, hence the event-driven energy at 3 bits
    ev_ideal3 = H.estimate(snn, ideal, H.preset("spikesim-rram-65nm", ["adc_bits=3"]), timesteps=T,
                           mode="event_driven", compare=False).total.energy_pj
    assert three["energy_event_pj"] != pytest.approx(ev_ideal3, rel=1e-9)


def test_paired_sign_handling_simulates_one_more_bit_and_files_are_written(mlp, tmp_path):
    snn, loader = mlp
    front = adc_front(snn, loader, "isaac-rram-32nm", 2, adc_bits=[4, 8], sim_cfg=SIM)
    assert [r["constraint_adc_bits"] for r in front["rows"]] == [5, 9]  # unsigned counts + a sign bit
    assert [r["xbar_rows"] for r in front["rows"]] == [128, 128]
    e4, e8 = (r["energy_dense_pj"] for r in front["rows"])
    assert e8 > e4
    paths = write_adc_front(front, tmp_path)
    assert sorted(p.name for p in paths.values()) == sorted(ADC_FRONT_FILES)
    assert json.loads(paths["adc_front_json"].read_text())["rows"][0]["adc_bits"] == 4
    md = adc_front_markdown(front)
    assert md.count("\n| 128 |") == 2 and front["summary"] in md


def test_refuses_the_digital_baseline_and_empty_settings(mlp):
    snn, loader = mlp
    with pytest.raises(ConfigError, match="digital baseline"):
        adc_front(snn, loader, "digital-45nm", T)
    with pytest.raises(ConfigError, match="at least one ADC resolution"):
        adc_front(snn, loader, "spikesim-rram-65nm", T, adc_bits=[])


def test_cli_cost_run_writes_the_adc_front_from_the_runs_test_data(tmp_path, capsys):
    import argparse
    import dataclasses as dc

    import yaml

    from bsnn.binary import BinaryConfig
    from bsnn.data import DataConfig, build_loaders
    from bsnn.hardware.cli import add_cost_parser
    from bsnn.io import atomic_write_json, model_digest
    from bsnn.modelfile import save_snn
    from bsnn.models import create_model

    import numpy as np

    rng = np.random.default_rng(0)  # a Keras-style archive: 8x8 grey images, 10 classes
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y_train=np.arange(60) % 10,
             x_test=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_test=np.arange(40) % 10)
    data_cfg = {"name": f"npz:{data}", "eval_batch_size": 20}
    config = {"data": data_cfg, "simulate": {"kernel": "torch"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    test = build_loaders(DataConfig(**data_cfg)).test
    torch.manual_seed(0)
    arch = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "kwargs": {"width": 2, "hidden": 8},
            "binary": dc.asdict(BinaryConfig()), "activation": {"kind": "relu"}}
    model = binarize_(create_model("small_cnn", num_classes=10, in_channels=1, width=2, hidden=8)).eval()
    snn = convert(model, test, ConvertConfig(threshold=Max()))
    save_snn(tmp_path / "snn.pt", snn, arch)
    sweep = simulate(snn, test, [1, 2], SIM, quiet=True).to_dict()
    sweep["derived_from"] = {"snn": model_digest(snn)}
    atomic_write_json(tmp_path / "sweep.json", sweep)
    parser = argparse.ArgumentParser(prog="bsnn")
    add_cost_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cost"
    args = parser.parse_args(["cost", "--run", str(tmp_path), "--mode", "event_driven", "--timesteps", "2",
                              "--adc-front", "3,8", "--adc-front-samples", "16", "--out", str(out)])
    assert args.fn(args) == 0
    assert "ADC front: on spikesim-rram-65nm at T=2" in capsys.readouterr().out
    got = json.loads((out / "cost_adc_front.json").read_text())
    assert (out / "cost_adc_front.png").is_file() and (out / "cost_adc_front.md").is_file()
    want = adc_front(snn, test, "spikesim-rram-65nm", 2, adc_bits=[3, 8], sim_cfg=SimConfig(kernel="torch",
                                                                                          max_samples=16))
    assert got["samples"] == 16 and [r["accuracy"] for r in got["rows"]] == [r["accuracy"] for r in want["rows"]]
    assert [r["energy_event_pj"] for r in got["rows"]] == pytest.approx([r["energy_event_pj"] for r in want["rows"]])
    bad = parser.parse_args(["cost", "--layers", str(tmp_path / "x.csv"), "--adc-front", "3,x"])
    with pytest.raises(ConfigError, match="needs --run"):
        bad.fn(bad)
    bad = parser.parse_args(["cost", "--run", str(tmp_path), "--adc-front", "3,x"])
    with pytest.raises(ConfigError, match="comma-separated positive integers"):
        bad.fn(bad)
