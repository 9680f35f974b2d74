"""The hardware presets' constants against their sources (issue #18).

The reference numbers are typed in here from the sources themselves, not read from bsnn:
* SpikeSim: github.com/Intelligent-Computing-Lab-Yale/SpikeSim, SNN_train_infer_quantization_ela/ela_spikesim.py
  (compute_energy L40-57, compute_area L76-96, latency_gen L158, L204-209).
* ISAAC: Shafiee et al., ISCA 2016, Table I (powers and areas are group totals per IMA or per tile), as transcribed
  in dyigitpolat/mimarsinan .../platform_physics/profiles/isaac_like.md and in the ISAAC component models of
  thu-nics/MNSIM-2.0 (MNSIM/Hardware_Model/ADC.py, DAC.py) and Accelergy-Project/hwcomponents-library (isaac.py).
* XNOR-SRAM: Yin et al., IEEE JSSC 2020, abstract (403 TOPS/W, 11-level flash ADC, 65 nm).
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest

import bsnn.hardware as H
from bsnn.errors import ConfigError
from bsnn.hardware.config import SOURCE_STATUS, preset_yaml, source_status
from bsnn.hardware.cost import area_breakdown_um2, estimate, pe_cycle_energy_pj
from bsnn.hardware.mapping import LayerSpec, map_layer
from bsnn.hardware.report import sources_markdown, write_cost_report

ROOT = Path(__file__).resolve().parents[1]
HW_DIR = ROOT / "configs" / "hardware"
IMC = ("spikesim-rram-65nm", "xnor-sram-65nm", "isaac-rram-32nm")
ARCHITECTURE = ("xbar_rows", "xbar_cols", "mapping", "sign_handling", "pe_per_tile", "clock_mhz", "pe_cycle_clocks",
                "pipeline_overlap", "cols_per_adc", "adc_steps_per_pe_cycle", "sample_and_hold", "sub_ops_per_step",
                "adc_bits", "adc_ref_bits", "adc_scaling_pj", "analog_input_bits", "first_layer", "weight_cell_bits",
                "membrane_area_layers")


def _get(hw, key):
    node = hw
    for part in key.split("."):
        node = getattr(node, part)
    return node


# ------------------------------------------------------------------------------------------ bookkeeping
@pytest.mark.parametrize("name", ["spikesim-rram-65nm", "xnor-sram-65nm", "isaac-rram-32nm", "digital-45nm"])
def test_every_source_is_tagged_and_names_a_real_field(name):
    hw = H.preset(name)
    assert hw.sources
    for key, text in hw.sources.items():
        _get(hw, key)  # raises AttributeError for a key that is no field
        assert source_status(text) in SOURCE_STATUS and text.startswith(f"[{source_status(text)}"), (key, text)
    assert hw.unverified == [k for k, v in hw.sources.items() if source_status(v) == "unverified"]


@pytest.mark.parametrize("name", IMC)
def test_every_constant_of_an_imc_preset_is_cited(name):
    hw = H.preset(name)
    keys = set(ARCHITECTURE)
    keys |= {f"energy.{f.name}" for f in dataclasses.fields(H.EnergyTable)}
    keys |= {f"area.{f.name}" for f in dataclasses.fields(H.AreaTable)}
    assert keys <= set(hw.sources), sorted(keys - set(hw.sources))


@pytest.mark.parametrize("name", ["spikesim-rram-65nm", "xnor-sram-65nm", "isaac-rram-32nm", "digital-45nm"])
def test_yaml_files_are_the_rendered_presets_with_citations_as_comments(name):
    path = HW_DIR / f"{name}.yaml"
    assert path.read_text() == preset_yaml(name), f"regenerate {path} with bsnn.hardware.config.preset_yaml"
    hw = H.load_hardware_config(path)
    assert hw == H.preset(name)
    text = path.read_text()
    for key, src in hw.sources.items():  # the comment above the field opens with the status tag
        assert f"# [{source_status(src)}" in text
    for key in hw.unverified:
        assert key in text.split("unverified:")[-1]


# -------------------------------------------------------------------------------------------- SpikeSim
def test_spikesim_constants_are_those_of_ela_spikesim():
    hw = H.preset("spikesim-rram-65nm")
    e, a = hw.energy, hw.area
    # compute_energy (L40-53)
    assert (e.xbar_read_pj, e.adc_pj, e.mux_pj, e.sub_pj) == (1.76423, 2.03084, 0.094245, 1.15e-6)
    assert (e.temp_buff_pj, e.tile_buff_pj, e.htree_pj, e.mem_fetch_pj) == (0.2, 397, 19.64 * 8, 4.64)
    assert e.neuron_pj == 1.274 * 4.0 and e.row_driver_pj == 0
    # compute_area (L76-96)
    assert (a.xbar_um2, a.adc_um2, a.mux_um2, a.sub_um2) == (26.2144, 693.633, 45.9, 13411.41498)
    assert (a.temp_buff_um2, a.tile_buff_um2, a.htree_um2) == (484.643999, 0.7391 * 64 * 128, 216830 * 2)
    assert (a.sram_bit_um2, a.input_buffer_bits, a.membrane_bits, hw.membrane_area_layers) == (0.7391, 22, 22, 5)
    # main block and latency_gen (L158, L204-209): 64x64, 8 PEs per tile, 250 MHz, 26 clocks, 0.75 overlap
    assert (hw.xbar_rows, hw.pe_per_tile, hw.clock_mhz, hw.pe_cycle_ns, hw.pipeline_overlap) == (64, 8, 250, 104, 0.75)
    # PE_cycle_energy (L55-57): X/8 reads of k² crossbars, X/8 ADC+MUX per read, X/8·16 subtractions
    X, k2 = 64, 9
    pe_ar = k2 * 1.76423 + X / 8 * (2.03084 + 0.094245)
    literal = 19.64 * 8 + 4.64 + 1.274 * 4 + X / 8 * pe_ar + X / 8 * 16 * 1.15e-6 + X / 8 * 0.2 + 397
    assert sum(pe_cycle_energy_pj(hw, k2).values()) == pytest.approx(literal, rel=1e-12)
    assert hw.unverified == []


# ------------------------------------------------------------------------------------------------ ISAAC
# Table I, per IMA (8 arrays, 12 IMAs per tile): mW and mm²
T1_IMA_MW = {"adc": 16.0, "dac": 4.0, "sh": 0.010, "array": 2.4, "sa": 0.2, "ir": 1.24, "or": 0.23}
T1_IMA_MM2 = {"adc": 0.0096, "dac": 0.00017, "sh": 0.00004, "array": 0.0002, "sa": 0.00024, "ir": 0.0021,
              "or": 0.00077}
# per tile: eDRAM, eDRAM-IMA bus, router (shared by 4 tiles), sigmoid, tile S+A, maxpool, tile OR
T1_TILE_MW = {"edram": 20.7, "bus": 7.0, "router": 42.0 / 4, "sigmoid": 0.52, "sa": 0.05, "maxpool": 0.4, "or": 1.68}
T1_TILE_MM2 = {"edram": 0.083, "bus": 0.090, "router": 0.151 / 4, "sigmoid": 0.0006, "sa": 0.00006,
               "maxpool": 0.00024, "or": 0.0032}
T1_TILE_TOTAL_MW, T1_TILE_TOTAL_MM2 = 330.0, 0.372
CYCLE_NS = 100.0  # §IV: one cycle = one crossbar read


def test_isaac_energies_spend_table_one_power_budget_per_100ns_cycle():
    """At full activity, one IMA cycle (8 array reads) must cost each unit's Table I power x 100 ns."""
    hw = H.preset("isaac-rram-32nm")
    per_read = pe_cycle_energy_pj(hw, 1)  # one PE = one array, one 100 ns read, 128 conversions
    ima = {k: 8 * v for k, v in per_read.items()}
    for part, unit in (("xbar", "array"), ("row_drivers", "dac"), ("adc", "adc"), ("mux", "sh"),
                       ("shift_add", "sa"), ("temp_buffer", "or"), ("mem_fetch", "ir")):
        assert ima[part] == pytest.approx(T1_IMA_MW[unit] * CYCLE_NS, rel=1e-12), part
    tile = {k: 96 * v for k, v in per_read.items()}  # 12 IMAs x 8 arrays
    assert tile["tile_buffer"] == pytest.approx((T1_TILE_MW["edram"] + T1_TILE_MW["or"]) * CYCLE_NS, rel=1e-12)
    assert tile["htree"] == pytest.approx((T1_TILE_MW["bus"] + T1_TILE_MW["router"]) * CYCLE_NS, rel=1e-12)
    # the whole tile without the IF neurons (not in ISAAC) against the table's 330 mW: the sigmoid, max-pool and
    # tile S+A (0.97 mW) are the only units left out
    modelled_mw = (sum(tile.values()) - tile["neuron"]) / CYCLE_NS
    left_out = T1_TILE_MW["sigmoid"] + T1_TILE_MW["maxpool"] + T1_TILE_MW["sa"]
    assert modelled_mw + left_out == pytest.approx(12 * sum(T1_IMA_MW.values()) + sum(T1_TILE_MW.values()), rel=1e-9)
    assert modelled_mw == pytest.approx(T1_TILE_TOTAL_MW, rel=0.01)
    # one 8-bit conversion: 2 mW per ADC at the text's 1.28 GS/s (MNSIM-2.0 ADC.py choice 2: 2e-3 W, 1.28 GS/s)
    assert hw.adc_energy_pj == pytest.approx(2e-3 / 1.28e9 * 1e12, rel=1e-12)
    assert hw.energy.row_driver_pj == pytest.approx(0.0039e-3 * 100e-9 * 1e12, rel=0.002)  # MNSIM DAC.py: 3.9 uW


