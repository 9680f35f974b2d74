"""Hardware descriptions for the in-memory-computing (IMC) cost model: dataclasses, named presets, YAML.

Every physical quantity carries its unit in its name (``_pj`` picojoule, ``_um2`` square micrometre, ``_mhz``,
``_ns``); every preset constant cites its source in the preset's docstring. The cost formulas that use these
fields live in :mod:`bsnn.hardware.cost`; the SpikeSim preset's constants and structure are those of SpikeSim's
analytical model (Moitra et al., "SpikeSim: An end-to-end Compute-in-Memory Hardware Evaluation Tool for
Benchmarking Spiking Neural Networks", IEEE TCAD 2023; code: github.com/Intelligent-Computing-Lab-Yale/SpikeSim,
``SNN_train_infer_quantization_ela/ela_spikesim.py``).

Presets: ``spikesim-rram-65nm``, ``xnor-sram-65nm``, ``isaac-rram-32nm``, ``digital-45nm``
(:func:`list_presets`). A YAML file (see ``configs/hardware/``) may name a ``preset`` to start from and override
any field; dotted overrides (``energy.adc_pj=1.5``) apply on top.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union


from bsnn._registry import Registry
from bsnn._validate import _check, apply_overrides, from_dict, read_yaml_mapping
from bsnn.errors import ConfigError

MAPPINGS = ("spikesim", "unrolled")
SIGN_HANDLING = ("none", "popcount", "paired")
DEVICES = ("rram", "sram", "digital")
FIRST_LAYER = ("per_step", "once", "digital")


@dataclass
class EnergyTable:
    """Energy per event, pJ. Which event each entry counts is fixed by the cost model (``bsnn.hardware.cost``).

    Attributes:
        xbar_read_pj: one activation of one crossbar array (all its rows driven), per array read.
        row_driver_pj: driving one row for one array read (1-bit DAC / word-line driver); 0 where it is
            included in ``xbar_read_pj``.
        adc_pj: one ADC conversion at ``HardwareConfig.adc_ref_bits``; scaled by 2^(bits - ref) for other
            resolutions (Walden figure of merit, energy per conversion ∝ 2^ENOB).
        mux_pj: one column-multiplexer selection (one per ADC conversion).
        sub_pj: one shift-and-subtract (partial-sum accumulation) operation.
        temp_buff_pj: one write of the partial-sum temporary buffer (once per ADC step).
        tile_buff_pj: tile buffer traffic per PE cycle.
        htree_pj: on-chip interconnect (H-tree) per PE cycle.
        mem_fetch_pj: input fetch per PE cycle.
        neuron_pj: IF neuron update per PE cycle (add, compare, conditional subtract, membrane read/write).
        digital_add_pj: one digital 8-bit add (sign correction: 2·popcount(s∧w) − popcount(s), pos − neg).
        mac_pj: one digital multiply-accumulate (digital baseline; analog-input layer of the digital SNN).
        ac_pj: one digital accumulate (digital baseline: one synaptic event of a binary spike).
    """

    xbar_read_pj: float = 0.0
    row_driver_pj: float = 0.0
    adc_pj: float = 0.0
    mux_pj: float = 0.0
    sub_pj: float = 0.0
    temp_buff_pj: float = 0.0
    tile_buff_pj: float = 0.0
    htree_pj: float = 0.0
    mem_fetch_pj: float = 0.0
    neuron_pj: float = 0.0
    digital_add_pj: float = 0.03
    mac_pj: float = 4.6
    ac_pj: float = 0.9


@dataclass
class AreaTable:
    """Area per instance, µm², and the bit widths of the SRAM that holds activations and membranes.

    Attributes:
        xbar_um2: one crossbar array.
        adc_um2 / mux_um2: one ADC / one column multiplexer (``HardwareConfig.adcs_per_xbar`` of each per PE).
        sub_um2: one shift-and-subtract unit (one per ADC of a PE, per tile).
        temp_buff_um2, tile_buff_um2, htree_um2: per tile.
        sram_bit_um2: one bit of SRAM (input buffers, membrane memory).
        input_buffer_bits: bits per stored input activation.
        membrane_bits: bits per stored membrane potential.
    """

    xbar_um2: float = 0.0
    adc_um2: float = 0.0
    mux_um2: float = 0.0
    sub_um2: float = 0.0
    temp_buff_um2: float = 0.0
    tile_buff_um2: float = 0.0
    htree_um2: float = 0.0
    sram_bit_um2: float = 0.0
    input_buffer_bits: int = 22
    membrane_bits: int = 22


@dataclass
class HardwareConfig:
    """An IMC accelerator (or the digital baseline) as the cost model sees it.

    Attributes:
        name: preset name or a user label.
        description: one line; ``sources`` cites each constant group.
        technology_nm: process node.
        device: ``"rram"``, ``"sram"`` or ``"digital"`` (digital: only the Horowitz op-energy model applies).
        xbar_rows / xbar_cols: crossbar size (SpikeSim: square, X = 64).
        mapping: ``"spikesim"`` (a PE holds k² crossbars, one per kernel offset, input channels on rows) or
            ``"unrolled"`` (rows = Cin·k², one crossbar per PE).
        sign_handling: ``"none"`` (signed weights inside the array, no extra cost: SpikeSim's model),
            ``"popcount"`` (store w∈{0,1}, Σ s·w = 2·popcount(s∧w) − popcount(s)) or ``"paired"``
            (positive/negative columns: 2x columns and conversions).
        pe_per_tile: PEs per tile (SpikeSim: 8).
        clock_mhz: clock (SpikeSim: 250 MHz).
        pe_cycle_clocks: clocks per PE cycle (SpikeSim: 26, i.e. 104 ns at 250 MHz).
        pipeline_overlap: fraction of a layer's work after which the next layer starts (SpikeSim: 0.75).
        cols_per_adc: columns that share one ADC (SpikeSim: 8); ADCs per PE = ceil(cols / cols_per_adc).
        adc_steps_per_pe_cycle: sequential conversion steps per PE cycle; None = SpikeSim's rule
            (xbar_size / 8, i.e. equal to the number of ADCs).
        sample_and_hold: True: the array is read once per PE cycle and held (ISAAC); False: it is read again at
            every conversion step (SpikeSim charges ``(X/8)·k²·E_xbar`` per PE cycle).
        sub_ops_per_step: shift-and-subtract operations per conversion step (SpikeSim: 16).
        adc_bits: ADC resolution used for costing (energy scaled from ``adc_ref_bits``) and constraints.
        adc_ref_bits: the resolution at which ``energy.adc_pj`` was reported.
        analog_input_bits: input bit-planes of an analog-input (first) layer per timestep; None = SpikeSim's
            convention (costed like a spiking layer, one pass per timestep).
        first_layer: how the analog-input layer is computed under direct encoding (its input is the same every
            timestep): ``per_step`` (SpikeSim's convention: read again every timestep, ``analog_input_bits``
            passes each), ``once`` (read once per inference with ``analog_input_bits`` (default 8) bit-serial
            passes, its output current held for the T timesteps) or ``digital`` (its MACs on a digital core at
            ``energy.mac_pj``, once per inference). Energy only: latency and area keep the crossbar schedule.
        weight_cell_bits: bits per cell for full-precision layers; None = one cell per weight whatever its
            precision (SpikeSim's convention). Binary layers always use one cell (one column per output).
        fp_weight_bits: weight precision of the full-precision (first/last) layers when ``weight_cell_bits`` is set.
        membrane_area_layers: membrane memory is costed for the first N layers only (SpikeSim: 5); None = all.
        energy / area: per-event energies and per-instance areas.
        sources: constant group -> citation.
        unverified: the constants not checked against their source in this repository (cited from memory of a
            paper's table, or reused from another technology); every cost report names them.
    """

    name: str = "custom"
    description: str = ""
    technology_nm: int = 65
    device: str = "rram"
    xbar_rows: int = 64
    xbar_cols: int = 64
    mapping: str = "spikesim"
    sign_handling: str = "none"
    pe_per_tile: int = 8
    clock_mhz: float = 250.0
    pe_cycle_clocks: int = 26
    pipeline_overlap: float = 0.75
    cols_per_adc: int = 8
    adc_steps_per_pe_cycle: Union[int, None] = None
    sample_and_hold: bool = False
    sub_ops_per_step: int = 16
    adc_bits: int = 4
    adc_ref_bits: int = 4
    analog_input_bits: Union[int, None] = None
    first_layer: str = "per_step"
    weight_cell_bits: Union[int, None] = None
    fp_weight_bits: int = 8
    membrane_area_layers: Union[int, None] = None
    energy: EnergyTable = field(default_factory=EnergyTable)
    area: AreaTable = field(default_factory=AreaTable)
    sources: dict = field(default_factory=dict)
    unverified: list = field(default_factory=list)

    # ------------------------------------------------------------------------------------- derived
    @property
    def pe_cycle_ns(self) -> float:
        """Duration of one PE cycle: ``pe_cycle_clocks / clock`` (SpikeSim: 26 · 4 ns = 104 ns)."""
        return self.pe_cycle_clocks * 1000.0 / self.clock_mhz

    @property
    def adcs_per_pe(self) -> int:
        """ADCs per PE: ``ceil(xbar_cols / cols_per_adc)`` (SpikeSim: X/8)."""
        return math.ceil(self.xbar_cols / self.cols_per_adc)

    @property
    def adc_steps(self) -> int:
        """Sequential conversion steps per PE cycle (SpikeSim: X/8)."""
        return self.adc_steps_per_pe_cycle if self.adc_steps_per_pe_cycle is not None else self.adcs_per_pe

    @property
    def adc_energy_pj(self) -> float:
        """Energy of one conversion at ``adc_bits``: ``adc_pj · 2^(adc_bits − adc_ref_bits)`` (Walden FOM)."""
        return self.energy.adc_pj * 2.0 ** (self.adc_bits - self.adc_ref_bits)

    @property
    def is_digital(self) -> bool:
        return self.device == "digital"

    def validate(self) -> "HardwareConfig":
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"hardware {self.name!r}: {msg}")

        check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        check(self.mapping in MAPPINGS, f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        check(self.sign_handling in SIGN_HANDLING,
              f"sign_handling must be one of {SIGN_HANDLING}, got {self.sign_handling!r}")
        for name in ("xbar_rows", "xbar_cols", "pe_per_tile", "pe_cycle_clocks", "cols_per_adc", "adc_bits",
                     "adc_ref_bits", "fp_weight_bits"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.clock_mhz > 0, f"clock_mhz must be > 0, got {self.clock_mhz}")
        check(0.0 <= self.pipeline_overlap <= 1.0, f"pipeline_overlap must be in [0, 1], got {self.pipeline_overlap}")
        for name in ("adc_steps_per_pe_cycle", "analog_input_bits", "weight_cell_bits", "membrane_area_layers"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{name} must be >= 1 or null, got {v}")
        check(self.sub_ops_per_step >= 0, f"sub_ops_per_step must be >= 0, got {self.sub_ops_per_step}")
        check(self.first_layer in FIRST_LAYER, f"first_layer must be one of {FIRST_LAYER}, got {self.first_layer!r}")
        for table in (self.energy, self.area):
            for f in dataclasses.fields(table):
                v = getattr(table, f.name)
                check(math.isfinite(v) and v >= 0, f"{f.name} must be finite and >= 0, got {v}")
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-serialisable), the inverse of :func:`hardware_from_dict`."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "HardwareConfig":
        """A validated copy with top-level fields changed (``hw.replace(xbar_rows=128, xbar_cols=128)``)."""
        return dataclasses.replace(self, **changes).validate()


# ------------------------------------------------------------------------------------------- presets
PRESETS: Registry[Callable[[], HardwareConfig]] = Registry("hardware preset")

_SPIKESIM = ("SpikeSim, Moitra et al., IEEE TCAD 2023, ela_spikesim.py (github.com/Intelligent-Computing-Lab-Yale/"
             "SpikeSim): compute_energy / compute_area / latency_gen constants, 65 nm RRAM")
_HOROWITZ = ("M. Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm: fp32 mult 3.7 + add 0.9 = 4.6 pJ "
             "per MAC, fp32 add 0.9 pJ per AC, int8 add 0.03 pJ")
_ISAAC = ("ISAAC, Shafiee et al., ISCA 2016, Table of tile/IMA parameters at 32 nm, 1.2 GHz, 100 ns crossbar "
          "read; per-event energies = listed power x 100 ns (per-unit shares stated per field)")


def _spikesim_energy() -> EnergyTable:
    return EnergyTable(xbar_read_pj=1.76423, row_driver_pj=0.0, adc_pj=2.03084, mux_pj=0.094245, sub_pj=1.15e-6,
                       temp_buff_pj=0.2, tile_buff_pj=397.0, htree_pj=19.64 * 8, mem_fetch_pj=4.64,
                       neuron_pj=1.274 * 4.0)


def _spikesim_area() -> AreaTable:
    return AreaTable(xbar_um2=26.2144, adc_um2=693.633, mux_um2=45.9, sub_um2=13411.41498,
                     temp_buff_um2=484.643999, tile_buff_um2=0.7391 * 64 * 128, htree_um2=216830 * 2,
                     sram_bit_um2=0.7391, input_buffer_bits=22, membrane_bits=22)


@PRESETS.register("spikesim-rram-65nm")
def spikesim_rram_65nm() -> HardwareConfig:
    """SpikeSim's analytical model, RRAM, 65 nm: the reference the ``dense`` mode reproduces exactly.

    Constants (ela_spikesim.py, Moitra et al. 2023): energies pJ E_xbar 1.76423 (RRAM array read), E_ADC 2.03084
    (4-bit, 8 columns share one ADC), E_MUX 0.094245, E_htree 19.64·8, E_mem_fetch 4.64, E_neuron 1.274·4,
    E_sub 1.15e-6, E_temp_buff 0.2, E_tile_buff 397; areas µm² crossbar 26.2144, ADC 693.633, MUX 45.9,
    Sub 13411.41498, Temp_Buff 484.643999, Tile_buff 0.7391·64·128, H-tree 216830·2, SRAM 0.7391 per bit with
    22-bit entries, membrane memory for the first 5 layers. Architecture: 64x64 crossbars, k² crossbars per PE,
    8 PEs per tile, 250 MHz, PE cycle 26 clocks, 0.75 pipeline overlap, 16 subtractions per step. SpikeSim's
    SRAM crossbar *energy* (671.089 pJ) equals its SRAM area constant and is likely a copy error: not used.
    Digital-baseline energies (mac/ac/add) are Horowitz's 45 nm figures.
    """
    return HardwareConfig(
        name="spikesim-rram-65nm", description="SpikeSim analytical model (TCAD 2023), 65 nm RRAM, 64x64",
        technology_nm=65, device="rram", xbar_rows=64, xbar_cols=64, mapping="spikesim", sign_handling="none",
        pe_per_tile=8, clock_mhz=250.0, pe_cycle_clocks=26, pipeline_overlap=0.75, cols_per_adc=8,
        adc_steps_per_pe_cycle=None, sample_and_hold=False, sub_ops_per_step=16, adc_bits=4, adc_ref_bits=4,
        analog_input_bits=None, weight_cell_bits=None, membrane_area_layers=5,
        energy=_spikesim_energy(), area=_spikesim_area(),
        sources={"energy": _SPIKESIM, "area": _SPIKESIM, "architecture": _SPIKESIM,
                 "digital_add_pj, mac_pj, ac_pj": _HOROWITZ})


@PRESETS.register("xnor-sram-65nm")
def xnor_sram_65nm() -> HardwareConfig:
    """A binary XNOR/AND-SRAM macro (65 nm) inside SpikeSim's 65 nm system periphery.

    Macro: 403 TOPS/W ≈ 2.48 fJ per op (XNOR-SRAM, Yin et al., IEEE JSSC 2020, as summarised in bsnn's
    REFERENCE §5), so one full 64x64 array read (2·64·64 ops, ADCs included) costs 2·64·64/403 = 20.33 pJ;
    ``adc_pj`` and ``mux_pj`` are therefore 0 (inside the macro figure). The 64x64 size is bsnn's choice for
    comparability with SpikeSim (the per-op figure is size-independent here). Spikes {0,1} x weights ±1 use the
    AND form with popcount correction (one digital add per partial sum, Horowitz int8 add 0.03 pJ). Array
    area: SpikeSim's 65 nm SRAM crossbar area 671.089 µm²; ADC area SpikeSim's 4-bit ADC (8 columns share one).
    System periphery (buffers, H-tree, fetch, neuron, shift-subtract), tile organisation, clock and schedule:
    SpikeSim's 65 nm constants (the macro paper reports the array only; system level is 10-100x worse).
    The analog first layer streams 8 input bit-planes per timestep.
    """
    e = _spikesim_energy()
    e.xbar_read_pj, e.adc_pj, e.mux_pj = 2 * 64 * 64 / 403.0, 0.0, 0.0
    a = _spikesim_area()
    a.xbar_um2 = 671.089
    return HardwareConfig(
        name="xnor-sram-65nm", description="binary XNOR/AND-SRAM macro (403 TOPS/W) + SpikeSim 65 nm periphery",
        technology_nm=65, device="sram", xbar_rows=64, xbar_cols=64, mapping="unrolled",
        sign_handling="popcount", pe_per_tile=8, clock_mhz=250.0, pe_cycle_clocks=26, pipeline_overlap=0.75,
        cols_per_adc=8, adc_steps_per_pe_cycle=1, sample_and_hold=True, sub_ops_per_step=16, adc_bits=4,
        adc_ref_bits=4, analog_input_bits=8, weight_cell_bits=1, fp_weight_bits=8, membrane_area_layers=None,
        energy=e, area=a,
        sources={"xbar_read_pj": "XNOR-SRAM, Yin et al., JSSC 2020: 403 TOPS/W (65 nm) -> 2*64*64/403 pJ",
                 "xbar_um2": _SPIKESIM + " (SRAM crossbar area)", "periphery, area, schedule": _SPIKESIM,
                 "digital_add_pj, mac_pj, ac_pj": _HOROWITZ},
        # the macro figure is REFERENCE.md §5's; SpikeSim's periphery is verified as SpikeSim's (reproduced exactly),
        # not as this macro's system: the schedule (PE cycle, overlap) is SpikeSim's RRAM one, unchecked for SRAM
        unverified=["pe_cycle_clocks", "pipeline_overlap"])


@PRESETS.register("isaac-rram-32nm")
def isaac_rram_32nm() -> HardwareConfig:
    """An ISAAC-like 32 nm RRAM design (Shafiee et al., ISCA 2016), run with SpikeSim's cost structure.

    From ISAAC's parameter table (32 nm, 1.2 GHz, 100 ns crossbar read, IMA = 8 arrays of 128x128 + 8 ADCs,
    tile = 12 IMAs): array read 2.4 mW/8 x 100 ns = 30 pJ; 1-bit DAC (row driver) 4 mW/(8·128) x 100 ns
    = 0.39 pJ per row; 8-bit ADC 16 mW/8 at 1.28 GS/s = 1.5625 pJ per conversion, one ADC per array serving all
    128 columns after sample-and-hold (128 steps); shift-and-add 0.2 mW/4 units /1.2 GHz = 0.0417 pJ per op;
    output register 0.23 mW / 1.2 GHz = 0.19 pJ per write; input register 1.24 mW/8 x 100 ns = 15.5 pJ per
    array read (mem fetch); eDRAM tile buffer 20.7 mW x 100 ns / 96 arrays = 21.6 pJ; bus 7 mW + router
    42 mW/4 -> 17.5 mW x 100 ns / 96 = 18.2 pJ (H-tree). Areas: array 0.0002/8 mm² = 25 µm², ADC
    0.0096/8 mm² = 1200 µm², tile S+A 12·0.00024 mm² = 2880 µm², IMA registers 12·(0.0021+0.00077) mm²
    = 34440 µm², eDRAM 0.083 + tile OR 0.0032 mm² = 86200 µm², bus + router/4 = 127750 µm²; buffers at ISAAC's
    eDRAM density 0.083 mm²/64 KB = 0.158 µm² per bit. Not in ISAAC (reused, unscaled SpikeSim 65 nm values,
    an upper bound): the IF neuron 5.096 pJ. PE = one array (unrolled mapping), 96 per tile; spikes x ±1
    weights on paired columns; analog first layer streamed as 8 bit-planes (ISAAC is bit-serial).
    """
    e = EnergyTable(xbar_read_pj=30.0, row_driver_pj=4.0 / (8 * 128) * 100.0, adc_pj=16.0 / 8 / 1.28,
                    mux_pj=0.0, sub_pj=0.2 / 4 / 1.2, temp_buff_pj=0.23 / 1.2, tile_buff_pj=20.7 * 100 / 96,
                    htree_pj=(7.0 + 42.0 / 4) * 100 / 96, mem_fetch_pj=1.24 / 8 * 100, neuron_pj=1.274 * 4.0)
    a = AreaTable(xbar_um2=0.0002e6 / 8, adc_um2=0.0096e6 / 8, mux_um2=0.0, sub_um2=12 * 0.00024e6,
                  temp_buff_um2=12 * (0.0021 + 0.00077) * 1e6, tile_buff_um2=(0.083 + 0.0032) * 1e6,
                  htree_um2=(0.09 + 0.151 / 4) * 1e6, sram_bit_um2=0.083e6 / (64 * 1024 * 8),
                  input_buffer_bits=22, membrane_bits=22)
    return HardwareConfig(
        name="isaac-rram-32nm", description="ISAAC-like (ISCA 2016) 32 nm RRAM, 128x128, 8-bit ADC per array",
        technology_nm=32, device="rram", xbar_rows=128, xbar_cols=128, mapping="unrolled", sign_handling="paired",
        pe_per_tile=96, clock_mhz=1200.0, pe_cycle_clocks=120, pipeline_overlap=0.75, cols_per_adc=128,
        adc_steps_per_pe_cycle=128, sample_and_hold=True, sub_ops_per_step=1, adc_bits=8, adc_ref_bits=8,
        analog_input_bits=8, weight_cell_bits=2, fp_weight_bits=8, membrane_area_layers=None, energy=e, area=a,
        sources={"energy, area, architecture": _ISAAC, "neuron_pj, schedule overlap": _SPIKESIM,
                 "digital_add_pj, mac_pj, ac_pj": _HOROWITZ},
        # ISAAC's table was transcribed without the paper at hand; only the ADC figure (≈1.56 pJ) is confirmed by
        # REFERENCE.md §5. The IF neuron and the schedule overlap are SpikeSim's 65 nm values, unscaled to 32 nm.
        unverified=["xbar_read_pj", "row_driver_pj", "sub_pj", "temp_buff_pj", "tile_buff_pj", "htree_pj",
                    "mem_fetch_pj", "neuron_pj", "xbar_um2", "adc_um2", "sub_um2", "temp_buff_um2", "tile_buff_um2",
                    "htree_um2", "sram_bit_um2", "pipeline_overlap"])


@PRESETS.register("digital-45nm")
def digital_45nm() -> HardwareConfig:
    """Digital baseline with Horowitz's 45 nm energies (ISSCC 2014): E_MAC = 3.7 + 0.9 = 4.6 pJ (fp32 mult +
    add), E_AC = 0.9 pJ (fp32 add). SNN energy = Σ_l ops_l · rate_l · T · E_AC (analog-input layer: E_MAC every
    timestep), ANN energy = Σ_l ops_l · E_MAC. Energy only: memory traffic, latency and area are not modelled
    (reported as null)."""
    return HardwareConfig(name="digital-45nm", description="digital baseline, Horowitz 45 nm op energies",
                          technology_nm=45, device="digital", energy=EnergyTable(),
                          sources={"mac_pj, ac_pj, digital_add_pj": _HOROWITZ})


def list_presets() -> list[str]:
    """Names of the registered hardware presets."""
    return PRESETS.names()


def hardware_from_dict(d: dict) -> HardwareConfig:
    """Build a validated :class:`HardwareConfig` from a nested dict; ``preset: NAME`` starts from that preset.

    Unknown keys raise :class:`bsnn.ConfigError` listing the valid keys.
    """
    d = dict(d or {})
    base = d.pop("preset", None)
    start = preset(base).to_dict() if base else {}
    for key, value in d.items():
        if key in ("energy", "area") and isinstance(value, dict):
            start.setdefault(key, {}).update(value)
        else:
            start[key] = value
    hw = from_dict(start, HardwareConfig)
    return hw


def preset(name: str, overrides: list[str] | dict | None = None) -> HardwareConfig:
    """A named preset (fresh copy), optionally with dotted overrides (``["xbar_rows=128", "energy.adc_pj=1"]``)
    or a dict of changes (nested ``energy`` / ``area`` dicts change only the keys they name).

    Raises:
        ConfigError: unknown preset (the message lists the valid names) or invalid override.
    """
    hw = PRESETS.get(name)().validate()
    if not overrides:
        return hw
    if isinstance(overrides, dict):
        return hardware_from_dict({"preset": name, **overrides})
    return hardware_from_dict(apply_overrides(hw.to_dict(), list(overrides)))


def load_hardware_config(path: str | Path, overrides: list[str] | None = None) -> HardwareConfig:
    """Load a hardware YAML file (optionally ``preset: NAME`` + changed fields) and apply dotted overrides."""
    d = read_yaml_mapping(path, "hardware config", "see configs/hardware/ for examples")
    return hardware_from_dict(apply_overrides(d, list(overrides or [])))


def resolve_hardware(hw: "HardwareConfig | str | Path") -> HardwareConfig:
    """A :class:`HardwareConfig` from a config, a preset name or a YAML path."""
    if isinstance(hw, HardwareConfig):
        return hw.validate()
    s = str(hw)
    if s.endswith((".yaml", ".yml")) or Path(s).is_file():
        return load_hardware_config(s)
    return preset(s)


PARTITIONS = ("spikesim", "unrolled")


@dataclass
class ConstraintConfig:
    """Hardware non-idealities for simulation (None = that part stays ideal).

    Attributes:
        xbar_rows: crossbar rows (row-group size).
        mapping: ``"spikesim"`` or ``"unrolled"`` row partition (see module docstring).
        adc_bits: signed ADC resolution (sign bit included); None = exact partial sums.
        adc_range: ADC full scale, |partial sum| in input units; None = rows per conversion.
        membrane_bits: fixed-point membrane width (sign included); None = float membrane.
        membrane_frac_bits: fractional bits of the membrane (and of the bias it accumulates).
        threshold_frac_bits: fractional bits of the threshold; None = membrane_frac_bits.
    """

    xbar_rows: int = 64
    mapping: str = "spikesim"
    adc_bits: Union[int, None] = 4
    adc_range: Union[float, None] = None
    membrane_bits: Union[int, None] = None
    membrane_frac_bits: int = 8
    threshold_frac_bits: Union[int, None] = None

    def validate(self) -> "ConstraintConfig":
        if self.xbar_rows < 1:
            raise ConfigError(f"constraints.xbar_rows must be >= 1, got {self.xbar_rows}")
        if self.mapping not in PARTITIONS:
            raise ConfigError(f"constraints.mapping must be one of {PARTITIONS}, got {self.mapping!r}")
        if self.adc_bits is not None and self.adc_bits < 2:
            raise ConfigError(f"constraints.adc_bits must be >= 2 (sign + magnitude) or null, got {self.adc_bits}")
        if self.adc_range is not None and not self.adc_range > 0:
            raise ConfigError(f"constraints.adc_range must be > 0 or null, got {self.adc_range}")
        if self.membrane_bits is not None and self.membrane_bits <= self.membrane_frac_bits:
            raise ConfigError(f"constraints.membrane_bits ({self.membrane_bits}) must exceed membrane_frac_bits "
                              f"({self.membrane_frac_bits}) (one sign bit at least)")
        if self.membrane_frac_bits < 0 or (self.threshold_frac_bits is not None and self.threshold_frac_bits < 0):
            raise ConfigError("constraints: fractional bits must be >= 0")
        return self

    @classmethod
    def from_hardware(cls, hw, **changes) -> "ConstraintConfig":
        """Crossbar rows, mapping and ADC bits (+1 sign bit for popcount/paired sign handling, whose ADCs
        read unsigned counts) of a :class:`~bsnn.hardware.config.HardwareConfig`; ``changes`` override."""
        sign = 0 if hw.sign_handling == "none" else 1
        return cls(**{"xbar_rows": hw.xbar_rows, "mapping": hw.mapping, "adc_bits": hw.adc_bits + sign,
                      **changes}).validate()


# ------------------------------------------------------------------------------------------ pure math


@dataclass
class CostConfig:
    """In-memory-hardware cost report added by ``bsnn run`` (see :mod:`bsnn.hardware`).

    Attributes:
        enabled: write ``cost.{json,md,png}`` after the sweep.
        preset: hardware preset (``spikesim-rram-65nm``, ``xnor-sram-65nm``, ``isaac-rram-32nm``, ``digital-45nm``).
        timesteps: T at which to cost the network (None: the operating point, the smallest simulated T within
            ``accuracy_tolerance`` points of the ANN).
        accuracy_tolerance: accuracy points below the ANN that count as reaching it (operating point).
        mode: ``event_driven`` (measured spike counts) or ``dense`` (every crossbar read every timestep).
    """

    enabled: bool = True
    preset: str = "spikesim-rram-65nm"
    timesteps: Union[int, None] = None
    accuracy_tolerance: float = 1.0
    mode: str = "event_driven"

    def validate(self) -> None:
        _check(self.preset in list_presets(), f"cost.preset must be one of {list_presets()}, got {self.preset!r}")
        _check(self.mode in ("dense", "event_driven"), f"cost.mode must be 'dense' or 'event_driven', got {self.mode!r}")
        _check(self.timesteps is None or (isinstance(self.timesteps, int) and not isinstance(self.timesteps, bool)
                                          and self.timesteps >= 1),
               f"cost.timesteps must be a positive integer or null (the operating point), got {self.timesteps!r}")
        _check(isinstance(self.accuracy_tolerance, (int, float)) and not isinstance(self.accuracy_tolerance, bool)
               and 0 <= self.accuracy_tolerance < 100,
               f"cost.accuracy_tolerance must be a number of accuracy points in [0, 100), got "
               f"{self.accuracy_tolerance!r}")
