"""CPU IF kernel in C++ (``csrc/if_scan.cpp``): a whole chunk of timesteps in one pass over the neurons.

The compiled per-timestep kernel (:mod:`bsnn.snn.kernels.inductor_if`) is dispatched once per timestep and reads
and writes every membrane at every step; this one keeps each membrane in a register while it walks that neuron's
T currents, reads each current once, writes each spike once (float32 or bfloat16: the next binary layer's input
dtype), and counts the spikes per sample and step on the way. AVX-512 where the CPU has it (checked at run time),
a portable scalar path otherwise; samples in parallel over torch's threads. Compiled on first use
(:func:`bsnn.snn.kernels.extension.build`). Arithmetic order and float32 rounding as the oracle, so spikes and
membranes are bit-identical (tests).

Layouts: ``x_seq [T, B, ...]`` must be dense with its first two dimensions outermost (``x.reshape(T, B, ...)`` of
a contiguous or channels-last activation), or one such timestep expanded over T (stride 0: a current constant over
the chunk, :meth:`bsnn.snn.neuron.IFNeuron.forward_constant`, read once per chunk); the per-neuron terms
(``gain``, ``bias``, ``pre_bias``, ``theta``) must not depend on the sample. Anything else runs on the compiled
per-timestep kernel instead (same results).
"""

from __future__ import annotations

import functools
import logging

import torch

from bsnn.snn.kernels.extension import code_paths
from bsnn.snn.kernels.inductor_if import if_scan_fused

log = logging.getLogger(__name__)

EXTENSION_NAME = "bsnn_if"
PATHS = {"auto": 0, "generic": 1, "avx512": 2}
"""C++ code paths by name (``auto``: the best this CPU runs); ids as in ``csrc/if_scan.cpp``."""


@functools.lru_cache(maxsize=1)
def extension_paths() -> tuple[str, ...] | None:
    """The code paths this CPU runs (e.g. ``('generic', 'avx512')``), building the extension on first use; None,
    with one logged warning, where it cannot be built."""
    return code_paths(EXTENSION_NAME, "if_scan.cpp", "the C++ IF kernel",
                      "the IF layers use the compiled per-timestep kernel instead")


def _sample_major(x_seq: torch.Tensor) -> bool:
    """``x_seq [T, B, ...]`` is dense and each ``[t, b]`` block is one run of memory, in t-then-b order."""
    if x_seq.device.type != "cpu" or x_seq.dim() < 2 or not _dense(x_seq):
        return False
    f = x_seq[0, 0].numel()  # a size-1 dimension's stride is arbitrary
    return ((x_seq.shape[1] == 1 or x_seq.stride(1) == f)
            and (x_seq.shape[0] == 1 or x_seq.stride(0) == f * x_seq.shape[1]) and _dense(x_seq[0, 0]))


def _dense(t: torch.Tensor) -> bool:
    """``t`` covers one gap-free, non-overlapping run of memory (in some order of its dimensions)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return t.numel() > 0


def _channels_last(sample: torch.Tensor) -> bool:
    """One sample ``[C, H, W]`` is stored channels-last (``h, w, c`` order, c fastest)."""
    c, h, w = sample.shape
    return ((c == 1 or sample.stride(0) == 1) and (w == 1 or sample.stride(2) == c)
            and (h == 1 or sample.stride(1) == w * c))


def avg_pool_2x2(spikes: torch.Tensor) -> torch.Tensor:
    """``spikes [T, B, C, H, W]`` -> their 2x2, stride-2 average pooling ``[T, B, C, H // 2, W // 2]`` (the
    unfused operation the pooled kernel replaces; its oracle)."""
    t, b = spikes.shape[:2]
    pooled = torch.nn.functional.avg_pool2d(spikes.reshape(t * b, *spikes.shape[2:]), 2)
    return pooled.reshape(t, b, *pooled.shape[1:])


def _memory(t: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a dense tensor's memory, in memory order."""
    return t.as_strided((t.numel(),), (1,))


def _per_neuron(term: torch.Tensor | None, sample: torch.Tensor, fill: float) -> torch.Tensor | None:
    """``term`` (broadcast against one timestep ``[B, ...]``) as float32 ``[F]`` in ``sample``'s memory order, a
    one-element tensor for a scalar, or None when it varies over the batch."""
    if term is None or term.numel() == 1:
        value = fill if term is None else term.reshape(())
        return torch.as_tensor(value, dtype=torch.float32).reshape(1).contiguous()
    step_dims = sample.dim() + 1
    if term.dim() == step_dims:
        if term.shape[0] != 1:
            return None
        term = term[0]
    out = torch.empty_like(sample, dtype=torch.float32)  # the sample's memory format
    out.copy_(torch.broadcast_to(term, sample.shape))
    return _memory(out)