def test_isaac_areas_add_up_to_table_one_tile():
    hw = H.preset("isaac-rram-32nm")
    a = hw.area
    assert a.xbar_um2 == pytest.approx(T1_IMA_MM2["array"] / 8 * 1e6)
    assert a.adc_um2 == pytest.approx(1200.0)  # MNSIM-2.0 ADC.py choice 2; Accelergy isaac.py 9600 um2 / 8
    spec = LayerSpec("fc", 128 * 96, 64, (1, 1), (1, 1), (1, 1))  # paired: 96 arrays of 128 columns, one tile
    m = map_layer(spec, hw)
    assert m.pes == 96
    area = area_breakdown_um2([spec], [m], hw)
    tile_um2 = sum(v for k, v in area.items() if k not in ("input_buffer", "membrane"))
    table_um2 = 1e6 * (12 * sum(T1_IMA_MM2.values()) + sum(T1_TILE_MM2.values()))
    left_out_um2 = 1e6 * (12 * T1_IMA_MM2["dac"] + T1_TILE_MM2["sigmoid"] + T1_TILE_MM2["sa"] + T1_TILE_MM2["maxpool"])
    assert tile_um2 + left_out_um2 == pytest.approx(table_um2, rel=1e-9)
    assert tile_um2 == pytest.approx(T1_TILE_TOTAL_MM2 * 1e6, rel=0.01)
    assert a.sram_bit_um2 == pytest.approx(0.083e6 / (64 * 1024 * 8))  # the eDRAM's density


