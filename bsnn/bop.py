"""Bop, the binary optimiser (sign flips driven by a gradient average) for the ±1 layers of a model.

Helwegen, Widdicombe, Geiger, Liu, Cheng & Nusselder, "Latent Weights Do Not Exist: Rethinking Binarized Neural
Network Optimization", NeurIPS 2019; authors' code ``larq/larq``, ``larq/optimizers.py`` (``Bop``). Per binary
weight ``b ∈ {−1, +1}`` with gradient ``g = dL/db``:

    m ← m + γ (g − m)                      (an exponential moving average of the gradient, adaptivity rate γ)
    b ← −b   where  b · m > τ              (the average points against b strongly enough: flip)

— the authors' ``var ← sign(−sign(var·m − τ)·var)``. Their defaults are γ = 1e-4, τ = 1e-8 (training from
scratch); fine-tuning a trained network wants a larger τ, so that only consistently pushed weights flip.

bsnn's ±1 layers (:class:`bsnn.binary.BinaryMixin`) keep a latent weight ``W`` and compute ``α·sign(W)`` with
α = mean|W| per output channel. A flip here negates the latent value (``W ← −W``), so ``|W|`` and therefore α are
unchanged: only signs move, as in the authors' latent-free formulation (their α, when any, is a separate scale).
The gradient ``dL/db`` comes from :attr:`~bsnn.binary.BinaryMixin.sign_grad_hook` (α detached, see
:meth:`Bop.recording`); several forwards before one step add up. Under ``torch.distributed`` the gradients are
averaged over the ranks before the update, so every rank flips the same weights.

Bop is a module whose buffers (the averages ``m`` and the flip count) travel in its owner's ``state_dict``, so a
resumed run continues the same averages.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from bsnn._validate import _check, _finite
from bsnn.binary import binary_sign, is_binary


class Bop(nn.Module):
    """Bop over every ±1 layer of ``model`` (the layers are referenced, not registered as submodules).

    Args:
        model: a network with bsnn binary layers.
        gamma: adaptivity rate γ in (0, 1].
        threshold: flip threshold τ >= 0 (units of the gradient dL/db).

    Buffers: ``m_<i>`` (one per binary layer, its weight's shape) and ``flips`` (total weights flipped so far).
    """

    def __init__(self, model: nn.Module, gamma: float = 1e-4, threshold: float = 1e-8) -> None:
        super().__init__()
        _check(_finite(gamma) and 0.0 < float(gamma) <= 1.0, f"Bop gamma must be in (0, 1], got {gamma}")
        _check(_finite(threshold) and float(threshold) >= 0.0, f"Bop threshold must be >= 0, got {threshold}")
        self.gamma, self.threshold = float(gamma), float(threshold)
        self._layers = [m for m in model.modules() if is_binary(m)]
        _check(bool(self._layers), "Bop needs a model with ±1 layers (bsnn.binary.binarize_); this one has none")
        for i, m in enumerate(self._layers):
            self.register_buffer(f"m_{i}", torch.zeros_like(m.weight, dtype=torch.float32))
        self.register_buffer("flips", torch.zeros((), dtype=torch.int64))
        self._grads: list[torch.Tensor | None] = [None] * len(self._layers)

    def _sink(self, i: int):
        def add(g: torch.Tensor) -> None:
            g = g.detach().float()
            self._grads[i] = g if self._grads[i] is None else self._grads[i] + g
        return add

    @contextmanager
    def recording(self) -> Iterator["Bop"]:
        """Inside, the binary layers' forwards record ``dL/db`` for :meth:`step` (their latent weights get no
        gradient); outside, they are ordinary layers again."""
        for i, m in enumerate(self._layers):
            m.sign_grad_hook = self._sink(i)
        try:
            yield self
        finally:
            for m in self._layers:
                m.sign_grad_hook = None
            self._grads = [None] * len(self._layers)

    @torch.no_grad()
    def step(self) -> int:
        """One Bop update from the gradients recorded since the last step; returns the number of weights flipped
        (summed over the layers). Layers without a recorded gradient keep their average and signs."""
        flipped = 0
        for i, m in enumerate(self._layers):
            g = self._grads[i]
            self._grads[i] = None
            if g is None:
                continue
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(g)
                g /= dist.get_world_size()
            avg = getattr(self, f"m_{i}")
            avg.add_(g - avg, alpha=self.gamma)
            w = m.weight
            b = binary_sign(w).to(avg.dtype)
            flip = b * avg > self.threshold
            if flip.any():
                # −W keeps |W| (and α); a latent 0 (sign +1) becomes the smallest negative value
                negated = torch.where(w == 0, torch.full_like(w, -torch.finfo(w.dtype).tiny), -w)
                w.copy_(torch.where(flip, negated, w))
                flipped += int(flip.sum())
        self.flips += flipped
        return flipped
