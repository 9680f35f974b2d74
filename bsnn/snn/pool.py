"""Max-pooling of spike trains, and its registry of strategies.

A max-pool applied to spikes one timestep at a time computes the max of *spikes*, not of firing rates: a window
whose neurons fire at rates 0.5 and 0.5 out of phase emits a spike every step (rate 1, not 0.5). The modules
here pool what the ANN pooled — the max over each window of the neurons' spike *counts* — with the same
time-folded interface as :class:`~bsnn.snn.neuron.IFNeuron` (input ``[Tc * B, C, H, W]``, state kept across
chunks until :meth:`reset`).

Modes (:data:`SPIKING_MAXPOOL_MODES`):

* ``count``: out(t) = M(t) − M(t−1) with M(t) = maxpool(C(t)) and C(t) = Σ_{τ≤t} x(τ) each neuron's running
  count. Then Σ_{t≤T} out(t) = maxpool(C(T)) *exactly at every T*: the pooled count is the max of the window's
  counts, which is what the downstream layer of the ANN reads in the rate limit. Because every count grows by at
  most one per step, so does their max: for spike inputs out(t) is again a {0, 1} spike.
* ``gate``: Rueckauer et al. (2017)'s gating: out(t) = x_{w*}(t), the spike of the window's neuron with the
  highest running count C(t) (ties: the first in the window). Right in the rate limit (the gate settles on the
  fastest neuron), not at every T.

The reference of both is :func:`spiking_maxpool_reference` (one timestep at a time, plain Python loop).

Hardware (``bsnn.hardware.cost``): a spiking max-pool costs, per timestep, one counter increment per input
spike and k² − 1 comparisons plus one subtraction per output; it is modelled as digital adds.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from bsnn._registry import Registry

MaxPool = nn.MaxPool2d | nn.AdaptiveMaxPool2d
#: step(module, running counts [Tc, B, C, H, W], inputs [Tc, B, C, H, W]) -> pooled [Tc, B, C, H', W']
SPIKING_MAXPOOL_MODES: Registry[Callable] = Registry("spiking max-pool mode")


def _with_indices(pool: MaxPool) -> MaxPool:
    """A copy of ``pool`` that also returns the argmax indices (flat over H·W per channel)."""
    p = copy.deepcopy(pool)
    p.return_indices = True
    return p


@SPIKING_MAXPOOL_MODES.register("count")
def _count_mode(m: "SpikingMaxPool2d", counts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Max of the running counts ``counts [Tc, B, ...]``: returns M(t) for each step ``[Tc, B, ...]``."""
    tc, b = counts.shape[:2]
    pooled = m.pool(counts.reshape(tc * b, *counts.shape[2:]))
    return pooled.reshape(tc, b, *pooled.shape[1:])


@SPIKING_MAXPOOL_MODES.register("gate")
def _gate_mode(m: "SpikingMaxPool2d", counts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each window passes the input of its neuron with the highest running count: ``[Tc, B, ...]``."""
    tc, b = counts.shape[:2]
    _, idx = m.pool_indices(counts.reshape(tc * b, *counts.shape[2:]))
    src = x.reshape(tc * b, x.shape[2], -1)
    out = src.gather(2, idx.reshape(tc * b, idx.shape[1], -1)).reshape(idx.shape)
    return out.reshape(tc, b, *out.shape[1:])


class SpikingMaxPool2d(nn.Module):
    """Max-pooling of spike trains by running spike counts (see the module docstring for the modes).

    Args:
        pool: the ANN's ``nn.MaxPool2d`` or ``nn.AdaptiveMaxPool2d`` (its window settings are kept).
        mode: ``count`` (exact pooled counts at every T) or ``gate`` (Rueckauer et al. 2017).

    Attributes:
        time_chunk: number of timesteps folded into the batch of the current call (set by the simulator).
    """

    def __init__(self, pool: MaxPool, mode: str = "count") -> None:
        super().__init__()
        self._step = SPIKING_MAXPOOL_MODES.get(mode)
        self.mode = mode.lower()
        self.pool = copy.deepcopy(pool)
        self.pool.return_indices = False
        self.pool_indices = _with_indices(pool) if self.mode == "gate" else None
        self.time_chunk = 1
        self.counts: torch.Tensor | None = None  # running count C(t) per input neuron [B, C, H, W]
        self.pooled: torch.Tensor | None = None  # M(t) of the last step [B, C, H', W'] (count mode)

    def reset(self) -> None:
        """Forget the running counts (call before each new input batch)."""
        self.counts = None
        self.pooled = None

    def pool_once(self, x: torch.Tensor) -> torch.Tensor:
        """The plain max-pool of ``x`` (stateless; shape propagation)."""
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: spikes (or any values) ``[Tc * B, C, H, W]`` -> pooled ``[Tc * B, C, H', W']`` in ``x``'s dtype."""
        tc = self.time_chunk
        seq = x.reshape(tc, x.shape[0] // tc, *x.shape[1:]).float()
        counts = seq.cumsum(0)
        if self.counts is not None:
            counts += self.counts
        self.counts = counts[-1].clone()
        out = self._step(self, counts, seq)
        if self.mode == "count":  # M(t) - M(t-1); M(0) = 0 (no counts yet)
            prev = torch.zeros_like(out[:1]) if self.pooled is None else self.pooled[None]
            self.pooled = out[-1].clone()
            out = torch.diff(out, dim=0, prepend=prev)
        return out.reshape(tc * seq.shape[1], *out.shape[2:]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pool={self.pool}"


def spiking_maxpool_reference(pool: MaxPool, spikes: torch.Tensor, mode: str = "count") -> torch.Tensor:
    """Oracle of :class:`SpikingMaxPool2d`: ``spikes [T, B, C, H, W]`` -> ``[T, B, C, H', W']``, one timestep at a
    time with explicit loops over windows' argmax (``gate``) or the max of running counts (``count``)."""
    plain = _with_indices(pool)
    counts = torch.zeros_like(spikes[0], dtype=torch.float64)
    prev = None
    outs = []
    for t in range(spikes.shape[0]):
        counts = counts + spikes[t].double()
        m, idx = plain(counts)
        if mode == "count":
            outs.append(m - (torch.zeros_like(m) if prev is None else prev))
            prev = m
        else:
            b, c = idx.shape[:2]
            out = torch.empty_like(m)
            flat_x = spikes[t].double().reshape(b, c, -1)
            flat_i = idx.reshape(b, c, -1)
            for i in range(b):
                for j in range(c):
                    out[i, j].view(-1).copy_(flat_x[i, j][flat_i[i, j]])
            outs.append(out)
    return torch.stack(outs).to(spikes.dtype)
