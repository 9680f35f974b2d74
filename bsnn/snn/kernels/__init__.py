"""IF-scan backends registered by name; each must equal :func:`bsnn.snn.functional.if_multistep`.

A kernel has the signature ``(x_seq [T, B, ...], theta, v [B, ...]) -> (spikes [T, B, ...], v_next [B, ...])``.
"""

from __future__ import annotations

from typing import Callable

import torch

from bsnn._registry import Registry
from bsnn.snn.functional import if_multistep

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
KERNELS: Registry[Kernel] = Registry("IF kernel")


@KERNELS.register("reference")
def reference_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle itself (out-of-place loop)."""
    return if_multistep(x_seq, theta, v)


@KERNELS.register("torch")
def inplace_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place torch loop: reuses ``x_seq``'s storage for the spikes and one membrane buffer.

    Same arithmetic order as the oracle (``v + x``, compare, ``v - s·θ``), so spikes are bit-identical.
    """
    v = v.clone()
    out = torch.empty_like(x_seq)
    unit = theta.numel() == 1 and bool(theta == 1)  # IFNeuron works in units of θ: skip the multiply
    for t in range(x_seq.shape[0]):
        v.add_(x_seq[t])
        s = out[t]
        s.copy_(v >= theta)
        v.sub_(s if unit else s * theta)
    return out, v


@KERNELS.register("triton")
def triton_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton scan (:mod:`bsnn.snn.kernels.triton_if`); needs CUDA, or ``TRITON_INTERPRET=1`` on CPU."""
    from bsnn.snn.kernels.triton_if import if_scan

    return if_scan(x_seq, theta.reshape(-1) if theta.numel() > 1 else theta.reshape(()), v)


def default_kernel(device: torch.device) -> str:
    """``triton`` on CUDA (when triton imports), else the in-place ``torch`` loop."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            pass
    return "torch"


def get_kernel(name: str) -> Kernel:
    """The registered kernel ``name`` (unknown names list the valid ones)."""
    return KERNELS.get(name)