def if_scan_cpp(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, counts: list | None = None, path: str = "auto",
                residual: torch.Tensor | None = None, absmax: bool = False,
                residual_scale: torch.Tensor | None = None, residual_dtype: torch.dtype | None = None,
                pool: bool = False) -> tuple:
    """IF over ``x_seq [T, B, ...]`` with current ``((x + pre_bias) + r)·gain + bias``, threshold ``theta``, from
    membranes ``v [B, ...]``. ``r`` is a residual block's shortcut current (optional), added after the synaptic bias
    as the unfused graph adds it: ``residual [T, B, ...]`` (float32 or bfloat16) itself, or, with
    ``residual_scale`` (broadcast against one timestep: the shortcut's :class:`~bsnn.snn.neuron.ChannelScale`),
    ``(residual * residual_scale.to(dtype)).float()`` with ``dtype = residual_dtype or residual.dtype`` — that
    module's multiply in the graph's dtype (float32 for {0, 1} spikes stored in bfloat16 in place of float32 ones),
    done inside the kernel's pass. Returns ``(spikes [T, B, ...] in out_dtype
    (default float32), v_next)`` in ``x_seq``'s layout and appends each step's spikes per sample (float32 ``[B]``)
    to ``counts``. With ``absmax``, returns ``(spikes, v_next, max |x|)`` (a python float, read on the way: the
    bf16 synapse's exactness check). With ``pool`` (``x_seq [T, B, C, H, W]``, no residual), the spikes come back
    through a 2x2, stride-2 average pooling, ``[T, B, C, H // 2, W // 2]``, equal to ``avg_pool2d`` of the spikes
    (sums of four {0, 1} spikes times 0.25 are exact), pooled inside the kernel's pass where the samples are
    channels-last (the full-resolution spikes are never written). Falls back to
    :func:`~bsnn.snn.kernels.inductor_if.if_scan_fused` (then pooled by ``avg_pool2d``) where the layout or terms do
    not fit (module docstring) or the extension is unavailable."""
    out_dtype = out_dtype or (x_seq.dtype if x_seq.dtype == torch.float32 else torch.float32)
    paths = extension_paths()
    constant = x_seq.shape[0] > 1 and x_seq.stride(0) == 0  # one current repeated over the chunk (an expand)
    x_mem = x_seq[:1] if constant else x_seq
    fits = (paths is not None and x_seq.dtype in (torch.float32, torch.bfloat16)
            and out_dtype in (torch.float32, torch.bfloat16) and _sample_major(x_mem))
    sample = x_seq[0, 0] if fits else None
    if pool:
        if residual is not None or x_seq.dim() != 5 or min(x_seq.shape[-2:]) < 2:
            raise ValueError(f"if_scan_cpp: pool needs x_seq [T, B, C, H, W] with H, W >= 2 and no residual, got "
                             f"{tuple(x_seq.shape)}{' with a residual' if residual is not None else ''}")
        fits = fits and _channels_last(sample)
    if fits and residual is not None:  # the residual must be in the current's memory order
        fits = (not constant and residual.dtype in (torch.float32, torch.bfloat16) and residual.shape == x_seq.shape
                and residual.stride() == x_seq.stride())
    product = None if residual is None else (residual_dtype or residual.dtype)  # the multiply's dtype
    scale = None if residual_scale is None or residual is None else residual_scale.to(product).float()
    terms = [_per_neuron(t, sample, fill) for t, fill in ((theta, 1.0), (gain, 1.0), (bias, 0.0), (pre_bias, 0.0),
                                                          (scale, 1.0))] if fits else []
    if not fits or any(t is None for t in terms) or (path != "auto" and path not in paths):
        if fits and path != "auto" and path not in paths:
            raise ValueError(f"if_scan_cpp: unknown or unsupported code path {path!r}; this CPU runs "
                             f"{', '.join(paths)}")
        amax = float(x_seq.abs().max()) if absmax else None
        if residual is not None:  # the unfused current, rounded as the graph rounds it
            if residual_scale is not None:
                residual = residual.to(product) * residual_scale.to(product)
            x_seq = (x_seq.float() if pre_bias is None else x_seq.float() + pre_bias) + residual.float()
            pre_bias = None
        out = if_scan_fused(x_seq, theta, v, gain, bias, pre_bias, out_dtype, counts)
        if pool:
            out = (avg_pool_2x2(out[0]), out[1])
        return (*out, amax) if absmax else out
    v_next = torch.empty_like(x_seq[0], dtype=torch.float32)
    if v.dtype != torch.float32 or v.shape != v_next.shape or v.stride() != v_next.stride():
        v = v_next.copy_(v)  # the kernel reads the membranes in the current's memory order
    t, b, f = x_seq.shape[0], x_seq.shape[1], sample.numel()
    if pool:  # [T, B, C, H/2, W/2], channels-last samples
        c, h, w = sample.shape
        fo = c * (h // 2) * (w // 2)
        spikes = torch.empty(t * b * fo, dtype=out_dtype, device=x_seq.device).as_strided(
            (t, b, c, h // 2, w // 2), (b * fo, fo, 1, (w // 2) * c, c))
        hwc = (h, w, c)
    else:
        fo, hwc = f, (0, 0, 0)
        step = torch.empty_like(x_seq[0], dtype=out_dtype)  # one timestep in the current's memory order
        spikes = torch.empty(t * b * f, dtype=out_dtype, device=x_seq.device).as_strided(
            x_seq.shape, (b * f, *step.stride()))
    amax = torch.empty(b, dtype=torch.float32) if absmax else None
    n = torch.ops.bsnn_if.scan(_memory(x_mem).view(x_mem.shape[0], b, f), _memory(v), _memory(v_next),
                               _memory(spikes).view(t, b, fo), *terms[:4],
                               None if residual is None else _memory(residual).view(t, b, f), amax,
                               counts is not None, PATHS[path], terms[4],
                               scale is not None and product == torch.bfloat16, *hwc)
    if counts is not None:
        counts.extend(n.unbind(0))
    return (spikes, v_next, float(amax.max())) if absmax else (spikes, v_next)
