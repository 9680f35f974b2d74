"""CPU IF kernel: one timestep of integrate-and-fire fused into a single vectorised loop by ``torch.compile``.

The eager torch loop makes four to five full passes over the neurons per timestep (scale, add, compare, convert,
subtract); the compiled step reads the input current and the membrane once and writes the spike and the membrane
once. Shapes are dynamic, so one compiled kernel serves every layer and batch size (a new one is built only
for a new rank or dtype). Arithmetic as the oracle: ``v = v + ((x + pre_bias)·gain + bias)``, ``s = v >= θ``, ``v = v − s·θ``,
each operation rounded to float32 (inductor does not contract multiply-adds on CPU), so spikes are bit-identical;
the tests check it.

If compilation fails (no working C++ compiler), the same step runs eagerly, with one warning.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Callable

import torch

log = logging.getLogger(__name__)


def if_step(v: torch.Tensor, x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, pre_bias: torch.Tensor,
            theta: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One timestep in float32: ``v += (x + pre_bias)·gain + bias``, fire, reset.

    Returns ``(spikes in out_dtype, v_next, spikes per sample [B] (float32))``.
    """
    v = v + ((x.float() + pre_bias) * gain + bias)
    s = (v >= theta).float()
    return s.to(out_dtype), v - s * theta, s.sum(dim=list(range(1, s.dim())))


@functools.lru_cache(maxsize=1)
def compiler_works() -> bool:
    """A C++ compiler for inductor's CPU backend is on the PATH (``$CXX``, g++, c++ or clang++)."""
    if os.environ.get("BSNN_NO_COMPILE"):
        return False
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(n and shutil.which(n) for n in names)


RECOMPILE_LIMIT = 64
"""Dynamic shapes still specialise on rank, dtypes and a few size ranges; a network's IF layers need a handful of
variants, more than dynamo's default of 8 per function, beyond which it would silently run the step eagerly."""


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable:
    return torch.compile(if_step, dynamic=True)


def _limit_patch():
    import torch._dynamo.config as dcfg

    key = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    return dcfg.patch(**{key: max(RECOMPILE_LIMIT, getattr(dcfg, key))})


_failed = False


def _step(v, x, gain, bias, pre_bias, theta, out_dtype):
    global _failed
    if not _failed and compiler_works():
        try:
            with _limit_patch():
                return _compiled()(v, x, gain, bias, pre_bias, theta, out_dtype)
        except Exception as e:  # noqa: BLE001 - any compile failure: fall back to the eager step
            _failed = True
            log.warning("bsnn: torch.compile of the IF kernel failed (%s: %s); using the eager step",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return if_step(v, x, gain, bias, pre_bias, theta, out_dtype)


def if_scan_fused(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, counts: list | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """IF over ``x_seq [T, B, ...]`` with current ``(x + pre_bias)·gain + bias`` (float32); returns
    ``(spikes [T, B, ...] in out_dtype (default float32), v_next)`` and appends each step's spikes per sample to
    ``counts`` when given. Absent terms are exact no-ops (·1, +0)."""
    f32, dev = torch.float32, x_seq.device

    def term(t: torch.Tensor | None, fill: float) -> torch.Tensor:
        return torch.full((), fill, dtype=f32, device=dev) if t is None else t.to(f32)

    gain, bias, pre_bias = term(gain, 1.0), term(bias, 0.0), term(pre_bias, 0.0)
    theta = torch.as_tensor(theta, dtype=f32, device=dev)
    out_dtype = out_dtype or (x_seq.dtype if x_seq.dtype.is_floating_point and x_seq.dtype.itemsize >= 4 else f32)
    spikes = []
    for t in range(x_seq.shape[0]):
        s, v, n = _step(v, x_seq[t], gain, bias, pre_bias, theta, out_dtype)
        spikes.append(s)
        if counts is not None:
            counts.append(n)
    return (spikes[0].unsqueeze(0) if len(spikes) == 1 else torch.stack(spikes)), v
