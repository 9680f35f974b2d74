"""Conversion-friendly activations for design-time latency reduction.

* :class:`ClipReLU` — ReLU with a trainable clip λ (threshold-ReLU; PACT-style gradient): ``min(max(x, 0), λ)``.
  Converted, λ becomes the IF threshold directly, no calibration needed (Deng & Gu 2021).
* :class:`QCFS` — quantisation-clip-floor-shift (Bu et al. 2022):
  ``λ/L · clip(floor(x·L/λ + 1/2), 0, L)`` with trainable λ and a straight-through floor. An IF neuron with
  threshold λ and initial membrane λ/2 matches it in expectation at any T; the converted SNN is accurate at
  few timesteps.

:func:`replace_activations_` swaps the ``nn.ReLU`` modules of a model for one of these, in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bsnn._registry import Registry
from bsnn.errors import ConfigError

ACTIVATIONS: Registry[type] = Registry("activation")


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.floor(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def qcfs(x: torch.Tensor, clip: torch.Tensor, levels: int) -> torch.Tensor:
    """Closed form ``λ/L · clip(floor(x·L/λ + 0.5), 0, L)`` with a straight-through floor (any shape)."""
    q = _FloorSTE.apply(x * levels / clip + 0.5).clamp(0, levels)
    return q * clip / levels


@ACTIVATIONS.register("clip")
class ClipReLU(nn.Module):
    """``clamp(x, 0, λ)`` with trainable λ (init ``clip``). Shape-preserving."""

    levels = None

    def __init__(self, clip: float = 4.0, levels: int | None = None) -> None:
        super().__init__()
        self.clip = nn.Parameter(torch.tensor(float(clip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.clip)


@ACTIVATIONS.register("qcfs")
class QCFS(nn.Module):
    """Quantisation-clip-floor-shift activation with ``levels`` (L) steps and trainable λ. Shape-preserving."""

    def __init__(self, clip: float = 4.0, levels: int = 8) -> None:
        super().__init__()
        if levels < 1:
            raise ConfigError(f"QCFS levels must be >= 1, got {levels}")
        self.levels = int(levels)
        self.clip = nn.Parameter(torch.tensor(float(clip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qcfs(x, self.clip, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def replace_activations_(model: nn.Module, kind: str, clip: float = 4.0, levels: int = 8) -> nn.Module:
    """Replace every ``nn.ReLU`` module of ``model`` by a fresh ``kind`` activation (``relu`` = no change).

    Args:
        model: network edited in place (its ReLUs must be modules, as in all bsnn models).
        kind: ``"relu"``, ``"clip"`` or ``"qcfs"``.
        clip: initial λ.
        levels: QCFS quantisation levels L.

    Returns:
        ``model``.
    """
    if kind == "relu":
        return model
    cls = ACTIVATIONS.get(kind)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.ReLU):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, cls(clip=clip, levels=levels))
    return model


def is_trained_threshold(m: nn.Module) -> bool:
    """True for activations whose clip λ is learnt (used as the IF threshold without calibration)."""
    return isinstance(m, (ClipReLU, QCFS))