def test_isaac_adc_scales_by_its_own_sar_model_not_walden():
    hw = H.preset("isaac-rram-32nm")
    # Accelergy isaac.py L308-314: ISAAC's SAR ADC scaled per its §VII method, pJ per conversion at 32 nm
    scaled = {4: 0.79, 5: 0.99, 6: 1.20, 7: 1.42, 8: 1.67, 9: 1.969078145, 10: 2.379022742}
    for bits, pj in scaled.items():
        assert hw.replace(adc_bits=bits).adc_energy_pj == pytest.approx(1.5625 * pj / 1.67, rel=1e-12)
    with pytest.raises(ConfigError, match="outside adc_scaling_pj"):
        hw.replace(adc_bits=3)
    with pytest.raises(ConfigError, match="adc_scaling_pj must map ADC bits"):
        H.preset("isaac-rram-32nm", {"adc_scaling_pj": {4: -1.0, 8: 1.0}})
    again = H.hardware_from_dict(json.loads(json.dumps(hw.to_dict())))  # JSON keys are strings
    assert again.replace(adc_bits=5).adc_energy_pj == hw.replace(adc_bits=5).adc_energy_pj
    walden = H.preset("spikesim-rram-65nm").replace(adc_bits=6)
    assert walden.adc_scaling_pj is None and walden.adc_energy_pj == pytest.approx(2.03084 * 4)


