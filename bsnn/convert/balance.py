"""Threshold balancing as pure functions of calibration statistics.

Layer-wise data-based normalisation (Diehl 2015, Rueckauer 2017; Lu & Sengupta 2020 §1 of REFERENCE): the IF
layer that replaces ReLU ``l`` gets threshold λ_l, the chosen statistic of that ReLU's output. With the
reset-by-subtraction IF neuron the spike rate of a neuron then approximates ``clip(a_l / λ_l, 0, 1)``, and a
spike stands for λ_l. This is equivalent to scaling weights by λ_{l-1}/λ_l with threshold 1; bsnn keeps the
weights (so binary weights stay ±1) and moves the factors into the thresholds.
"""

from __future__ import annotations

import math

import torch

from bsnn.errors import ConfigError, ConversionError


def balanced_thresholds(stats: dict[str, torch.Tensor], threshold_scale: float = 1.0,
                        floor: float = 1e-6) -> dict[str, torch.Tensor]:
    """Thresholds λ (ANN activation domain) from per-layer statistics.

    Args:
        stats: ReLU name -> statistic (scalar or ``[C]``), e.g. from :func:`bsnn.convert.calibrate.calibrate`.
        threshold_scale: global multiplicative factor on every threshold.
        floor: lower bound (a dead ReLU would otherwise give a zero threshold).

    Returns:
        ReLU name -> λ with the same shapes.

    Raises:
        ConversionError: a statistic is NaN or infinite (the layer is named).
        ConfigError: ``threshold_scale`` is not a finite number > 0.
    """
    if isinstance(threshold_scale, bool) or not isinstance(threshold_scale, (int, float)) \
            or not math.isfinite(threshold_scale) or threshold_scale <= 0:
        raise ConfigError(f"convert.threshold_scale must be a finite number > 0, got {threshold_scale!r}")
    out = {}
    for name, s in stats.items():
        s = torch.as_tensor(s).float()
        if not bool(torch.isfinite(s).all()):
            raise ConversionError(f"threshold of layer '{name}': its activation statistic is "
                                  f"{s.flatten()[:4].tolist()} (NaN or infinite); the weights or calibration inputs "
                                  "before it are not finite: check the model and the calibration data")
        out[name] = (s * threshold_scale).clamp_min(floor)
    return out


def clipped_thresholds(thresholds: dict[str, torch.Tensor], clips: dict[str, float]) -> dict[str, torch.Tensor]:
    """Thresholds of clipped ReLUs ``min(max(x, 0), a)`` (``nn.ReLU6``, ``nn.Hardtanh(0, a)``, ``x.clamp(0, a)``):
    ``min(λ, a)``. An IF neuron's rate is at most one spike (worth λ) per step, so λ <= a realises the clip.

    Args:
        thresholds: activation name -> λ (scalar or ``[C]``).
        clips: activation name -> its upper bound ``a`` (only the clipped activations).

    Returns:
        The thresholds with every clipped activation's λ capped at its ``a`` (same shapes).
    """
    return {k: torch.clamp(v, max=clips[k]) if k in clips else v for k, v in thresholds.items()}


def weight_scale_factors(lambdas: list[float]) -> list[float]:
    """The equivalent weight-normalisation factors λ_{l-1}/λ_l (λ_0 = 1 for the analog input), for reference."""
    prev, out = 1.0, []
    for lam in lambdas:
        out.append(prev / lam)
        prev = lam
    return out
