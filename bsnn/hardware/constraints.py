"""Hardware constraints applied in simulation: crossbar row partitioning with ADC-quantised partial sums,
fixed-point membrane potentials and quantised thresholds.

Pure functions (:func:`adc_quantize`, :func:`fixed_point`, :func:`row_partition`, :func:`exact_adc_bits`) hold
the math; :func:`apply_constraints` (a context manager) swaps the synaptic modules and IF neurons of a
:class:`~bsnn.snn.network.SpikingNetwork` for constrained versions and restores them on exit;
:func:`constrained` returns a constrained copy. Use either around :func:`bsnn.simulate.simulate`::

    with apply_constraints(snn, ConstraintConfig(xbar_rows=64, adc_bits=4, membrane_bits=16)):
        res_hw = simulate(snn, loader, [1, 2, 4, 8])

What is constrained:

* **binary layers fed by spikes** (±1 weights; inputs {0,1}, or avg-pooled spikes in steps of the input quantum,
  1/k² for plain k x k pooling, :func:`bsnn.snn.synapse.input_grid`; the ADC's finest step): the
  input rows are split into crossbar row groups (``spikesim``: one PE = k² crossbars x up to ``xbar_rows``
  input channels, converted together; ``unrolled``: chunks of ``xbar_rows`` of the Cin·k² im2col rows); each
  group's partial sum goes through a signed ADC of ``adc_bits`` over ±``adc_range`` (default: the rows in one
  conversion, the largest possible |partial sum|); the quantised partial sums are added digitally (exact), then
  the bias. Computed as ideal output + Σ (quantised − exact) partial sums, so an exact ADC changes nothing.
* **every IF neuron**: the membrane is a signed fixed-point register of ``membrane_bits`` bits with
  ``membrane_frac_bits`` fractional bits, in the layer's input units (one unit = one active row x weight 1);
  v ← sat(round(v + x + b)); spike when v ≥ θ_q; v ← v − θ_q; θ_q = θ rounded to ``threshold_frac_bits``; the
  calibrated bias current b and initial potential (bias / potential calibration) are kept, on the same grid.
* **kept ideal (full precision)**: the analog-input first layer, full-precision (non-binary) layers such as the
  last one, grouped convolutions, layers fed by residual adds or scaled values, and the output integrator.

An ADC with ``adc_bits ≥ exact_adc_bits(rows)`` (⌈log2(rows+1)⌉ + 1 sign bit) reproduces the ideal partial sums
exactly; fixed point reproduces the ideal membrane whenever all values are on its grid.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from bsnn.errors import ConfigError
from bsnn.hardware.config import PARTITIONS, ConstraintConfig  # noqa: F401 (re-export)
from bsnn.simulate import simulate
from bsnn.snn.neuron import IFNeuron
from bsnn.snn.synapse import input_grids, replace_submodule


def exact_adc_bits(rows: int, unit: float = 1.0) -> int:
    """Signed ADC bits that represent every partial sum of ``rows`` inputs in [0, 1] (steps of ``unit``) times
    ±1 weights exactly: ⌈log2(rows/unit + 1)⌉ + 1."""
    return math.ceil(math.log2(rows / unit + 1)) + 1


def adc_step(bits: int, full_scale: float, unit: float = 1.0) -> float:
    """LSB of a signed ``bits`` ADC over ±``full_scale``: max(unit, full_scale / (2^(bits−1) − 1))."""
    return max(unit, full_scale / (2 ** (bits - 1) - 1))


def adc_quantize(psum: torch.Tensor, bits: int, full_scale: float, unit: float = 1.0) -> torch.Tensor:
    """Signed uniform ADC: round ``psum`` to multiples of the LSB (:func:`adc_step`) and clip to
    ±(2^(bits−1) − 1)·LSB. Exact for multiples of ``unit`` within ±full_scale when the LSB equals ``unit``."""
    step = adc_step(bits, full_scale, unit)
    levels = 2 ** (bits - 1) - 1
    return torch.round(psum / step).clamp_(-levels, levels) * step


def fixed_point(x: torch.Tensor, bits: int, frac_bits: int) -> torch.Tensor:
    """Round to the grid 2^-frac_bits and saturate to a signed ``bits``-bit register, i.e. to
    [−2^(bits−1), 2^(bits−1) − 1]·2^-frac_bits (exact in float64 for bits ≤ 53)."""
    scale = 2.0 ** frac_bits
    hi = 2.0 ** (bits - 1)
    return torch.round(x * scale).clamp_(-hi, hi - 1) / scale


def row_partition(in_channels: int, kernel_area: int, rows: int, mapping: str) -> list[list[int]]:
    """Row groups (indices into the im2col row order ``c·k² + offset``) converted together by one ADC.

    ``spikesim``: group j = every kernel offset of channels [j·rows, (j+1)·rows) (a PE of k² crossbars);
    ``unrolled``: consecutive chunks of ``rows`` rows.
    """
    n = in_channels * kernel_area
    if mapping == "unrolled":
        return [list(range(s, min(s + rows, n))) for s in range(0, n, rows)]
    return [[c * kernel_area + o for c in range(s, min(s + rows, in_channels)) for o in range(kernel_area)]
            for s in range(0, in_channels, rows)]


# ------------------------------------------------------------------------------------------- modules
class CrossbarSynapse(nn.Module):
    """A conv / linear layer computed as row-partitioned, ADC-quantised partial sums (see module docstring).

    Args:
        layer: the ideal ``nn.Conv2d`` (groups = 1, zero padding) or ``nn.Linear``; shared, not copied.
        cfg: constraints.
        unit: input quantum, the ADC's finest step (1 for spikes, 1/k² for plain k x k average-pooled spikes;
            :func:`bsnn.snn.synapse.input_grid`).
        input_max: largest input value (1 unless a pooling ``divisor_override`` is below the window size); the
            default ADC full scale is rows per conversion x ``input_max``.
    """

    def __init__(self, layer: nn.Module, cfg: ConstraintConfig, unit: float = 1.0, input_max: float = 1.0) -> None:
        super().__init__()
        self.layer, self.cfg, self.unit = layer, cfg, unit
        conv = isinstance(layer, nn.Conv2d)
        k2 = layer.kernel_size[0] * layer.kernel_size[1] if conv else 1
        cin = layer.in_channels if conv else layer.in_features
        groups = row_partition(cin, k2, cfg.xbar_rows, cfg.mapping if conv else "unrolled")
        width = max(len(g) for g in groups)
        idx = torch.full((len(groups), width), cin * k2, dtype=torch.long)  # pad -> an all-zero extra row
        for i, g in enumerate(groups):
            idx[i, :len(g)] = torch.tensor(g)
        self.register_buffer("index", idx, persistent=False)
        self.full_scale = cfg.adc_range if cfg.adc_range is not None else float(width) * input_max

    def partial_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Exact partial sums ``[N, Cout, groups, L]`` (L = output positions; 1 for linear)."""
        m = self.layer
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # [N, Cin*k2, L]
        else:
            cols = x.reshape(x.shape[0], -1, 1)
        cols = torch.cat([cols, cols.new_zeros(cols.shape[0], 1, cols.shape[2])], 1)
        w = m.weight.reshape(m.weight.shape[0], -1)
        w = torch.cat([w, w.new_zeros(w.shape[0], 1)], 1)
        return torch.einsum("ngrl,ogr->nogl", cols[:, self.index], w[:, self.index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.cfg.adc_bits is None:
            return y
        # chunk the batch so that the partial sums [n, Cout, G, L] and the gathered inputs stay near 2^25 floats
        per_sample = max(1, y[:1].numel() * self.index.shape[0] + self.index.numel() * (y[0].numel() //
                                                                                        y.shape[1]))
        step = max(1, 2 ** 25 // per_sample)
        err = torch.cat([(adc_quantize(ps, self.cfg.adc_bits, self.full_scale, self.unit) - ps).sum(2)
                         for ps in (self.partial_sums(xc) for xc in x.split(step))])
        return y + err.reshape(y.shape)


class FixedPointIFNeuron(IFNeuron):
    """IF neuron with a fixed-point membrane and a quantised threshold, in the layer's input units.

    The membrane is held in float64 (exact for registers up to 53 bits). It starts at
    fixed((v_init_frac + v_init_bias)·θ_q); per timestep: v ← fixed(v + x + b_q) with the calibrated bias current
    b_q = fixed(i_bias·θ_q) during the first ``i_bias_steps`` timesteps (both calibration terms are kept in units of θ by :class:`IFNeuron`); s = v ≥ θ_q;
    v ← v − s·θ_q (θ_q is on the grid, so v stays on it).
    Same interface as :class:`IFNeuron` (spike counts, reset, time chunks); the ``kernel`` setting is ignored.
    """

    def __init__(self, neuron: IFNeuron, cfg: ConstraintConfig) -> None:
        super().__init__(neuron.threshold.clone(), float(neuron.v_init_frac), neuron.name)
        self.v_init_bias = neuron.v_init_bias.clone()
        self.i_bias = neuron.i_bias.clone()  # bias calibration: dropping it made "exact" constraints differ
        self.i_bias_steps = neuron.i_bias_steps.clone()  # the bias flows during the first i_bias_steps only
        self.cfg = cfg
        self.time_chunk, self.kernel, self.record = neuron.time_chunk, neuron.kernel, neuron.record

    def _q(self, v: torch.Tensor, frac: int | None = None) -> torch.Tensor:
        c = self.cfg
        return fixed_point(v, c.membrane_bits, c.membrane_frac_bits if frac is None else frac)

    def quantized_threshold(self) -> torch.Tensor:
        """θ rounded to ``threshold_frac_bits`` (at least one LSB)."""
        f = self.cfg.threshold_frac_bits if self.cfg.threshold_frac_bits is not None else self.cfg.membrane_frac_bits
        th = torch.round(self.threshold.double() * 2.0 ** f) / 2.0 ** f
        return th.clamp_min(2.0 ** -f).to(self.threshold.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: input current ``[Tc * B, ...]`` (input units) -> spikes ``[Tc * B, ...]``."""
        if self.cfg.membrane_bits is None:
            return super().forward(x)
        tc = self.time_chunk
        x_seq = x.reshape(tc, x.shape[0] // tc, *x.shape[1:]).double()
        th = self.quantized_threshold().double()
        if self.v is None:
            self.v = self._q(self.initial_potential(x_seq[0]) * th)
            self.neurons_per_sample = x_seq[0, 0].numel()
        bias = self._q(self.i_bias.double() * th) if bool(self.i_bias.any()) else None
        v, out = self.v, torch.empty_like(x_seq)
        window = int(self.i_bias_steps)
        for t in range(tc):
            on = bias is not None and (not window or self.t + t < window)
            v = self._q(v + x_seq[t] + bias if on else v + x_seq[t])
            out[t] = (v >= th).double()
            v = v - out[t] * th
        self.v = v
        self.t += tc
        if self.record:
            self.record_counts(out.flatten(1).sum(1))
        out = out.to(x.dtype)
        return out.reshape(x.shape)


# ------------------------------------------------------------------------------------- graph surgery
def constraint_plan(snn, cfg: ConstraintConfig) -> dict[str, str]:
    """Layer / neuron name -> what :func:`apply_constraints` does to it (``crossbar+adc``, ``fixed-point``,
    or ``ideal: reason``)."""
    gm = snn.graph_module
    grids = input_grids(snn)
    plan = {}
    for layer in snn.layers:
        m = gm.get_submodule(layer["name"])
        if not layer["binary"]:
            plan[layer["name"]] = "ideal: full-precision weights"
        elif grids[layer["name"]] is None:
            plan[layer["name"]] = "ideal: input is not spikes (analog input, residual add or scaling)"
        elif isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            plan[layer["name"]] = "ideal: grouped convolution or non-zero padding"
        else:
            plan[layer["name"]] = "crossbar+adc" if cfg.adc_bits is not None else "crossbar (exact)"
    for name in snn.neuron_names:
        plan[name] = "fixed-point" if cfg.membrane_bits is not None else "ideal: float membrane"
    return plan


def _swap(snn, cfg: ConstraintConfig) -> tuple[dict[str, str], dict[str, nn.Module]]:
    """Swap in constrained modules; returns ``(plan, originals)``."""
    cfg.validate()
    gm = snn.graph_module
    other = sorted({m.firing for m in snn.neurons().values() if m.firing != "if"})
    if other and (cfg.adc_bits is not None or cfg.membrane_bits is not None):
        raise ConfigError(f"hardware constraints (adc_bits, membrane_bits) model IF neurons and {{0, 1}} spike inputs "
                          f"read in one pass; this network has {', '.join(other)} neurons (convert.neuron): simulate "
                          "it without simulate.constraints, or convert it with convert.neuron=if")
    plan = constraint_plan(snn, cfg)
    grids = input_grids(snn)
    originals: dict[str, nn.Module] = {}
    try:
        for name, what in plan.items():
            old = gm.get_submodule(name)
            if what == "crossbar+adc":
                grid = grids[name]
                new = CrossbarSynapse(old, cfg, grid.quantum, grid.max_value).to(old.weight.device)
            elif what == "fixed-point":
                new = FixedPointIFNeuron(old, cfg).to(old.threshold.device)
            else:
                continue
            originals[name] = old
            replace_submodule(gm, name, new)
    except BaseException:
        _restore(gm, originals)
        raise
    return plan, originals


def _restore(gm: fx.GraphModule, originals: dict[str, nn.Module]) -> None:
    for name, old in originals.items():
        replace_submodule(gm, name, old)


@contextmanager
def apply_constraints(snn, cfg: ConstraintConfig) -> Iterator[dict[str, str]]:
    """Temporarily constrain ``snn`` (synaptic layers and IF neurons swapped in its graph); yields the plan
    (:func:`constraint_plan`). The original modules are restored on exit, also after an exception."""
    plan, originals = _swap(snn, cfg)
    try:
        yield plan
    finally:
        _restore(snn.graph_module, originals)


def constrained(snn, cfg: ConstraintConfig):
    """A constrained deep copy of ``snn`` (the original is untouched)."""
    new = copy.deepcopy(snn)
    _swap(new, cfg)
    return new


def simulate_with_constraints(snn, loader, timesteps: list[int], cfg: ConstraintConfig, **simulate_kw):
    """Simulate ``snn`` ideal and under ``cfg`` on the same samples; returns ``(ideal, constrained, rows)`` where
    ``rows`` = [T, ideal accuracy (%), constrained accuracy (%), drop (points)] for a table next to the sweep."""
    ideal = simulate(snn, loader, timesteps, **simulate_kw)
    with apply_constraints(snn, cfg):
        hw = simulate(snn, loader, timesteps, **simulate_kw)
    rows = [[t, ideal.accuracy[t], hw.accuracy[t], ideal.accuracy[t] - hw.accuracy[t]] for t in ideal.timesteps]
    return ideal, hw, rows