def test_isaac_architecture_and_what_stays_unverified():
    hw = H.preset("isaac-rram-32nm")
    assert (hw.xbar_rows, hw.xbar_cols, hw.pe_per_tile, hw.weight_cell_bits) == (128, 128, 12 * 8, 2)
    assert hw.clock_mhz == 1200 and hw.pe_cycle_ns == pytest.approx(CYCLE_NS)
    assert (hw.adc_bits, hw.cols_per_adc, hw.adc_steps, hw.sample_and_hold) == (8, 128, 128, True)
    assert hw.unverified == ["pipeline_overlap", "energy.neuron_pj"]  # SpikeSim's, ISAAC has neither
    assert "energy.adc_pj" not in hw.unverified


# -------------------------------------------------------------------------------------------- XNOR-SRAM
def test_xnor_sram_macro_figure():
    hw = H.preset("xnor-sram-65nm")
    ops_per_read = 2 * 64 * 64
    assert hw.energy.xbar_read_pj == pytest.approx(ops_per_read / 403.0)  # 403 TOPS/W = 403 ops per pJ
    assert hw.energy.adc_pj == 0 and hw.energy.mux_pj == 0  # inside the macro figure
    assert hw.adc_bits == math.ceil(math.log2(11))  # the macro's 11-level flash ADC
    assert {"energy.xbar_read_pj", "area.xbar_um2", "pe_cycle_clocks", "pipeline_overlap"} <= set(hw.unverified)
    assert "op count" in hw.sources["energy.xbar_read_pj"]
    # array area: 64x64 SRAM cells of 160 F² (NeuroSim Param.cpp L152) at F = 65 nm; SpikeSim's SRAM crossbar area
    # (ela_spikesim.py L78, 671.089 um2) is the same cell at F = 32 nm
    assert hw.area.xbar_um2 == pytest.approx(64 * 64 * 160 * 0.065 ** 2)
    assert 64 * 64 * 160 * 0.032 ** 2 == pytest.approx(671.089, abs=1e-3)


# --------------------------------------------------------------------------------- user values, reports
def test_user_values_are_cited_as_such_and_leave_the_unverified_list():
    hw = H.preset("isaac-rram-32nm", ["energy.neuron_pj=1.5", "xbar_rows=64"])
    assert hw.energy.neuron_pj == 1.5 and "energy.neuron_pj" not in hw.unverified
    assert source_status(hw.sources["energy.neuron_pj"]) == "user" and "5.096" in hw.sources["energy.neuron_pj"]
    assert source_status(hw.sources["xbar_rows"]) == "user"
    assert source_status(hw.sources["energy.adc_pj"]) == "derived"  # untouched constants keep their citation
    ex = H.load_hardware_config(HW_DIR / "example-spikesim-128x128.yaml")
    assert {k for k, v in ex.sources.items() if source_status(v) == "user"} == {"xbar_rows", "xbar_cols",
                                                                              "pe_per_tile", "adc_bits"}
    same = H.preset("isaac-rram-32nm", ["energy.neuron_pj=5.096"])  # the preset's own value: still unverified
    assert "energy.neuron_pj" in same.unverified


def test_cost_report_prints_the_sources(tmp_path):
    layers = [LayerSpec("c1", 3, 8, (3, 3), (8, 8), (8, 8), analog_input=True), LayerSpec("c2", 8, 8, (3, 3),
                                                                                           (8, 8), (8, 8))]
    hw = H.preset("xnor-sram-65nm")
    report = estimate(layers, None, hw, timesteps=2, mode="dense")
    paths = write_cost_report(report, tmp_path, layers, None, hw, plots=False)
    md = paths["md"].read_text()
    assert "## Sources of the constants (xnor-sram-65nm)" in md
    for key in hw.unverified:
        assert f"| `{key}` |" in md
    assert "2*64*64/403" in md and "ela_spikesim.py L46" in md
    table = sources_markdown(H.preset("spikesim-rram-65nm").to_dict())
    assert "Every cited constant is verified" in table and "| `energy.sub_pj` | 1.15e-06 | verified |" in table


def test_cli_prints_unverified_constants_with_why(tmp_path, capsys):
    import argparse

    from bsnn.hardware.cli import add_cost_parser

    parser = argparse.ArgumentParser(prog="bsnn")
    add_cost_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cost", "--preset", "isaac-rram-32nm", "--layers",
                              str(HW_DIR / "vgg9_cifar10_layers.csv"), "--timesteps", "2", "--out", str(tmp_path)])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "not verified against their source: pipeline_overlap, energy.neuron_pj" in out
    assert "unverified energy.neuron_pj: ISAAC has no IF neuron" in out
    assert "section 'Sources of the constants'" in out
