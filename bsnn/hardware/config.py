"""Hardware descriptions for the in-memory-computing (IMC) cost model: dataclasses, named presets, YAML.

Every physical quantity carries its unit in its name (``_pj`` picojoule, ``_um2`` square micrometre, ``_mhz``,
``_ns``); every preset constant cites its source — the paper's table or the simulator's file and line, and whether
it is the source's value, derived from it (arithmetic shown), a modelling choice or unverified (with why) — in the
preset's ``sources`` mapping, repeated as comments in ``configs/hardware/NAME.yaml`` (:func:`preset_yaml`). The cost formulas that use these
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

import yaml


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
            resolutions (Walden figure of merit, energy per conversion ∝ 2^ENOB), or by the source's own scaling
            (``HardwareConfig.adc_scaling_pj``).
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
        adc_scaling_pj: energy per conversion by resolution from a source's own ADC scaling (bits -> pJ; only
            the ratios are used: ``adc_pj · table[adc_bits] / table[adc_ref_bits]``); None = Walden's figure of
            merit, ``adc_pj · 2^(adc_bits − adc_ref_bits)``.
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
        sources: constant key (``xbar_rows``, ``energy.adc_pj``: the override syntax) -> ``"[status] citation"``
            with the status one of :data:`SOURCE_STATUS` (verified, derived with its arithmetic, a modelling
            choice, user-set, unverified with why); ``cost.md`` lists them (section "Sources of the constants").
        unverified: the constants not checked against their source (the ``[unverified]`` keys of ``sources``);
            every cost report and ``bsnn cost`` name them.
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
    adc_scaling_pj: Union[dict, None] = None
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
        """Energy of one conversion at ``adc_bits``: ``adc_pj · 2^(adc_bits − adc_ref_bits)`` (Walden FOM), or
        ``adc_pj · adc_scaling_pj[adc_bits] / adc_scaling_pj[adc_ref_bits]`` when the source gives its scaling."""
        if self.adc_scaling_pj:
            table = self._adc_table()
            return self.energy.adc_pj * table[self.adc_bits] / table[self.adc_ref_bits]
        return self.energy.adc_pj * 2.0 ** (self.adc_bits - self.adc_ref_bits)

    def _adc_table(self) -> dict[int, float]:
        """``adc_scaling_pj`` with int keys (JSON turns them into strings); {} when a key or value is malformed."""
        try:
            return {int(k): float(v) for k, v in (self.adc_scaling_pj or {}).items()
                    if not isinstance(v, bool) and not isinstance(k, bool)}
        except (TypeError, ValueError):
            return {}

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
        if self.adc_scaling_pj is not None:
            raw, table = self.adc_scaling_pj, self._adc_table()
            check(isinstance(raw, dict) and len(table) == len(raw) > 0 and all(
                k >= 1 and math.isfinite(v) and v > 0 for k, v in table.items()),
                f"adc_scaling_pj must map ADC bits (int >= 1) to energies > 0 (pJ) or be null, got {raw!r}")
            for name in ("adc_bits", "adc_ref_bits"):
                check(getattr(self, name) in table,
                      f"{name}={getattr(self, name)} is outside adc_scaling_pj (bits {sorted(table)}): pick one of "
                      "those, or set adc_scaling_pj=null for Walden scaling 2^(bits - adc_ref_bits)")
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

#: the status tags that open every entry of ``HardwareConfig.sources``: ``verified`` (the source states this value),
#: ``derived`` (computed from values the source states; the arithmetic is in the entry), ``choice`` (a modelling
#: choice of bsnn, not a published constant), ``user`` (set by a YAML file or an override), ``unverified`` (with
#: why; these keys form ``HardwareConfig.unverified``, named in every cost report)
SOURCE_STATUS = ("verified", "derived", "choice", "user", "unverified")


def _src(status: str, text: str) -> str:
    """One ``sources`` entry: ``[status] text`` (``status`` may carry a note: ``unverified: op count``)."""
    assert status.split(":", 1)[0] in SOURCE_STATUS, status
    return f"[{status}] {text}"


def source_status(entry: str) -> str:
    """The status tag of a ``sources`` entry (``[derived] ...`` -> ``derived``; untagged -> ``unverified``)."""
    tag = str(entry)[1:].split("]", 1)[0].split(":", 1)[0].strip() if str(entry).startswith("[") else ""
    return tag if tag in SOURCE_STATUS else "unverified"


def unverified_keys(sources: dict) -> list[str]:
    """The keys of ``sources`` whose entry is not verified, derived, a choice or user-set."""
    return [k for k, v in sources.items() if source_status(v) == "unverified"]


# SpikeSim (Moitra et al., "SpikeSim: An end-to-end Compute-in-Memory Hardware Evaluation Tool for Benchmarking
# Spiking Neural Networks", IEEE TCAD 2023), read at commit c2627bc of
# github.com/Intelligent-Computing-Lab-Yale/SpikeSim
_SS = "SpikeSim ela_spikesim.py"  # SNN_train_infer_quantization_ela/ela_spikesim.py
_SS_NICE = "SpikeSim NICE_Evaluation/hw_inference.py"
_HOROWITZ = "Horowitz, ISSCC 2014, 45 nm (REFERENCE.md §5)"
# ISAAC (Shafiee et al., ISCA 2016) Table I "ISAAC parameters", as transcribed with page citations in
# dyigitpolat/mimarsinan src/mimarsinan/deployment_record/platform_physics/profiles/isaac_like.md, cross-checked
# against two simulators' ISAAC component models: thu-nics/MNSIM-2.0 MNSIM/Hardware_Model/{ADC,DAC}.py (commit
# ca39ccb) and Accelergy-Project/hwcomponents-library hwcomponents_library/library/isaac.py (commit 8b56f7e).
# Table I powers are group totals per IMA (8 arrays) or per tile (12 IMAs); one crossbar read = one 100 ns cycle
# (§IV), in which the IMA makes 8 arrays x 128 columns = 1024 ADC conversions (§V): energy per event = group power
# x 100 ns / events per cycle.
_T1 = "ISAAC Table I"
_MNSIM = "MNSIM-2.0 MNSIM/Hardware_Model"
_ACC = "Accelergy hwcomponents-library isaac.py"
_CYCLE_NS = 100.0  # ISAAC §IV: one cycle = one crossbar read = 100 ns
# ISAAC's SAR ADC scaled to other resolutions by its own method (§VII), pJ per conversion at 32 nm, as tabulated by
# Accelergy hwcomponents-library isaac.py L308-314
_ISAAC_ADC_SCALING_PJ = {4: 0.79, 5: 0.99, 6: 1.20, 7: 1.42, 8: 1.67, 9: 1.969078145, 10: 2.379022742}
_CONV_PER_IMA_CYCLE = 8 * 128  # 8 arrays x 128 columns, each converted once per cycle
_NEUROSIM = "NeuroSim DNN_NeuroSim_V1.3 Inference_pytorch/NeuroSIM/Param.cpp"  # commit 388f421
_XNOR_XBAR_UM2 = 64 * 64 * 160 * 0.065 ** 2  # 64x64 SRAM cells of 160 F^2 at F = 65 nm
_XNOR = ("Yin, Jiang, Seo, Seok, 'XNOR-SRAM: In-Memory Computing SRAM Macro for Binary/Ternary Deep Neural "
         "Networks', IEEE JSSC 2020, doi 10.1109/JSSC.2019.2963616, abstract")


def _spikesim_energy() -> EnergyTable:
    return EnergyTable(xbar_read_pj=1.76423, row_driver_pj=0.0, adc_pj=2.03084, mux_pj=0.094245, sub_pj=1.15e-6,
                       temp_buff_pj=0.2, tile_buff_pj=397.0, htree_pj=19.64 * 8, mem_fetch_pj=4.64,
                       neuron_pj=1.274 * 4.0)


def _spikesim_area() -> AreaTable:
    return AreaTable(xbar_um2=26.2144, adc_um2=693.633, mux_um2=45.9, sub_um2=13411.41498,
                     temp_buff_um2=484.643999, tile_buff_um2=0.7391 * 64 * 128, htree_um2=216830 * 2,
                     sram_bit_um2=0.7391, input_buffer_bits=22, membrane_bits=22)


_HOROWITZ_SOURCES = {
    "energy.digital_add_pj": _src("verified", f"0.03 pJ, 8-bit integer add ({_HOROWITZ})"),
    "energy.mac_pj": _src("derived", f"3.7 (fp32 mult) + 0.9 (fp32 add) = 4.6 pJ ({_HOROWITZ})"),
    "energy.ac_pj": _src("verified", f"0.9 pJ, fp32 add ({_HOROWITZ})"),
}

_SPIKESIM_PERIPHERY = {
    "energy.sub_pj": _src("verified", f"Sub = 1.15E-6 pJ: {_SS} L46"),
    "energy.temp_buff_pj": _src("verified", f"Temp_Buff = 0.2 pJ: {_SS} L45"),
    "energy.tile_buff_pj": _src("verified", f"Tile_buff = 397 pJ: {_SS} L44"),
    "energy.htree_pj": _src("verified", f"Htree = 19.64 * 8 pJ: {_SS} L49"),
    "energy.mem_fetch_pj": _src("verified", f"mem_fetch = 4.64 pJ: {_SS} L52"),
    "energy.neuron_pj": _src("verified", f"neuron = 1.274 * 4.0 pJ: {_SS} L53"),
    "area.sub_um2": _src("verified", f"Sub = 13411.41498 um2: {_SS} L82"),
    "area.temp_buff_um2": _src("verified", f"Temp_Buff = 484.643999 um2: {_SS} L81"),
    "area.tile_buff_um2": _src("verified", f"Tile_buff = 0.7391 * 64 * 128 um2: {_SS} L80"),
    "area.htree_um2": _src("verified", f"Htree = 216830 * 2 um2: {_SS} L85"),
    "area.sram_bit_um2": _src("verified", f"0.7391 um2 per SRAM bit (input buffers, membranes): {_SS} L93, L96"),
    "area.input_buffer_bits": _src("verified", f"22 bits per stored input: {_SS} L93 ('* 0.7391 * 22')"),
    "area.membrane_bits": _src("verified", f"22 bits per membrane: {_SS} L96"),
}

_SPIKESIM_SCHEDULE = {
    "pe_per_tile": _src("verified", f"pe_per_tile = 8: {_SS} L206"),
    "clock_mhz": _src("verified", f"clk_freq = 250 MHz: {_SS} L208"),
    "pe_cycle_clocks": _src("verified", f"PE_cycle = 26 * (1000 / clk_freq) ns: {_SS} L209"),
    "pipeline_overlap": _src("verified", f"cp = [0.75, ...] (next layer starts at 75 %): {_SS} L158, L164"),
}


def _spikesim_sources() -> dict:
    return {
        "xbar_rows": _src("verified", f"xbar_size = 64 (square crossbar): {_SS} L204"),
        "xbar_cols": _src("verified", f"xbar_size = 64: {_SS} L204"),
        "mapping": _src("verified", f"a PE holds k*k crossbars ('k * k * xbar_ar'), channels on rows, "
                                    f"ceil(Cin/X)*ceil(Cout/X) PEs: {_SS} L10, L55"),
        "sign_handling": _src("verified", f"signed weights in the array, no sign-correction term: {_SS} L55-57"),
        **_SPIKESIM_SCHEDULE,
        "cols_per_adc": _src("derived", f"xbar_size / 8 ADC(+MUX) per crossbar read ('(xbar_size / 8) * (ADC + "
                                        f"MUX)') = one ADC per 8 columns: {_SS} L55"),
        "adc_steps_per_pe_cycle": _src("verified", f"null = SpikeSim's X/8 sequential reads per PE cycle "
                                                   f"('xbar_size / 8 * PE_ar'): {_SS} L56"),
        "sample_and_hold": _src("verified", f"false: the array is read at each of the X/8 steps "
                                            f"('xbar_size / 8 * PE_ar', PE_ar contains k*k*xbar_ar): {_SS} L55-56"),
        "sub_ops_per_step": _src("verified", f"'(xbar_size / 8) * 16 * Sub': {_SS} L56"),
        "adc_bits": _src("verified", f"--ADC_precision default 4: {_SS_NICE} L25 (and the README's command)"),
        "adc_ref_bits": _src("verified", f"E_ADC is SpikeSim's 4-bit ADC (--ADC_precision 4): {_SS_NICE} L25"),
        "adc_scaling_pj": _src("choice", f"null: Walden scaling 2^(bits - 4) for other resolutions (SpikeSim costs "
                                         f"one fixed 4-bit ADC: {_SS} L47)"),
        "analog_input_bits": _src("verified", f"null: every layer, the first included, costs one pass per "
                                              f"timestep ('* time_steps'): {_SS} L65"),
        "first_layer": _src("verified", f"per_step: the first layer is read every timestep like the others: {_SS} "
                                        "L62-67"),
        "weight_cell_bits": _src("verified", f"null: one cell per weight (PEs from channel counts only): {_SS} L63"),
        "membrane_area_layers": _src("verified", f"membrane memory for out_ch_list[0:5]: {_SS} L95-96"),
        "energy.xbar_read_pj": _src("verified", f"xbar_ar = 1.76423 pJ (device 'rram'): {_SS} L40"),
        "energy.row_driver_pj": _src("verified", f"0: no row-driver term in SpikeSim's PE energy: {_SS} L55-57"),
        "energy.adc_pj": _src("verified", f"ADC = 2.03084 pJ: {_SS} L47"),
        "energy.mux_pj": _src("verified", f"MUX = 0.094245 pJ: {_SS} L51"),
        **_SPIKESIM_PERIPHERY,
        "area.xbar_um2": _src("verified", f"xbar_ar = 26.2144 um2 (device 'rram'): {_SS} L76"),
        "area.adc_um2": _src("verified", f"ADC = 693.633 um2: {_SS} L83"),
        "area.mux_um2": _src("verified", f"MUX = 45.9 um2: {_SS} L87"),
        **_HOROWITZ_SOURCES,
    }


@PRESETS.register("spikesim-rram-65nm")
def spikesim_rram_65nm() -> HardwareConfig:
    """SpikeSim's analytical model, RRAM, 65 nm: the reference the ``dense`` mode reproduces exactly.

    Every constant is read from SpikeSim's code (github.com/Intelligent-Computing-Lab-Yale/SpikeSim, commit c2627bc,
    ``SNN_train_infer_quantization_ela/ela_spikesim.py``; ``sources`` gives the line of each): energies pJ E_xbar
    1.76423, E_ADC 2.03084 (4-bit, ``NICE_Evaluation/hw_inference.py`` default, 8 columns share one ADC), E_MUX
    0.094245, E_htree 19.64·8, E_mem_fetch 4.64, E_neuron 1.274·4, E_sub 1.15e-6, E_temp_buff 0.2, E_tile_buff 397;
    areas µm² crossbar 26.2144, ADC 693.633, MUX 45.9, Sub 13411.41498, Temp_Buff 484.643999, Tile_buff
    0.7391·64·128, H-tree 216830·2, SRAM 0.7391 per bit with 22-bit entries, membrane memory for the first 5
    layers. Architecture: 64x64 crossbars, k² crossbars per PE, 8 PEs per tile, 250 MHz, PE cycle 26 clocks, 0.75
    pipeline overlap, 16 subtractions per step. SpikeSim's SRAM crossbar *energy* (671.089 pJ, L42) equals its SRAM
    area constant (L78) and is likely a copy error: not used. Digital-baseline energies (mac/ac/add) are
    Horowitz's 45 nm figures.
    """
    sources = _spikesim_sources()
    return HardwareConfig(
        name="spikesim-rram-65nm", description="SpikeSim analytical model (TCAD 2023), 65 nm RRAM, 64x64",
        technology_nm=65, device="rram", xbar_rows=64, xbar_cols=64, mapping="spikesim", sign_handling="none",
        pe_per_tile=8, clock_mhz=250.0, pe_cycle_clocks=26, pipeline_overlap=0.75, cols_per_adc=8,
        adc_steps_per_pe_cycle=None, sample_and_hold=False, sub_ops_per_step=16, adc_bits=4, adc_ref_bits=4,
        analog_input_bits=None, weight_cell_bits=None, membrane_area_layers=5,
        energy=_spikesim_energy(), area=_spikesim_area(), sources=sources, unverified=unverified_keys(sources))


def _xnor_sources() -> dict:
    return {
        "xbar_rows": _src("choice", "64 rows for comparability with SpikeSim; the XNOR-SRAM macro turns on all 256 "
                                    f"rows at once ({_XNOR}); its per-op energy is used as size-independent"),
        "xbar_cols": _src("choice", "64 columns (the macro has 64: 256x64 = 16 Kb)"),
        "mapping": _src("choice", "unrolled: one array per PE, rows = Cin*k*k (a macro computes one dot product "
                                  "per column)"),
        "sign_handling": _src("choice", "popcount: spikes {0,1} x weights ±1 as 2*popcount(s AND w) - popcount(s) "
                                        "(REFERENCE.md §5); the macro itself computes ternary XNOR"),
        "pe_per_tile": _SPIKESIM_SCHEDULE["pe_per_tile"],
        "clock_mhz": _SPIKESIM_SCHEDULE["clock_mhz"],
        "pe_cycle_clocks": _src("unverified", "SpikeSim's RRAM PE cycle (26 clocks at 250 MHz, ela_spikesim.py "
                                              "L209) reused for the SRAM macro; the macro's own read time is "
                                              "not checked here"),
        "pipeline_overlap": _src("unverified", "SpikeSim's 0.75 (ela_spikesim.py L158), a schedule of its RRAM "
                                               "system, reused unchecked for this SRAM system"),
        "cols_per_adc": _src("choice", f"8 columns share one ADC (SpikeSim's sharing, ela_spikesim.py L55; "
                                       f"NeuroSim's default numColMuxed = 8, {_NEUROSIM} L147); the "
                                       f"macro's ADC is 'column-multiplexed' ({_XNOR}) at a ratio not checked here; "
                                       "area only (the macro energy includes its ADCs)"),
        "adc_steps_per_pe_cycle": _src("choice", "1: the macro figure is per whole array read"),
        "sample_and_hold": _src("choice", "true: the array is read once per PE cycle (the macro figure is per "
                                          "read)"),
        "sub_ops_per_step": _src("verified", "16 subtractions per step: SpikeSim ela_spikesim.py L56"),
        "adc_bits": _src("derived", f"an 11-level flash ADC ({_XNOR}): ceil(log2 11) = 4 bits"),
        "adc_ref_bits": _src("choice", "4 (= adc_bits; adc_pj is 0, so the reference resolution has no effect)"),
        "adc_scaling_pj": _src("choice", "null: adc_pj is 0 (the macro figure includes its ADCs)"),
        "analog_input_bits": _src("choice", "8: the analog first layer streams 8 input bit-planes per timestep"),
        "first_layer": _src("choice", "per_step: the analog first layer is read every timestep"),
        "weight_cell_bits": _src("choice", "1: one SRAM cell per bit"),
        "membrane_area_layers": _src("choice", "null: membrane memory for every layer"),
        "energy.xbar_read_pj": _src("unverified: op count",
                                    f"403 TOPS/W for ternary XNOR-and-accumulate at 0.6 V, 65 nm ({_XNOR}) -> "
                                    "1/403 pJ per op; 2 ops (XNOR + accumulate) per cell and 64x64 cells per read: "
                                    "2*64*64/403 = 20.33 pJ, ADCs included. 403 TOPS/W is verified; that the paper "
                                    "counts 2 ops per XAC (bsnn's TOPS/W convention) is not: with 1 op the read "
                                    "costs half"),
        "energy.row_driver_pj": _src("choice", "0: inside the macro figure"),
        "energy.adc_pj": _src("choice", "0: inside the macro figure (403 TOPS/W includes the flash ADCs)"),
        "energy.mux_pj": _src("choice", "0: inside the macro figure"),
        **_SPIKESIM_PERIPHERY,
        "area.xbar_um2": _src("unverified: cell size",
                              f"64*64 cells x 160 F^2 at F = 65 nm = {_XNOR_XBAR_UM2:.1f} um2: 160 F^2 is NeuroSim's "
                              f"SRAM cell above 22 nm ({_NEUROSIM} L152) and the cell SpikeSim's SRAM crossbar area "
                              "is built from (ela_spikesim.py L78, whose 671.089 um2 is that array at F = 32 nm, not "
                              "65 nm; bsnn used it until issue #18). The XNOR-SRAM bitcell has more transistors than "
                              "a 6T cell, so this is a lower bound; its area was not found in a public source"),
        "area.adc_um2": _src("unverified", "693.633 um2 is SpikeSim's 4-bit ADC (ela_spikesim.py L83), not the "
                                           "macro's 11-level flash ADC"),
        "area.mux_um2": _src("verified", "MUX = 45.9 um2: SpikeSim ela_spikesim.py L87 (SpikeSim's mux)"),
        **_HOROWITZ_SOURCES,
    }


@PRESETS.register("xnor-sram-65nm")
def xnor_sram_65nm() -> HardwareConfig:
    """A binary XNOR/AND-SRAM macro (65 nm) inside SpikeSim's 65 nm system periphery.

    Macro: 403 TOPS/W for ternary XNOR-and-accumulate at 0.6 V (XNOR-SRAM, Yin et al., IEEE JSSC 2020, abstract:
    256 rows on at once, column-multiplexed 11-level flash ADC, 65 nm), so one full 64x64 array read (2·64·64 ops,
    ADCs included) costs 2·64·64/403 = 20.33 pJ — assuming 2 ops per XAC, which is not checked (unverified);
    ``adc_pj`` and ``mux_pj`` are therefore 0 (inside the macro figure). The 64x64 size is bsnn's choice for
    comparability with SpikeSim (the per-op figure is used as size-independent). Spikes {0,1} x weights ±1 use
    the AND form with popcount correction (one digital add per partial sum, Horowitz int8 add 0.03 pJ). ADC
    resolution: 11 levels -> 4 bits. Array area: 64x64 SRAM cells of 160 F² at F = 65 nm (NeuroSim's SRAM cell
    rule, the one SpikeSim's SRAM area uses at F = 32 nm) = 2769 µm², a lower bound for the XNOR cell; ADC area
    SpikeSim's 4-bit ADC (both unverified for this macro). System periphery (buffers, H-tree, fetch, neuron, shift-subtract),
    tile organisation and clock: SpikeSim's 65 nm constants, each read from ``ela_spikesim.py``; its PE cycle and
    pipeline overlap are SpikeSim's RRAM schedule (unverified for SRAM). The analog first layer streams 8 input
    bit-planes per timestep. ``sources`` cites every constant.
    """
    e = _spikesim_energy()
    e.xbar_read_pj, e.adc_pj, e.mux_pj = 2 * 64 * 64 / 403.0, 0.0, 0.0
    a = _spikesim_area()
    a.xbar_um2 = _XNOR_XBAR_UM2
    sources = _xnor_sources()
    return HardwareConfig(
        name="xnor-sram-65nm", description="binary XNOR/AND-SRAM macro (403 TOPS/W) + SpikeSim 65 nm periphery",
        technology_nm=65, device="sram", xbar_rows=64, xbar_cols=64, mapping="unrolled",
        sign_handling="popcount", pe_per_tile=8, clock_mhz=250.0, pe_cycle_clocks=26, pipeline_overlap=0.75,
        cols_per_adc=8, adc_steps_per_pe_cycle=1, sample_and_hold=True, sub_ops_per_step=16, adc_bits=4,
        adc_ref_bits=4, analog_input_bits=8, weight_cell_bits=1, fp_weight_bits=8, membrane_area_layers=None,
        energy=e, area=a, sources=sources, unverified=unverified_keys(sources))


def _isaac_energy() -> EnergyTable:
    """Per-event energies from ISAAC's Table I powers (see :func:`isaac_rram_32nm`), pJ = mW x ns."""
    c, n = _CYCLE_NS, _CONV_PER_IMA_CYCLE
    return EnergyTable(xbar_read_pj=2.4 / 8 * c, row_driver_pj=4.0 / (8 * 128) * c, adc_pj=16.0 / 8 / 1.28,
                       mux_pj=0.010 * c / n, sub_pj=0.2 * c / n, temp_buff_pj=0.23 * c / n,
                       tile_buff_pj=(20.7 + 1.68) * c / 96, htree_pj=(7.0 + 42.0 / 4) * c / 96,
                       mem_fetch_pj=1.24 / 8 * c, neuron_pj=1.274 * 4.0)


def _isaac_area() -> AreaTable:
    """Per-instance areas from ISAAC's Table I (mm² x 1e6 = µm²)."""
    return AreaTable(xbar_um2=0.0002e6 / 8, adc_um2=0.0096e6 / 8, mux_um2=0.00004e6 / 8, sub_um2=12 * 0.00024e6,
                     temp_buff_um2=12 * (0.0021 + 0.00077) * 1e6, tile_buff_um2=(0.083 + 0.0032) * 1e6,
                     htree_um2=(0.090 + 0.151 / 4) * 1e6, sram_bit_um2=0.083e6 / (64 * 1024 * 8),
                     input_buffer_bits=22, membrane_bits=22)


def _isaac_sources() -> dict:
    per_conv = "x 100 ns / 1024 conversions per IMA cycle"
    return {
        "xbar_rows": _src("verified", f"128x128 arrays ({_T1}: memristor array size; §VIII-A ISAAC-CE)"),
        "xbar_cols": _src("verified", f"128 ({_T1})"),
        "mapping": _src("choice", "unrolled: one array per PE, rows = Cin*k*k (ISAAC maps unrolled kernels)"),
        "sign_handling": _src("choice", "paired positive/negative columns; ISAAC itself biases weights by 2^15 and "
                                        "adds a unit column (§V), closer to bsnn's 'popcount'"),
        "pe_per_tile": _src("derived", f"12 IMAs per tile x 8 arrays per IMA = 96 ({_T1})"),
        "clock_mhz": _src("verified", f"'ISAAC Tile at 1.2 GHz' ({_T1} header)"),
        "pe_cycle_clocks": _src("derived", "one crossbar read = 100 ns (§IV) = 120 clocks at 1.2 GHz"),
        "pipeline_overlap": _src("unverified", "SpikeSim's layer overlap 0.75 (ela_spikesim.py L158); ISAAC's own "
                                               "pipeline (§VI, Fig. 4b) is not modelled"),
        "cols_per_adc": _src("derived", f"8 ADCs for 8 arrays per IMA ({_T1}): one ADC per array, all 128 columns "
                                        "(§V: 'a single 1.28 GSps ADC unit')"),
        "adc_steps_per_pe_cycle": _src("derived", "128 bitlines converted one after another per 100 ns cycle (§V)"),
        "sample_and_hold": _src("verified", f"8x128 sample-and-holds per IMA ({_T1}; §V)"),
        "sub_ops_per_step": _src("derived", "one shift-and-add per ADC output (§V)"),
        "adc_bits": _src("verified", f"8-bit ADC ({_T1}; {_MNSIM}/ADC.py L55)"),
        "adc_ref_bits": _src("verified", f"adc_pj is the 8-bit ADC's ({_T1})"),
        "adc_scaling_pj": _src("derived", "ISAAC §VII scales its SAR ADC with resolution: vref buffer, memory and "
                                          "clock linearly, the capacitive DAC exponentially (after Saberi et al. "
                                          f"2011); the resulting 32 nm energies, 4-10 bits, as tabulated in {_ACC} "
                                          "L308-314 (4 bits 0.79 ... 8 bits 1.67 ... 10 bits 2.38 pJ); only the "
                                          "ratios are used: a 4-bit conversion costs 0.47x the 8-bit one (Walden's "
                                          "2^-4 would say 0.06x)"),
        "analog_input_bits": _src("choice", "8 bit-planes of an 8-bit image (ISAAC streams 16-bit inputs over 16 "
                                            "cycles, §V)"),
        "first_layer": _src("choice", "per_step: the analog first layer is read every timestep"),
        "weight_cell_bits": _src("verified", f"2 bits per cell ({_T1})"),
        "fp_weight_bits": _src("choice", "8-bit full-precision layers (ISAAC uses 16-bit weights, §V)"),
        "membrane_area_layers": _src("choice", "null: membrane memory for every layer"),
        "energy.xbar_read_pj": _src("derived", f"memristor arrays 2.4 mW per IMA of 8 ({_T1}) x 100 ns / 8 = 30 pJ"),
        "energy.row_driver_pj": _src("derived", f"1-bit DACs 4 mW per IMA of 8x128 ({_T1}) x 100 ns / 1024 = 0.3906 "
                                                f"pJ; per DAC 3.9 uW in {_MNSIM}/DAC.py L63 ({_ACC} L652: 0.4167 pJ "
                                                "over a 106.7 ns read)"),
        "energy.adc_pj": _src("derived", f"ADCs 16 mW per IMA of 8 ({_T1}) = 2 mW per ADC at 1.28 GS/s (§V) = "
                                         f"1.5625 pJ; {_MNSIM}/ADC.py L71 (2 mW), L94 (1.28 GS/s); {_ACC} L298 takes "
                                         "the table's 1.2 GS/s: 1.667 pJ"),
        "energy.mux_pj": _src("derived", f"the sample-and-hold read per conversion: S+H 10 uW per IMA ({_T1}) "
                                         f"{per_conv} = 0.00098 pJ"),
        "energy.sub_pj": _src("derived", f"shift-and-add 0.2 mW per IMA (4 units, {_T1}; {_ACC} L469) {per_conv} = "
                                         "0.0195 pJ per shift-add (was 0.2/4/1.2 = 0.0417 pJ: one op per unit per "
                                         "1.2 GHz clock, 4.8 Gop/s, fewer than the 10.24 GS/s the ADCs deliver)"),
        "energy.temp_buff_pj": _src("derived", f"output register 256 B, 0.23 mW per IMA ({_T1}) {per_conv} = "
                                               "0.0225 pJ per write (was 0.23/1.2 = 0.19 pJ, which charged an IMA "
                                               "8.5x the table's OR power)"),
        "energy.tile_buff_pj": _src("derived", f"eDRAM 20.7 mW + tile output register 1.68 mW per tile ({_T1}; "
                                               f"eDRAM also {_ACC} L23) x 100 ns / 96 arrays = 23.3 pJ per array "
                                               "read (was 21.6 pJ, the OR left out while its area was counted)"),
        "energy.htree_pj": _src("derived", f"eDRAM-IMA bus 7 mW + router 42 mW shared by 4 tiles ({_T1}; {_ACC} "
                                           "L551, L207) x 100 ns / 96 = 18.2 pJ"),
        "energy.mem_fetch_pj": _src("derived", f"input register 2 KB, 1.24 mW per IMA ({_T1}) x 100 ns / 8 arrays = "
                                               "15.5 pJ per array read"),
        "energy.neuron_pj": _src("unverified", "ISAAC has no IF neuron (its sigmoid unit is a shared CNN unit); "
                                               "SpikeSim's 65 nm 5.096 pJ (ela_spikesim.py L53) reused unscaled, an "
                                               "upper bound at 32 nm"),
        "area.xbar_um2": _src("derived", f"memristor arrays 0.0002 mm² per IMA of 8 ({_T1}) = 25 um2 (one "
                                         "significant figure in the table)"),
        "area.adc_um2": _src("derived", f"0.0096 mm² per IMA of 8 ADCs ({_T1}) = 1200 um2; {_MNSIM}/ADC.py L34; "
                                        f"{_ACC} L300"),
        "area.mux_um2": _src("derived", f"sample-and-holds 0.00004 mm² per IMA ({_T1}) / 8 arrays = 5 um2"),
        "area.sub_um2": _src("derived", f"IMA shift-and-add 0.00024 mm² x 12 IMAs ({_T1}) = 2880 um2 per tile "
                                        "(the tile's own 60 um2 S+A left out)"),
        "area.temp_buff_um2": _src("derived", f"IMA input register 0.0021 + output register 0.00077 mm², x 12 "
                                              f"({_T1}) = 34440 um2 per tile"),
        "area.tile_buff_um2": _src("derived", f"eDRAM 0.083 + tile output register 0.0032 mm² ({_T1}; eDRAM {_ACC} "
                                              "L20) = 86200 um2"),
        "area.htree_um2": _src("derived", f"bus 0.090 + router 0.151 / 4 tiles mm² ({_T1}) = 127750 um2"),
        "area.sram_bit_um2": _src("derived", f"eDRAM density: 0.083 mm² / 64 KB ({_T1}) = 0.158 um2 per bit"),
        "area.input_buffer_bits": _src("choice", "22 bits per stored value (SpikeSim's width, ela_spikesim.py L93)"),
        "area.membrane_bits": _src("choice", "22 bits per membrane (SpikeSim's width, ela_spikesim.py L96)"),
        **_HOROWITZ_SOURCES,
    }


@PRESETS.register("isaac-rram-32nm")
def isaac_rram_32nm() -> HardwareConfig:
    """An ISAAC-like 32 nm RRAM design (Shafiee et al., ISCA 2016), run with SpikeSim's cost structure.

    From ISAAC's Table I (32 nm, tile at 1.2 GHz, 100 ns crossbar read, IMA = 8 arrays of 128x128 with 2-bit
    cells + 8 ADCs, tile = 12 IMAs; powers and areas are group totals per IMA or per tile), each event's energy
    is the group's power x 100 ns / the events per cycle (8 arrays x 128 conversions = 1024 per IMA): array read
    2.4 mW/8 -> 30 pJ; 1-bit DAC (row driver) 4 mW/1024 -> 0.39 pJ per row; 8-bit ADC 16 mW/8 at 1.28 GS/s
    -> 1.5625 pJ per conversion, one ADC per array serving all 128 columns after sample-and-hold (S+H 10 µW/1024
    -> 0.001 pJ per conversion, the ``mux`` line); shift-and-add 0.2 mW/1024 -> 0.0195 pJ per op; output
    register 0.23 mW/1024 -> 0.0225 pJ per write; input register 1.24 mW/8 -> 15.5 pJ per array read (mem fetch);
    eDRAM + tile output register (20.7 + 1.68) mW / 96 arrays -> 23.3 pJ; bus 7 mW + router 42 mW/4 -> 17.5 mW
    / 96 -> 18.2 pJ (H-tree). Areas: array 0.0002/8 mm² = 25 µm², ADC 0.0096/8 mm² = 1200 µm², S+H 5 µm² per
    array, tile S+A 12·0.00024 mm² = 2880 µm², IMA registers 12·(0.0021+0.00077) mm² = 34440 µm², eDRAM 0.083 +
    tile OR 0.0032 mm² = 86200 µm², bus + router/4 = 127750 µm²; buffers at ISAAC's eDRAM density 0.083 mm²/64 KB
    = 0.158 µm² per bit. At full activity a tile then draws 12·24.08 + 39.9 ≈ 329 mW plus the neurons (Table I:
    330 mW). Not in ISAAC (reused, unscaled SpikeSim 65 nm values, an upper bound): the IF neuron 5.096 pJ and
    the pipeline overlap. Other ADC resolutions (4-10 bits) scale by ISAAC's own SAR-ADC scaling (§VII; energies
    as tabulated by Accelergy), not by Walden's 2^bits. PE = one array (unrolled mapping), 96 per tile; spikes x ±1
    weights on paired columns; analog first layer streamed as 8 bit-planes (ISAAC is bit-serial). ``sources``
    cites every constant (Table I as transcribed in dyigitpolat/mimarsinan, cross-checked with MNSIM-2.0's and
    Accelergy's ISAAC component models).
    """
    sources = _isaac_sources()
    return HardwareConfig(
        name="isaac-rram-32nm", description="ISAAC-like (ISCA 2016) 32 nm RRAM, 128x128, 8-bit ADC per array",
        technology_nm=32, device="rram", xbar_rows=128, xbar_cols=128, mapping="unrolled", sign_handling="paired",
        pe_per_tile=96, clock_mhz=1200.0, pe_cycle_clocks=120, pipeline_overlap=0.75, cols_per_adc=128,
        adc_steps_per_pe_cycle=128, sample_and_hold=True, sub_ops_per_step=1, adc_bits=8, adc_ref_bits=8,
        adc_scaling_pj=dict(_ISAAC_ADC_SCALING_PJ), analog_input_bits=8, weight_cell_bits=2, fp_weight_bits=8,
        membrane_area_layers=None,
        energy=_isaac_energy(), area=_isaac_area(), sources=sources, unverified=unverified_keys(sources))


@PRESETS.register("digital-45nm")
def digital_45nm() -> HardwareConfig:
    """Digital baseline with Horowitz's 45 nm energies (ISSCC 2014): E_MAC = 3.7 + 0.9 = 4.6 pJ (fp32 mult +
    add), E_AC = 0.9 pJ (fp32 add). SNN energy = Σ_l ops_l · rate_l · T · E_AC (analog-input layer: E_MAC every
    timestep), ANN energy = Σ_l ops_l · E_MAC. Energy only: memory traffic, latency and area are not modelled
    (reported as null)."""
    sources = dict(_HOROWITZ_SOURCES)
    return HardwareConfig(name="digital-45nm", description="digital baseline, Horowitz 45 nm op energies",
                          technology_nm=45, device="digital", energy=EnergyTable(), sources=sources,
                          unverified=unverified_keys(sources))


def list_presets() -> list[str]:
    """Names of the registered hardware presets."""
    return PRESETS.names()


def hardware_from_dict(d: dict) -> HardwareConfig:
    """Build a validated :class:`HardwareConfig` from a nested dict; ``preset: NAME`` starts from that preset.

    A cited constant whose value differs from the preset's gets the source ``[user] ...`` (naming the preset's
    value and citation) and leaves ``unverified``, unless the dict gives its own ``sources`` entry for it.
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
    return _mark_user_values(hw, preset(base), set((d.get("sources") or {}))) if base else hw


def _value(hw: HardwareConfig, key: str):
    """The value of a dotted constant key (``energy.adc_pj``, ``xbar_rows``) of ``hw``; None if it has none."""
    node = hw
    for part in key.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def _mark_user_values(hw: HardwareConfig, base: HardwareConfig, explicit: set) -> HardwareConfig:
    """Re-cite the constants of ``hw`` that differ from the preset ``base`` as user-set (see
    :func:`hardware_from_dict`)."""
    changed = [k for k in base.sources if k not in explicit and _value(hw, k) != _value(base, k)]
    for k in changed:
        hw.sources[k] = _src("user", f"{_value(hw, k)!r}, set by a YAML file or an override (the preset "
                                     f"{base.name} has {_value(base, k)!r}: {base.sources[k]})")
    hw.unverified = [k for k in hw.unverified if k not in changed]
    return hw


def preset(name: str, overrides: list[str] | dict | None = None) -> HardwareConfig:
    """A named preset (fresh copy), optionally with dotted overrides (``["xbar_rows=128", "energy.adc_pj=1"]``)
    or a dict of changes (nested ``energy`` / ``area`` dicts change only the keys they name). Changed constants
    are cited as user-set (:func:`hardware_from_dict`).

    Raises:
        ConfigError: unknown preset (the message lists the valid names) or invalid override.
    """
    hw = PRESETS.get(name)().validate()
    if not overrides:
        return hw
    if isinstance(overrides, dict):
        return hardware_from_dict({"preset": name, **overrides})
    d = apply_overrides(hw.to_dict(), list(overrides))
    explicit = {k for k, v in (d.get("sources") or {}).items() if hw.sources.get(k) != v}
    return _mark_user_values(hardware_from_dict(d), hw, explicit)


def load_hardware_config(path: str | Path, overrides: list[str] | None = None) -> HardwareConfig:
    """Load a hardware YAML file (optionally ``preset: NAME`` + changed fields) and apply dotted overrides."""
    d = read_yaml_mapping(path, "hardware config", "see configs/hardware/ for examples")
    return hardware_from_dict(apply_overrides(d, list(overrides or [])))


_YAML_HEAD = """Hardware preset {name!r} (bsnn.hardware.preset({name!r})); every field can be changed here or
with `bsnn cost --hw-config THIS.yaml key=value`. Units are in the field names. Written by
bsnn.hardware.config.preset_yaml({name!r}); the preset function is the reference.
"""
_YAML_KEY = """The comment above a constant cites its source, as `sources` below does: [verified] the source states the
value, [derived] computed from the source's values (the arithmetic is given), [choice] a modelling choice of bsnn,
[unverified] not checked, with why (these form `unverified`; `bsnn cost` names them in every report)."""


def _comment(text: str, indent: str = "", width: int = 118) -> list[str]:
    """``text`` as ``#`` comment lines wrapped to ``width`` (blank lines kept)."""
    out = []
    for para in text.strip("\n").split("\n\n"):
        words, line = " ".join(para.split()).split(" "), ""
        for w in words:
            if line and len(indent) + 2 + len(line) + 1 + len(w) > width:
                out.append(f"{indent}# {line}")
                line = w
            else:
                line = f"{line} {w}" if line else w
        out.append(f"{indent}# {line}".rstrip())
        out.append(f"{indent}#")
    return out[:-1]


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def preset_yaml(name: str) -> str:
    """The YAML file of preset ``name`` (``configs/hardware/NAME.yaml``): every field, the source of each cited
    constant as a comment above it, then the ``sources`` mapping and the ``unverified`` list. Loading it gives
    the preset back (``load_hardware_config(path) == preset(name)``)."""
    hw = preset(name)
    doc = (PRESETS.get(name).__doc__ or "").strip()
    lines = _comment(_YAML_HEAD.format(name=name)) + ["#"] + _comment(doc) + ["#"] + _comment(_YAML_KEY)
    d = hw.to_dict()
    for key, value in d.items():
        if key in ("sources", "unverified"):
            continue
        if key in ("energy", "area"):
            lines.append(f"{key}:")
            for sub, v in value.items():
                if f"{key}.{sub}" in hw.sources:
                    lines += _comment(hw.sources[f"{key}.{sub}"], indent="  ")
                lines.append(f"  {sub}: {_scalar(v)}")
            continue
        if key in hw.sources:
            lines += _comment(hw.sources[key])
        lines.append(f"{key}: {_scalar(value)}")
    lines.append(yaml.safe_dump({"sources": hw.sources}, allow_unicode=True, sort_keys=False, width=116).rstrip())
    lines.append("# the constants not checked against their source (bsnn cost names them in every report)")
    lines.append(f"unverified: {_scalar(list(hw.unverified))}")
    return "\n".join(lines) + "\n"


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
