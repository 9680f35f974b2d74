"""Helpers shared by the distillation tests: float64 batches, plain-torch feature taps (independent of bsnn's
FeatureTap) and gradients with zeros for unused parameters."""

from __future__ import annotations

import torch
import torch.nn as nn

D = torch.float64
K = 5


def xb(b: int = 6, seed: int = 0, side: int = 6, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 batch ``[b, 1, side, side]`` and labels in ``[0, k)``, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, side, side, generator=g, dtype=D), torch.randint(0, k, (b,), generator=g)


def taps(model: nn.Module, x: torch.Tensor, outputs=(), inputs=()) -> tuple[torch.Tensor, dict]:
    """Logits and the named modules' outputs (``name``) / inputs (``name:in``), read with plain torch hooks."""
    got, handles, mods = {}, [], dict(model.named_modules())
    for n in outputs:
        handles.append(mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)))
    for n in inputs:
        handles.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n + ":in", a[0])))
    try:
        z = model(x)
    finally:
        for h in handles:
            h.remove()
    return z, got


def grads(loss: torch.Tensor, params) -> list:
    """``d loss / d p`` for every ``p`` of ``params`` (zeros where ``loss`` does not depend on ``p``)."""
    params = list(params)
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True), params)]
