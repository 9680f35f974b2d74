"""LTB, local threshold balancing (Bu, Li & Yu, "Inference-Scale Complexity in ANN-SNN Conversion for
High-Performance and Low-Power Applications", CVPR 2025, arXiv:2409.03368).

Each IF layer's threshold λ is fitted to the ANN's activations ``a`` of that layer by gradient descent on the
*local* clipping loss ``L(λ) = E[(a - λ)_+²]`` (the squared error of ``clip(a, 0, λ)``), one step per calibration
batch, learning rate 1, starting from λ = 0::

    λ ← λ + 2 · E[(a - λ)_+]          (mean over the batch and, per channel, over the positions)

All layers are fitted in the same forward passes, in graph order: every activation is replaced by
``clip(a, 0, λ)`` with the just-updated λ, so a layer is fitted on the activations its already-clipped
predecessors produce (the same network the SNN approximates). The loss falls as λ grows, so after the few steps
the authors take λ stops below the maximum, at a data-dependent clip; the SNN converges to the ANN clipped at
those λ. The number of steps *is* the clip: each step adds ``2·E[(a - λ)_+]``, which shrinks as λ climbs into
the tail (for exponentially distributed activations of mean μ, λ_k ≈ μ·ln(2k + 1) after k steps), so few steps
clip hard. This is why spikingjelly's recipe, one step per batch of the loader it is given, fell to 38-47 % on
bsnn's mnist5k student with bsnn's calibration loader (5 batches of <= 500 images): its SNN matched the ANN
clipped at its λ (38.1 % vs 38.7 %); with the authors' 12 batches of 100 that clipped ANN reaches 89.7 %, with
64 of 32 98.2 % (ANN 98.5 %); see ``docs/conversion.md``.

Authors' code (read, reimplemented): ``putshua/Inference-scale-ANN-SNN``, ``layers.py``:
``SpikingNeuron.optimize`` (the scalar update ``thre += c * 2 * ((x - ub) * (x > ub)).mean()``) and
``SpikingNeuron4d.optimize`` / ``SpikingNeuron2d.optimize`` (per channel: mean over dims (0, 2, 3) / 0, output
``thre - relu(thre - relu(x))`` = ``clip(x, 0, λ)``); ``utils.py``: ``weight_scaling_iter`` (the loop over
training batches; the demo notebook runs ``iter = 10``, i.e. batches 0..11 of 100 images, with ``c = 1``) and
``convert_ann_to_snn`` (``ReLU -> MaxPool`` becomes ``MaxPool -> neuron``: the threshold is fitted on the pooled
values). spikingjelly 2.0's ``LocalThresholdBalancingRecipe`` (``spikingjelly/activation_based/ann2snn/recipes/
local_threshold_balancing.py``, ``LocalThresholdBalancingHook.forward``) computes the same update (clamped at
``eps = 1e-6``) but runs it over *every* batch of the loader it is given. This module follows the authors'
code: a fixed number of steps (``ltb_iterations`` = 12) of ``ltb_batch_size`` = 100 samples.

Differences from the authors' code, all forced by the binary SNN or by bsnn's pipeline:

* per-channel λ only where bsnn allows per-channel thresholds (every consumer full precision,
  :func:`bsnn.convert.graph.per_channel_allowed`); a layer feeding a binary layer gets the authors' *scalar*
  update (their ``SpikingNeuron`` base class) so that its spikes carry one value and the ±1 weights stay ±1;
* the λ floor ``eps`` of spikingjelly (a never-active channel would otherwise get λ = 0);
* trained clips (``clip`` / ``qcfs`` activations) keep their own λ and are neither fitted nor clipped again;
* the IF neuron is bsnn's (initial membrane ``v_init``·θ, spike when ``v >= θ``); the authors' fires on
  ``v > θ`` from ``θ/2`` (bsnn's default ``v_init = 0.5`` is the same shift);
* batches are re-cut from the first ``ltb_iterations · ltb_batch_size`` calibration samples (cycled when the
  loader holds fewer), not drawn from the shuffled training loader.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.errors import ConversionError

LTB_EPS = 1e-6


def ltb_step(threshold: torch.Tensor, a: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """One LTB update of a layer's threshold from one batch of its (non-negative) activations.

    ``λ + 2·mean((a - λ)_+)``: a gradient step of learning rate 1 on ``mean((a - λ)_+²)``.

    Args:
        threshold: current λ, ``[C]`` per channel or a scalar tensor ``[]``.
        a: the activations ``[B, C, ...]`` (``[B, F]`` for a linear layer's).
        per_channel: one λ per channel (dim 1; mean over every other dim) or one λ (mean over everything).

    Returns:
        The new λ (same shape as ``threshold``), at least :data:`LTB_EPS`.
    """
    a = a.detach().float().clamp_min(0)
    if per_channel:
        view = threshold.reshape(1, -1, *([1] * (a.dim() - 2)))
        over = (a - view).clamp_min(0).mean(dim=(0, *range(2, a.dim())))
    else:
        over = (a - threshold).clamp_min(0).mean()
    return (threshold + 2.0 * over).clamp_min(LTB_EPS)


def ltb_clip(a: torch.Tensor, threshold: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``clip(a, 0, λ)`` with λ broadcast over channel dim 1 (``a``: ``[B, C, ...]``), in ``a``'s dtype."""
    lam = threshold.to(a.dtype)
    if per_channel:
        lam = lam.reshape(1, -1, *([1] * (a.dim() - 2)))
    return torch.minimum(a.clamp_min(0), lam)


class _LTBHook:
    """Forward hook that updates one layer's λ from its output and replaces the output by ``clip(out, 0, λ)``."""

    def __init__(self, name: str, per_channel: bool) -> None:
        self.name, self.per_channel = name, per_channel
        self.threshold: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, _module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:  # λ starts at 0 (the authors' zero buffer)
            shape = (out.shape[1],) if self.per_channel else ()
            self.threshold = torch.zeros(shape, device=out.device, dtype=torch.float32)
        self.threshold = ltb_step(self.threshold, out, self.per_channel)
        self.steps += 1
        return ltb_clip(out, self.threshold, self.per_channel)


@contextmanager
def _ltb_hooks(modules: dict[str, nn.Module], per_channel: set[str]) -> Iterator[dict[str, _LTBHook]]:
    hooks = {n: _LTBHook(n, n in per_channel) for n in modules}
    handles = [m.register_forward_hook(hooks[n]) for n, m in modules.items()]
    try:
        yield hooks
    finally:
        for h in handles:
            h.remove()


def ltb_batches(x: torch.Tensor, iterations: int, batch_size: int) -> list[torch.Tensor]:
    """``iterations`` consecutive batches of ``batch_size`` samples of ``x`` ``[N, ...]``, cycling through ``x``
    when it holds fewer than ``iterations · batch_size`` samples."""
    if len(x) == 0:
        raise ConversionError("LTB: no calibration samples; pass a calibration loader with samples")
    idx = torch.arange(iterations * batch_size) % len(x)
    return [x[i] for i in idx.split(batch_size)]


@torch.no_grad()
def ltb_thresholds(gm: fx.GraphModule, observed: dict[str, nn.Module], per_channel: set[str],
                   batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """LTB thresholds λ of the activations in ``observed``, fitted jointly over ``batches``.

    Args:
        gm: the captured ANN (run in eval mode; not modified: the hooks are removed on exit).
        observed: activation name -> the module whose output is fitted and clipped (the activation itself, or the
            max-pool it alone feeds: :func:`bsnn.convert.graph.observed_modules`).
        per_channel: the activations that get one λ per channel (the others one λ).
        batches: calibration inputs, each ``[B, C, H, W]``; one update per batch.
        device: where the ANN runs.

    Returns:
        activation name -> λ (``[C]`` per channel, a scalar tensor otherwise), on CPU.
    """
    gm.eval().to(device)
    with _ltb_hooks(observed, per_channel) as hooks:
        for x in batches:
            gm(x.to(device))
    missing = [n for n, h in hooks.items() if h.threshold is None]
    if missing:
        raise ConversionError(f"LTB: activations {missing} saw no calibration data; check that the calibration "
                              "inputs reach every layer")
    return {n: h.threshold.cpu() for n, h in hooks.items()}
