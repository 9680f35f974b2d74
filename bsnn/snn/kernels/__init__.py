"""IF-scan backends registered by name; each must equal :func:`bsnn.snn.functional.if_multistep`.

A kernel has the signature ``(x_seq [T, B, ...], theta, v [B, ...], gain=None, bias=None, pre_bias=None,
out_dtype=None, counts=None) -> (spikes [T, B, ...], v_next [B, ...])``:

* the neurons integrate the float32 current ``(x + pre_bias)·gain + bias`` (each term optional and broadcast
  against one timestep; every operation rounded in float32, as the oracle run on the pre-scaled input);
  ``pre_bias`` is a synaptic bias deferred into the neuron (:mod:`bsnn.snn.synapse`), which lets ``x`` arrive as
  an exact bf16 integer sum;
* spikes come out in ``out_dtype`` (default: the current's dtype);
* if ``counts`` (a list) is given, the kernel appends the spikes per sample of each timestep (float32 ``[B]``).

Fused kernels do all of it in one pass; the others pre-scale with :func:`prescale` and count afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from bsnn._registry import Registry
from bsnn.errors import ConfigError
from bsnn.snn.functional import if_multistep, per_sample_spikes
from bsnn.snn.kernels.cpp_if import extension_paths as cpp_extension_paths
from bsnn.snn.kernels.cpp_if import if_scan_cpp
from bsnn.snn.kernels.inductor_if import compiler_works, if_scan_fused

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
KERNELS: Registry[Kernel] = Registry("IF kernel")


def prescale(x_seq: torch.Tensor, gain: torch.Tensor | None, bias: torch.Tensor | None,
             pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x_seq + pre_bias) · gain + bias`` in float32 (terms may be None): the current the neurons integrate."""
    if x_seq.dtype in (torch.bfloat16, torch.float16):
        x_seq = x_seq.float()
    if pre_bias is not None:
        x_seq = x_seq + pre_bias.to(x_seq.dtype)
    if gain is not None:
        x_seq = x_seq * gain.to(x_seq.dtype)
    if bias is not None:
        x_seq = x_seq + bias.to(x_seq.dtype)
    return x_seq


def counted(spikes: torch.Tensor, counts: list | None) -> torch.Tensor:
    """Append the per-sample spike counts of every timestep of ``spikes [T, B, ...]`` to ``counts`` (if given)."""
    if counts is not None:
        counts.extend(per_sample_spikes(spikes).unbind(0))
    return spikes


@KERNELS.register("reference")
def reference_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, counts: list | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle itself (out-of-place loop)."""
    s, v = if_multistep(prescale(x_seq, gain, bias, pre_bias), theta, v)
    return counted(s.to(out_dtype or s.dtype), counts), v


@KERNELS.register("torch")
def inplace_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None, counts: list | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place torch loop: one membrane buffer, spikes written into a preallocated output.

    Same arithmetic order as the oracle (``v + x``, compare, ``v - s·θ``), so spikes are bit-identical.
    """
    x_seq = prescale(x_seq, gain, bias, pre_bias)
    v = v.clone()
    out = torch.empty_like(x_seq)
    unit = theta.numel() == 1 and bool(theta == 1)  # IFNeuron works in units of θ: skip the multiply
    for t in range(x_seq.shape[0]):
        v.add_(x_seq[t])
        s = out[t]
        s.copy_(v >= theta)
        v.sub_(s if unit else s * theta)
    return counted(out.to(out_dtype or out.dtype), counts), v


@KERNELS.register("triton")
def triton_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, counts: list | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton scan (:mod:`bsnn.snn.kernels.triton_if`); needs CUDA, or ``TRITON_INTERPRET=1`` on CPU."""
    from bsnn.snn.kernels.triton_if import if_scan

    x_seq = prescale(x_seq, gain, bias, pre_bias)
    s, v = if_scan(x_seq, theta.reshape(-1) if theta.numel() > 1 else theta.reshape(()), v)
    return counted(s.to(out_dtype or s.dtype), counts), v


@KERNELS.register("inductor")
def inductor_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None, counts: list | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused, vectorised C++ loop per timestep (:mod:`bsnn.snn.kernels.inductor_if`, compiled by
    ``torch.compile`` on first use): gain, bias, integrate, fire and reset in a single pass over the neurons."""
    return if_scan_fused(x_seq, theta, v, gain, bias, pre_bias, out_dtype, counts)


@KERNELS.register("cpp")
def cpp_kernel(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, counts: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole chunk of timesteps in one C++ pass over the neurons (:mod:`bsnn.snn.kernels.cpp_if`; AVX-512
    where the CPU has it), compiled on first use; layouts it does not take run on the ``inductor`` kernel."""
    return if_scan_cpp(x_seq, theta, v, gain, bias, pre_bias, out_dtype, counts)


def cpp_available() -> bool:
    """Whether the C++ IF extension builds and loads here (compiled on the first call)."""
    return cpp_extension_paths() is not None


def inductor_available() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (a C++ compiler is on the PATH)."""
    return compiler_works()


def default_kernel(device: torch.device) -> str:
    """``triton`` on CUDA (when triton imports); on CPU ``cpp`` where its extension builds, else ``inductor``
    where a C++ compiler works for torch.compile, else ``torch``."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            pass
        return "torch"
    if cpp_available():
        return "cpp"
    return "inductor" if inductor_available() else "torch"


def check_kernel(name: str, device: torch.device) -> None:
    """Raise :class:`~bsnn.errors.ConfigError` if kernel ``name`` cannot run on ``device``: ``triton`` needs the
    triton package and a CUDA device (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``, for testing)."""
    get_kernel(name)
    if name != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("simulate.kernel=triton needs the triton package (pip install triton); use "
                          "simulate.kernel=auto to pick a kernel that runs here")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"simulate.kernel=triton needs a CUDA device, but the simulation runs on {device}; use "
                          "simulate.kernel=auto (inductor or torch on CPU) or run on CUDA (run.device=cuda)")


def get_kernel(name: str) -> Kernel:
    """The registered kernel ``name`` (unknown names list the valid ones)."""
    return KERNELS.get(name)
