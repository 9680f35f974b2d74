"""Two-phase thresholds (``ConvertConfig.late_threshold``): a short code's threshold first, a long code's after.

Threshold balancing picks one θ per layer for every T, and every choice trades the two ends: a small θ (the MSE
optimum for T = 4) resolves few timesteps well but clips activations above it for ever, a large one (max, p99.99,
MSE for T = 16) keeps the ANN's limit but needs many steps. Here each IF layer gets both: θ from
``ConvertConfig.threshold`` for the first ``late_threshold_after`` timesteps, then k·θ with
``k = max(1, ceil(mean λ_late / mean λ))`` from the ``late_threshold`` statistic of the same calibration pass
(:class:`bsnn.snn.neuron.PhasedIFNeuron`). k is one integer per layer, so a late spike is still a single 1 on the
crossbar's word line and the consumer multiplies its column sums by k (a digital per-layer scale, like α and the
threshold gains), and the simulator's integer spike grid stays exact. Trained thresholds (QCFS, clip) are the ANN's
own clipping, which a larger late threshold could not improve: they keep k = 1.
"""

from __future__ import annotations

import math

import torch

from bsnn.snn.network import SpikingNetwork
from bsnn.snn.neuron import IFNeuron, PhasedIFNeuron
from bsnn.snn.synapse import replace_submodule


def late_gains(fast: dict[str, torch.Tensor], late: dict[str, torch.Tensor],
               bounds: dict[str, float] | None = None) -> dict[str, int]:
    """Per activation name: ``k = max(1, ceil(mean(late λ) / mean(fast λ)))`` (λ scalars or per channel): the
    smallest integer whose late threshold is at least the late statistic, so the limit clips no more than it.
    Where the ANN's activation is bounded (``bounds``: ReLU6, ``clamp(0, a)``, trained clips), k·λ never exceeds
    the bound (k = ``floor(a / max λ)``, at least 1): a late threshold above it would let the SNN pass values the
    ANN clips, and its limit would leave the ANN's."""
    gains = {}
    for name, lam in fast.items():
        lam = torch.as_tensor(lam).float()
        ratio = float(torch.as_tensor(late[name]).float().mean()) / max(float(lam.mean()), 1e-12)
        k = max(1, math.ceil(ratio - 1e-6))
        if bounds and name in bounds:
            k = min(k, max(1, math.floor(float(bounds[name]) / max(float(lam.max()), 1e-12) + 1e-6)))
        gains[name] = k
    return gains


def phase_neurons_(snn: SpikingNetwork, gains: dict[str, int] | None, switch_steps: int) -> SpikingNetwork:
    """Replace every plain IF neuron of ``snn`` whose ``gains[neuron.name]`` exceeds 1 (in place) by a
    :class:`PhasedIFNeuron` with the same buffers, that ``late_gain`` and ``switch_steps``; with k = 1 the phased
    neuron would be the IF neuron itself, so it stays one (and stays exportable). Returns ``snn``."""
    for path, m in snn.neurons().items():
        k = int((gains or {}).get(m.name, 1))
        if type(m) is IFNeuron and k > 1:
            replace_submodule(snn.graph_module, path, PhasedIFNeuron.from_if(m, k, switch_steps))
    return snn


__all__ = ["late_gains", "phase_neurons_"]
