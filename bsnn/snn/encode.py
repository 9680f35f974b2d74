"""Input encoders: one analog sample batch ``[B, ...]`` -> a chunk of input timesteps ``[Tc * B, ...]``."""

from __future__ import annotations

import torch

from bsnn._registry import Registry

ENCODERS: Registry = Registry("input encoding")


@ENCODERS.register("direct")
def direct(x: torch.Tensor, timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Direct (analog) encoding: the same image every timestep. ``[B, ...] -> [T * B, ...]`` (a broadcast view
    materialised once per chunk)."""
    return x.unsqueeze(0).expand(timesteps, *x.shape).reshape(timesteps * x.shape[0], *x.shape[1:])


@ENCODERS.register("poisson")
def poisson(x: torch.Tensor, timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Signed Bernoulli rate code with expectation equal to the analog input.

    Each input element fires with probability ``|x| / m`` per timestep, carrying ``sign(x)·m``, where ``m`` is
    the sample's max ``|x|`` (inputs are normalised, hence signed). ``[B, ...] -> [T * B, ...]``.
    """
    m = x.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    p = (x.abs() / m).unsqueeze(0).expand(timesteps, *x.shape)
    u = torch.rand(p.shape, generator=generator, device=x.device, dtype=x.dtype)
    s = (u < p).to(x.dtype) * (torch.sign(x) * m).unsqueeze(0)
    return s.reshape(timesteps * x.shape[0], *x.shape[1:])


def get_encoder(name: str):
    """The registered encoder ``name``."""
    return ENCODERS.get(name)
