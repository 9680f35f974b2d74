"""Energy, latency and area of a (binary spiking) network on an IMC accelerator -> :class:`CostReport`.

Two modes, always labelled in the report:

``dense``
    Every crossbar is read at every timestep (SpikeSim's analytical model; energy and latency ∝ T, independent
    of spikes). Per PE cycle (one PE, one output position, one pass), pJ, with n_adc = ceil(cols/cols_per_adc),
    s = conversion steps (SpikeSim: X/8), a = array reads (s, or 1 with sample-and-hold), k² = crossbars per PE::

        xbar = a·k²·E_xbar (+ a·k²·rows·E_row_driver)      adc = s·n_adc·E_ADC     mux = s·n_adc·E_MUX
        shift_add = s·16·E_sub    temp_buffer = s·E_temp    + E_htree + E_mem_fetch + E_neuron + E_tile_buff

    which for SpikeSim (a = s = n_adc = X/8) is exactly ``E_htree + E_mem_fetch + E_neuron + (X/8)·PE_ar +
    (X/8)·16·E_sub + (X/8)·E_temp_buff + E_tile_buff`` with ``PE_ar = k²·E_xbar + (X/8)·(E_ADC + E_MUX)``.
    Layer energy = PEs·H_out·W_out·passes·T·PE_cycle (+ sign correction), PEs = ceil(Cin/X)·ceil(Cout/X).

``event_driven``
    Costs follow the spike counts measured in simulation, per layer and per timestep: with r_t the input spike
    rate of the layer at step t, the row-driven parts (array read, row drivers) scale with r_t (energy ∝ active
    rows), and every other per-PE-cycle part is paid only when the PE has at least one active input row, with
    probability p_t = 1 − (1 − r_t)^rows_per_pe (rows assumed independent: spike counts carry no spatial pattern;
    clustered spikes leave more reads silent than this predicts). At r_t = 1 it equals ``dense``; it is monotone
    in r_t; each rate multiplies each event once. Zero-padding rows count as rows (as in ``dense``).
    Analog-input layers stay dense. Latency is the same schedule as ``dense`` (a synchronous pipeline).

Latency (SpikeSim's pipelined schedule, both modes): ``[Σ_{l<L} int(overlap·H_l·W_l·C_l)·T + H_L·W_L·C_L·T] ·
t_PE`` (C, H, W = output channels and the layer's costed output positions; t_PE = 26 clocks at 250 MHz). Area:
``tiles·tile_area + Σ Cin·H_in·W_in·A_bit·22 + Σ_{first 5 layers} Cout·H·W·A_bit·22`` (see ``area_breakdown``).

Beyond {0, 1} spikes and T real steps (both charged where the network has them):

* layers fed by burst (up to Γ spikes per step) or signed spikes take ``input_passes`` crossbar passes per
  timestep (bit-serial counts: ``ceil(log2(Γ + 1))``; signed: one pass per polarity), in energy and latency;
  event-driven, each pass is charged at rate ``r_t / passes`` — an upper bound, as the rows set over the passes
  are at most the spike events and ``p_t`` is concave;
* a run-time offset correction's pre-steps (:mod:`bsnn.snn.offset`: COS ρ, SRP τ) are computed by every layer
  before the T counted: energy over ``T + pre-steps`` steps (the pre-steps at the input rates of the first real
  steps), latency over ``T + SimResult.pre_steps``.

Also reported side by side: the same network as an ANN on the same hardware (bit-serial activations of b bits:
b dense passes, no timesteps) and the digital baseline (Horowitz 45 nm: ANN Σ MACs·E_MAC; SNN
Σ MACs·rate·T·E_AC, analog-input layer at E_MAC every step).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

from bsnn.errors import ConfigError
from bsnn.hardware.config import HardwareConfig, preset, resolve_hardware
from bsnn.report import markdown_table
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.offset import latency_pre_steps, network_correction, work_pre_steps
from bsnn.hardware.mapping import (LayerMapping, LayerSpec, PoolSpec, count_tiles, map_layer, resolve_layers,
                                   resolve_pools)

MODES = ("dense", "event_driven")
ROW_DRIVEN = ("xbar", "row_drivers")


# ------------------------------------------------------------------------------------------ activity
@dataclass
class Activity:
    """Measured input activity: synaptic layer -> input spike rate at each timestep (spikes / neuron / step),
    or one constant rate for every timestep. A rate is at most 1 for {0, 1} spikes; burst spikes count every spike
    of a burst, so their rate can reach Γ.

    Layers absent from ``rates`` (the analog-input layer) are costed dense.
    """

    rates: dict = field(default_factory=dict)
    samples: int = 0
    source: str = ""

    def steps(self, name: str, T: int) -> list[float] | None:
        """The first ``T`` per-timestep rates of layer ``name`` (None: not measured -> dense)."""
        r = self.rates.get(name)
        if r is None:
            return None
        if isinstance(r, (int, float)):
            r = [float(r)] * T
        if len(r) < T:
            raise ConfigError(f"activity of layer {name!r} covers {len(r)} timesteps, cost asked for T={T}; "
                              "simulate to at least T")
        return [float(max(0.0, v)) for v in r[:T]]

    def mean(self, name: str, T: int) -> float | None:
        r = self.steps(name, T)
        return None if r is None else sum(r) / T

    @classmethod
    def uniform(cls, layers: list[LayerSpec], rate: float | list[float], T: int) -> "Activity":
        """Every spiking layer at ``rate`` (a constant or one value per timestep) — for architecture studies."""
        per_t = list(rate) if isinstance(rate, (list, tuple)) else [float(rate)] * T
        return cls({s.name: per_t for s in layers if not s.analog_input}, source=f"uniform rate {rate}")


def activity_from_sim(layers: list[LayerSpec], result) -> Activity:
    """Per-layer, per-timestep input rates from a :class:`bsnn.simulate.SimResult` (or its ``to_dict()``).

    The rate of a layer fed by IF layers S at step t is Σ_S spike_counts[s][t] / (Σ_S neurons[s] · samples)
    (spike counts are summed over samples; several sources = a residual add or concatenation).
    """
    d = result if isinstance(result, dict) else result.to_dict()
    for key in ("spike_counts", "neurons", "samples"):
        if key not in d:
            raise ConfigError(f"simulation result lacks {key!r}; expected SimResult.to_dict() (sweep.json)")
    counts, neurons, samples = d["spike_counts"], d["neurons"], int(d["samples"])
    rates = {}
    for s in layers:
        if s.analog_input or not s.input_neurons:
            continue
        missing = [n for n in s.input_neurons if n not in counts]
        if missing:
            raise ConfigError(f"layer {s.name!r} is fed by IF layer(s) {missing} absent from the simulation result "
                              f"(has {sorted(counts)})")
        n_tot = sum(int(neurons[n]) for n in s.input_neurons) * max(1, samples)
        steps = min(len(counts[n]) for n in s.input_neurons)
        rates[s.name] = [sum(counts[n][t] for n in s.input_neurons) / n_tot for t in range(steps)]
    return Activity(rates, samples, source="simulation")


def _resolve_activity(layers: list[LayerSpec], activity) -> Activity | None:
    if activity is None or isinstance(activity, Activity):
        return activity
    if isinstance(activity, dict) and "spike_counts" not in activity:
        return Activity({k: (list(v) if isinstance(v, (list, tuple)) else float(v)) for k, v in activity.items()})
    return activity_from_sim(layers, activity)


# ------------------------------------------------------------------------------------------- energy
def pe_cycle_energy_pj(hw: HardwareConfig, xbars_per_pe: int) -> dict[str, float]:
    """Energy of one PE cycle by component, pJ (module docstring; SpikeSim's ``PE_cycle_energy``)."""
    e, s, n_adc = hw.energy, hw.adc_steps, hw.adcs_per_pe
    reads = 1 if hw.sample_and_hold else s
    return {"xbar": reads * xbars_per_pe * e.xbar_read_pj,
            "row_drivers": reads * xbars_per_pe * hw.xbar_rows * e.row_driver_pj,
            "adc": s * n_adc * hw.adc_energy_pj, "mux": s * n_adc * e.mux_pj,
            "shift_add": s * hw.sub_ops_per_step * e.sub_pj, "temp_buffer": s * e.temp_buff_pj,
            "htree": e.htree_pj, "mem_fetch": e.mem_fetch_pj, "neuron": e.neuron_pj, "tile_buffer": e.tile_buff_pj}


def sign_correction_pj(spec: LayerSpec, m: LayerMapping, hw: HardwareConfig) -> float:
    """Digital sign handling per output position per pass, pJ.

    popcount: popcount(s) of every input row (≈ rows/8 int8 adds) + one subtraction per partial sum;
    paired: one subtraction (pos − neg) per partial sum; none: 0 (signed cells).
    """
    if hw.sign_handling == "none":
        return 0.0
    subtract = spec.out_channels * m.row_groups * hw.energy.digital_add_pj
    if hw.sign_handling == "paired":
        return subtract
    rows = (spec.in_channels // spec.groups) * spec.kernel_area * spec.groups
    return subtract + rows / 8.0 * hw.energy.digital_add_pj


def passes_per_step(spec: LayerSpec, hw: HardwareConfig, ann_bits: int | None = None) -> int:
    """Crossbar passes per timestep (SNN) or per inference (ANN, bit-serial ``ann_bits``-bit activations).

    A spiking layer takes ``spec.input_passes`` passes per step: 1 for {0, 1} spikes, more for burst
    (bit-serial spike counts) or signed spikes (one pass per polarity)."""
    if spec.analog_input:
        return hw.analog_input_bits or (ann_bits or 1)
    return ann_bits or spec.input_passes


def layer_energy_pj(spec: LayerSpec, m: LayerMapping, hw: HardwareConfig, T: int,
                    rates: list[float] | None = None, ann_bits: int | None = None) -> dict[str, float]:
    """Energy of one layer for one sample over ``T`` timesteps, by component, pJ.

    Args:
        rates: per-timestep input rates (event-driven); None = dense (every array read every step).
        ann_bits: cost as a bit-serial ANN instead (T must be 1).
    """
    if spec.analog_input and ann_bits is None and hw.first_layer == "digital":  # MACs on a digital core, once
        return {"first_layer_digital": spec.macs * hw.energy.mac_pj}
    if spec.analog_input and ann_bits is None and hw.first_layer == "once":  # bit-serial once, current held
        T, ann_bits = 1, hw.analog_input_bits or 8
    per_pos = pe_cycle_energy_pj(hw, m.xbars_per_pe)
    scale = m.pes * spec.positions * passes_per_step(spec, hw, ann_bits)
    sign = sign_correction_pj(spec, m, hw) * spec.positions * passes_per_step(spec, hw, ann_bits)
    step = {k: v * scale for k, v in per_pos.items()}
    step["sign_correction"] = sign
    if rates is None or spec.analog_input:
        return {k: v * T for k, v in step.items()}
    out = dict.fromkeys(step, 0.0)
    passes = passes_per_step(spec, hw)
    for r in rates[:T]:
        # P > 1 passes per step (burst / signed inputs): each pass at rate r/P. The rows active over the P passes
        # are at most the spike events r (a burst of k sets popcount(k) <= k bit-plane rows; a ±1 spike one
        # polarity's row), and p_active is concave in the rate, so this bounds both parts from above.
        r = min(1.0, r / passes)
        p_active = 1.0 - (1.0 - r) ** m.rows_per_pe
        for k, v in step.items():
            out[k] += v * (r if k in ROW_DRIVEN else p_active)
    return out


def digital_energy_pj(spec: LayerSpec, T: int, hw: HardwareConfig, rates: list[float] | None = None,
                      ann: bool = False) -> dict[str, float]:
    """Horowitz digital baseline for one layer, one sample: ANN MACs·E_MAC; SNN Σ_t MACs·r_t·E_AC (the rate
    multiplies once), the analog-input layer at E_MAC every timestep."""
    e = hw.energy
    if ann:
        return {"mac": spec.macs * e.mac_pj, "ac": 0.0}
    if spec.analog_input:
        return {"mac": spec.macs * T * e.mac_pj, "ac": 0.0}
    events = spec.macs * (T if rates is None else sum(rates[:T]))
    return {"mac": 0.0, "ac": events * e.ac_pj}


def maxpool_energy_pj(pool: PoolSpec, T: int, hw: HardwareConfig) -> dict[str, float]:
    """A spiking max-pool over ``T`` timesteps, one sample: one counter increment per input per step (an upper
    bound: every input spiking), ``window − 1`` comparisons and one subtraction per output per step, each one
    digital 8-bit add."""
    ops = T * (pool.inputs + pool.outputs * pool.window)
    return {"maxpool": ops * hw.energy.digital_add_pj}


def maxpool_area_um2(pools: list[PoolSpec], hw: HardwareConfig) -> float:
    """SRAM for the max-pools' state: a counter per input and the last pooled count per output, each
    ``membrane_bits`` wide."""
    return sum(p.inputs + p.outputs for p in pools) * hw.area.sram_bit_um2 * hw.area.membrane_bits


# ------------------------------------------------------------------------------------ latency, area
def layer_cycles(spec: LayerSpec) -> int:
    """SpikeSim's PE cycles per layer per timestep: H_out·W_out·C_out."""
    return spec.positions * spec.out_channels


def latency_ns(layers: list[LayerSpec], hw: HardwareConfig, T: int, ann_bits: int | None = None
               ) -> tuple[float, list[tuple[float, float]]]:
    """Pipelined latency (SpikeSim ``latency_gen``): total ns and per-layer (start_ns, busy_ns).

    Layer l starts after int(overlap·cycles_j)·steps_j PE cycles of every earlier layer j; the total is the
    end of the last layer. steps = T·passes (SNN) or passes (bit-serial ANN, ``ann_bits``).
    """
    t_pe, start, spans = hw.pe_cycle_ns, 0, []
    for spec in layers:
        steps = T * passes_per_step(spec, hw, ann_bits)
        busy = layer_cycles(spec) * steps
        spans.append((start * t_pe, busy * t_pe))
        start += int(hw.pipeline_overlap * layer_cycles(spec)) * steps
    end = spans[-1][0] + spans[-1][1] if spans else 0.0
    return end, spans


def area_breakdown_um2(layers: list[LayerSpec], maps: list[LayerMapping], hw: HardwareConfig) -> dict[str, float]:
    """Area by component, µm² (SpikeSim ``compute_area``): tiles of ``pe_per_tile`` PEs, each PE with the
    largest k² (or 1) crossbars and n_adc ADC+MUX; per tile n_adc subtractors, temp and tile buffers, H-tree;
    input buffers for every layer; membrane memory for the first ``membrane_area_layers`` layers."""
    a, tiles, n_adc = hw.area, count_tiles(maps, hw), hw.adcs_per_pe
    xbars = max(m.xbars_per_pe for m in maps)
    pe_slots = tiles * hw.pe_per_tile
    bit = a.sram_bit_um2
    mem_layers = layers if hw.membrane_area_layers is None else layers[:hw.membrane_area_layers]
    return {"xbar": pe_slots * xbars * a.xbar_um2, "adc": pe_slots * n_adc * a.adc_um2,
            "mux": pe_slots * n_adc * a.mux_um2, "shift_add": tiles * n_adc * a.sub_um2,
            "temp_buffer": tiles * a.temp_buff_um2, "tile_buffer": tiles * a.tile_buff_um2,
            "htree": tiles * a.htree_um2,
            "input_buffer": sum(s.in_activations for s in layers) * bit * a.input_buffer_bits,
            "membrane": sum(s.neurons for s in mem_layers) * bit * a.membrane_bits}


# ----------------------------------------------------------------------------------------- reports
@dataclass
class LayerCost:
    """One layer's cost for one inference (one sample, T timesteps)."""

    name: str
    kind: str
    energy_pj: float
    latency_ns: float | None
    start_ns: float | None
    area_um2: float | None
    breakdown_pj: dict
    input_rate: float | None
    macs: int
    pes: int
    crossbars: int
    utilisation: float
    adc_bits_exact: int
    mapping: dict = field(default_factory=dict)


@dataclass
class CostTotal:
    """Network totals. TOPS/W = 2·MACs of one inference (ANN-equivalent work) / energy (ops per pJ)."""

    energy_pj: float
    latency_ns: float | None
    area_um2: float | None
    edp_pj_ns: float | None
    tops_per_w: float
    breakdown_pj: dict
    area_breakdown_um2: dict = field(default_factory=dict)
    pes: int = 0
    tiles: int = 0
    crossbars: int = 0


@dataclass
class CostReport:
    """Result of :func:`estimate`: per-layer and total cost in one labelled mode, plus comparisons.

    ``comparisons`` maps a label (``snn_dense_imc``, ``snn_event_driven_imc``, ``ann_bit_serial_imc``,
    ``digital_snn``, ``digital_ann``) to totals and ``energy_ratio`` = this report's energy / theirs
    (< 1: this report's network is cheaper).
    """

    hardware: str
    mode: str
    timesteps: int
    layers: list
    total: CostTotal
    comparisons: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    operating_point: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        """Per-layer table, totals and comparisons as markdown."""
        head = f"## {self.hardware}: mode `{self.mode}`, T={self.timesteps}\n\n"
        if self.operating_point:
            head += f"Operating point: {self.operating_point['reason']}.\n\n"
        rows = [[l.name, l.kind, l.pes, l.crossbars, round(l.utilisation, 3),
                 None if l.input_rate is None else round(l.input_rate, 4), f"{l.energy_pj:.4g}",
                 None if l.latency_ns is None else f"{l.latency_ns:.4g}",
                 None if l.area_um2 is None else f"{l.area_um2:.4g}"] for l in self.layers]
        t = self.total
        rows.append(["**total**", "", t.pes, t.crossbars, "", "", f"{t.energy_pj:.4g}",
                     None if t.latency_ns is None else f"{t.latency_ns:.4g}",
                     None if t.area_um2 is None else f"{t.area_um2:.4g}"])
        out = head + markdown_table(["layer", "kind", "PEs", "crossbars", "utilisation", "input rate",
                                     "energy (pJ)", "latency (ns)", "area (µm²)"], rows)
        out += f"\ntiles {t.tiles}; EDP {t.edp_pj_ns if t.edp_pj_ns is None else f'{t.edp_pj_ns:.4g}'} pJ·ns; " \
               f"{t.tops_per_w:.4g} TOPS/W (2·MACs per inference / energy)\n\n"
        tot = sum(t.breakdown_pj.values()) or 1.0
        out += markdown_table(["component", "energy (pJ)", "share (%)"],
                              [[k, f"{v:.4g}", 100.0 * v / tot] for k, v in t.breakdown_pj.items()])
        if self.comparisons:
            out += "\n" + markdown_table(
                ["comparison", "energy (pJ)", "latency (ns)", "EDP (pJ·ns)", f"this / it ({self.mode})"],
                [[k, f"{c['energy_pj']:.4g}", None if c["latency_ns"] is None else f"{c['latency_ns']:.4g}",
                  None if c["edp_pj_ns"] is None else f"{c['edp_pj_ns']:.4g}", f"{c['energy_ratio']:.3g}"]
                 for k, c in self.comparisons.items()])
        if self.notes:
            out += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return out


def _sum(parts: list[dict]) -> dict:
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _imc(layers, maps, hw, T, activity, ann_bits=None):
    per_layer = [layer_energy_pj(s, m, hw, T, activity.steps(s.name, T) if activity else None, ann_bits)
                 for s, m in zip(layers, maps)]
    total, spans = latency_ns(layers, hw, T, ann_bits)
    return per_layer, total, spans


def _totals(energy_parts, latency, area_parts, macs, maps, hw, tiles) -> CostTotal:
    bd = _sum(energy_parts)
    energy = sum(bd.values())
    area = sum(area_parts.values()) if area_parts else None
    return CostTotal(energy_pj=energy, latency_ns=latency, area_um2=area,
                     edp_pj_ns=None if latency is None else energy * latency,
                     tops_per_w=2.0 * macs / energy if energy > 0 else 0.0, breakdown_pj=bd,
                     area_breakdown_um2=area_parts or {}, pes=sum(m.pes for m in maps), tiles=tiles,
                     crossbars=sum(m.crossbars for m in maps))


def _entry(label_desc: str, energy: float, latency: float | None, area: float | None, ref: float) -> dict:
    return {"description": label_desc, "energy_pj": energy, "latency_ns": latency, "area_um2": area,
            "edp_pj_ns": None if latency is None else energy * latency, "energy_ratio": ref / energy if energy else
            float("inf")}


def estimate(network, activity=None, hw: HardwareConfig | str = "spikesim-rram-65nm", *, timesteps: int | None = None,
             mode: str | None = None, ann_bits: int | None = None, compare: bool = True,
             pools: list[PoolSpec] | None = None, pre_steps: tuple[int, int] | None = None) -> CostReport:
    """Cost of one inference (one sample) of ``network`` on ``hw``.

    Args:
        network: a converted :class:`~bsnn.snn.network.SpikingNetwork`, a list of :class:`LayerSpec`, or a
            layer-table CSV path.
        activity: a :class:`~bsnn.simulate.SimResult` (or its ``to_dict()``, e.g. ``sweep.json``), an
            :class:`Activity`, a dict layer -> per-step rates, or None.
        hw: a :class:`HardwareConfig`, a preset name or a YAML path.
        timesteps: T (default: the largest simulated T).
        mode: ``"dense"`` or ``"event_driven"`` (default: event_driven when activity is given, else dense).
        ann_bits: activation bits of the bit-serial ANN comparison (default ⌈log2(T+1)⌉, the resolution of a
            T-step rate code).
        compare: add the dense/event-driven, bit-serial ANN and digital-baseline comparisons.
        pools: the spiking max-pools (default: those of ``network`` when it is a SpikingNetwork).
        pre_steps: ``(steps every layer computes, steps before real step 1)`` of a run-time offset correction
            (default: the network's own, :func:`network_pre_steps`; none for layer tables).

    Returns:
        :class:`CostReport`; energies pJ, latencies ns, areas µm², EDP pJ·ns, all per sample.
    """
    hw = resolve_hardware(hw)
    layers = resolve_layers(network)
    pools = resolve_pools(network) if pools is None else pools
    act = _resolve_activity(layers, activity)
    if timesteps is None:
        if isinstance(activity, dict) and "timesteps" in activity:
            timesteps = max(int(t) for t in activity["timesteps"])
        elif hasattr(activity, "timesteps"):
            timesteps = max(activity.timesteps)
        else:
            raise ConfigError("estimate: pass timesteps=T (no simulation result to take it from)")
    if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral) or timesteps < 1:
        raise ConfigError(f"estimate: timesteps must be a positive integer, got {timesteps!r}")
    T = int(timesteps)
    mode = mode or ("event_driven" if act is not None else "dense")
    if mode not in MODES:
        raise ConfigError(f"estimate: mode must be one of {MODES}, got {mode!r}")
    if mode == "event_driven" and act is None:
        raise ConfigError("estimate: mode 'event_driven' needs measured activity (a SimResult, sweep.json or "
                          "Activity); use mode='dense' for an activity-independent estimate")
    # a run-time offset correction (COS, SRP) computes pre-steps before the T counted: every layer works
    # T + pre_work steps (energy), and real step 1 comes pre_latency steps late (latency)
    pre_work, pre_latency = network_pre_steps(network) if pre_steps is None else pre_steps
    T_work = T + pre_work

    def measured(s: LayerSpec) -> list[float] | None:  # per computed step: the pre-steps, then the T real steps
        real = act.steps(s.name, T)
        return real if real is None or not pre_work else act.steps(s.name, pre_work) + real

    def rates_for(s: LayerSpec) -> list[float] | None:
        return measured(s) if mode == "event_driven" else None
    unmeasured = [s.name for s in layers if act is not None and not s.analog_input and s.name not in act.rates]
    if ann_bits is None:
        ann_bits = max(1, math.ceil(math.log2(T + 1)))
    elif isinstance(ann_bits, bool) or not isinstance(ann_bits, numbers.Integral) or ann_bits < 1:
        raise ConfigError(f"estimate: ann_bits (activation bits of the bit-serial ANN comparison) must be a positive "
                          f"integer or None (ceil(log2(T + 1))), got {ann_bits!r}")
    macs = sum(s.macs for s in layers)
    notes = [f"mode {mode}: " + ("every crossbar read every timestep (SpikeSim analytical model)" if mode == "dense"
                                 else "costs scaled by measured per-layer, per-timestep input spike rates")]
    if mode == "event_driven" and unmeasured:
        if len(unmeasured) == sum(not s.analog_input for s in layers):
            raise ConfigError(f"estimate: the activity names no layer of the network (layers {[s.name for s in layers]}"
                              f", activity for {sorted(act.rates)})")
        notes.append(f"no measured activity for {unmeasured}: costed dense")
    if pre_work:
        method = network_correction(network)[0] if isinstance(network, SpikingNetwork) else "given"
        notes.append(f"offset correction {method!r}: every layer computes {pre_work} pre-steps per input before the "
                     f"T={T} counted, charged in the energy (at the input rates of its first {pre_work} real steps: "
                     f"the same inputs for COS; an estimate for SRP, whose pre-steps run before any neuron is "
                     f"silenced); the latency counts {pre_latency} steps before real step 1")
    passes = {s.input_passes for s in layers if not s.analog_input}
    if passes != {1} and passes:
        notes.append(f"spiking layers fed by burst or signed spikes (convert.neuron) read their crossbars "
                     f"{max(passes)} passes per timestep (bit-serial spike counts, or one pass per polarity): "
                     f"energy and latency charge every pass")
    hw_d = preset("digital-45nm") if not hw.is_digital else hw
    dig_snn = [digital_energy_pj(s, T_work, hw_d, rates_for(s)) for s in layers]
    dig_ann = [digital_energy_pj(s, 1, hw_d, ann=True) for s in layers]
    pool_e = [maxpool_energy_pj(p, T_work, hw) for p in pools]
    pool_rows = [LayerCost(p.name, "maxpool", sum(e.values()), None, None, None, e, None, 0, 0, 0, 0.0, 0)
                 for p, e in zip(pools, pool_e)]
    if pools:
        notes.append(f"{len(pools)} spiking max-pool(s): counters and comparators costed as digital adds "
                     "(energy line 'maxpool', one increment per input per step: an upper bound), their state as "
                     "SRAM (area line 'maxpool_counters'); no latency charged")
        dig_snn += [maxpool_energy_pj(p, T_work, hw_d) for p in pools]
    if hw.is_digital:
        maps: list[LayerMapping] = []
        costs = [LayerCost(s.name, s.kind, sum(e.values()), None, None, None, e,
                           act.mean(s.name, T) if act and mode == "event_driven" else None, s.macs, 0, 0, 0.0, 0)
                 for s, e in zip(layers, dig_snn)]
        costs += [LayerCost(r.name, r.kind, sum(e.values()), None, None, None, e, None, 0, 0, 0, 0.0, 0)
                  for r, e in zip(pool_rows, dig_snn[len(layers):])]
        total = _totals(dig_snn, None, {}, macs, maps, hw, 0)
        notes.append("digital baseline (Horowitz 45 nm): energy only; latency and area not modelled")
        comparisons = {"digital_ann": _entry("same network as an ANN, digital MACs", sum(_sum(dig_ann).values()),
                                             None, None, total.energy_pj)} if compare else {}
        return CostReport(hw.name, mode, T, costs, total, comparisons, notes, hw.to_dict())

    maps = [map_layer(s, hw) for s in layers]
    tiles = count_tiles(maps, hw)
    per_layer = [layer_energy_pj(s, m, hw, T_work, rates_for(s)) for s, m in zip(layers, maps)]
    lat, spans = latency_ns(layers, hw, T + pre_latency)
    area = area_breakdown_um2(layers, maps, hw)
    tile_area = sum(v for k, v in area.items() if k not in ("input_buffer", "membrane")) / tiles
    if pools:
        area["maxpool_counters"] = maxpool_area_um2(pools, hw)
        for r, p in zip(pool_rows, pools):
            r.area_um2 = maxpool_area_um2([p], hw)
    mem_n = len(layers) if hw.membrane_area_layers is None else hw.membrane_area_layers
    bit = hw.area.sram_bit_um2
    costs = []
    for i, (s, m, e, (st, busy)) in enumerate(zip(layers, maps, per_layer, spans)):
        a = m.pes / hw.pe_per_tile * tile_area + s.in_activations * bit * hw.area.input_buffer_bits + \
            (s.neurons * bit * hw.area.membrane_bits if i < mem_n else 0.0)
        costs.append(LayerCost(s.name, s.kind, sum(e.values()), busy, st, a, e,
                               act.mean(s.name, T) if act and mode == "event_driven" else None, s.macs, m.pes,
                               m.crossbars, m.utilisation, m.adc_bits_exact, m.to_dict()))
    costs += pool_rows
    total = _totals(per_layer + pool_e, lat, area, macs, maps, hw, tiles)
    max_bits = max(m.adc_bits_exact for m in maps)
    if hw.adc_bits < max_bits:
        notes.append(f"ADC {hw.adc_bits} bits < {max_bits} bits for exact partial sums: costs assume the "
                     "quantised read (see bsnn.hardware.constraints for its accuracy effect)")
    if hw.unverified:
        notes.append(f"preset {hw.name}: constants not verified against their source: {', '.join(hw.unverified)}")
    first = [c for c, s in zip(costs, layers) if s.analog_input]
    if first and total.energy_pj > 0:
        how = {"per_step": "read every timestep" + (" (SpikeSim's convention: like a spiking layer, one pass per step)"
                                                    if hw.analog_input_bits is None else
                                                    f" ({hw.analog_input_bits} bit-serial passes per step)"),
               "once": f"read once per inference ({hw.analog_input_bits or 8} bit-serial passes), current held",
               "digital": "computed once on a digital core (MACs at energy.mac_pj)"}[hw.first_layer]
        share = 100.0 * sum(c.energy_pj for c in first) / total.energy_pj
        notes.append(f"first (analog-input) layer {how}: {share:.1f} % of the energy (hardware first_layer="
                     "per_step | once | digital)")
    comparisons = {}
    if compare:
        ref = total.energy_pj
        if mode == "event_driven":
            d = [layer_energy_pj(s, m, hw, T_work) for s, m in zip(layers, maps)]
            comparisons["snn_dense_imc"] = _entry("same SNN, every crossbar read every step",
                                                  sum(_sum(d + pool_e).values()), lat, total.area_um2, ref)
        elif act is not None:
            ev = [layer_energy_pj(s, m, hw, T_work, measured(s)) for s, m in zip(layers, maps)]
            comparisons["snn_event_driven_imc"] = _entry("same SNN, measured spike rates",
                                                         sum(_sum(ev + pool_e).values()), lat, total.area_um2, ref)
        ann = [layer_energy_pj(s, m, hw, 1, None, ann_bits) for s, m in zip(layers, maps)] + \
            [maxpool_energy_pj(p, 1, hw) for p in pools]  # the ANN's max-pools: one comparison pass
        comparisons["ann_bit_serial_imc"] = _entry(
            f"same network as an ANN on the same hardware, {ann_bits}-bit bit-serial activations",
            sum(_sum(ann).values()), latency_ns(layers, hw, 1, ann_bits)[0], total.area_um2, ref)
        comparisons["digital_snn"] = _entry(f"same SNN on a digital accelerator (Horowitz 45 nm, {mode} rates)",
                                            sum(_sum(dig_snn).values()), None, None, ref)
        comparisons["digital_ann"] = _entry("same network as an ANN, digital MACs (Horowitz 45 nm)",
                                            sum(_sum(dig_ann).values()), None, None, ref)
        comparisons["ann_bit_serial_imc"]["activation_bits"] = ann_bits
        r = comparisons["ann_bit_serial_imc"]["energy_ratio"]
        notes.append(f"SNN ({mode}, T={T}) uses {r:.3g}x the energy of the {ann_bits}-bit bit-serial ANN on the "
                     f"same hardware: the {'SNN wins' if r < 1 else 'ANN wins'}")
    return CostReport(hw.name, mode, T, costs, total, comparisons, notes, hw.to_dict())


def network_pre_steps(network) -> tuple[int, int]:
    """``(steps every layer computes, steps before real step 1)`` per input under a SpikingNetwork's run-time
    offset correction (:mod:`bsnn.snn.offset`; ``(0, 0)`` without one, and for layer tables)."""
    if not isinstance(network, SpikingNetwork):
        return 0, 0
    return work_pre_steps(network), latency_pre_steps(network)


def sweep_timesteps(network, activity, hw, timesteps: list[int], mode: str = "dense", **kw) -> list[dict]:
    """Total energy / latency / EDP at each T (``estimate`` per T; event-driven uses each T's prefix of rates)."""
    layers = resolve_layers(network)
    pools = resolve_pools(network)
    activity = _resolve_activity(layers, activity)
    kw.setdefault("pre_steps", network_pre_steps(network))
    rows = []
    for t in timesteps:
        r = estimate(layers, activity, hw, timesteps=t, mode=mode, compare=False, pools=pools, **kw)
        rows.append({"T": t, "energy_pj": r.total.energy_pj, "latency_ns": r.total.latency_ns,
                     "edp_pj_ns": r.total.edp_pj_ns})
    return rows

