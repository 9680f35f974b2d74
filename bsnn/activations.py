"""Conversion-friendly activations for design-time latency reduction.

* :class:`ClipReLU` — ReLU with a trainable clip λ (threshold-ReLU; PACT-style gradient): ``min(max(x, 0), λ)``.
  Converted, λ becomes the IF threshold directly, no calibration needed (Deng & Gu 2021).
* :class:`QCFS` — quantisation-clip-floor-shift (Bu et al. 2022):
  ``λ/L · floor(clamp(x/λ, 0, 1)·L + 1/2)`` with trainable λ and a straight-through floor (the gradient flows
  over the whole clip range ``0 < x < λ``, as in the authors' code). An IF neuron with
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


def qcfs_reference(x: torch.Tensor, clip: torch.Tensor, levels: int) -> torch.Tensor:
    """QCFS op by op as its authors write it (Bu et al. 2022, ``putshua/SNN_conversion_QCFS``, ``IF.forward`` with
    T = 0): ``x/λ``, clamp to ``[0, 1]``, ``floor(·L + 0.5) / L`` with a straight-through floor, times ``λ``. The
    oracle of :func:`qcfs` (its values bit for bit; gradients by autograd through every op)."""
    q = _FloorSTE.apply(torch.clamp(x / clip, 0, 1) * levels + 0.5) / levels
    return q * clip


class _QCFSFunction(torch.autograd.Function):
    """:func:`qcfs_reference` in one buffer (the same ops in the same order, in place), with the closed-form
    backward of the reference's chain: ``dy/dx = m``, ``dy/dλ = Σ g·(q/L - m·x/λ)``, ``m`` = where the clamp passes
    its gradient (``0 < x/λ < 1``: the clip range)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor, levels: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, clip)
        ctx.levels = levels
        return (x / clip).clamp_(0, 1).mul_(levels).add_(0.5).floor_().div_(levels).mul_(clip)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, clip = ctx.saved_tensors
        levels = ctx.levels
        t = x / clip
        inside = (t > 0) & (t < 1)
        grad_x = g * inside if ctx.needs_input_grad[0] else None
        grad_clip = None
        if ctx.needs_input_grad[1]:
            q = t.clamp(0, 1).mul_(levels).add_(0.5).floor_().div_(levels)  # y / λ
            grad_clip = (g * q.sub_(t.mul_(inside))).sum(dtype=torch.float32).to(clip.dtype).reshape(clip.shape)
        return grad_x, grad_clip, None


def qcfs(x: torch.Tensor, clip: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantisation-clip-floor-shift ``λ · floor(clamp(x/λ, 0, 1)·L + 0.5) / L`` with a straight-through floor (any
    shape): :func:`qcfs_reference` computed in one buffer with a closed-form backward (values bit for bit equal to
    the reference's, gradients within rounding; training a QCFS network spends about half the time here)."""
    return _QCFSFunction.apply(x, clip, levels)


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
