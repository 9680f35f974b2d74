"""Bit-packed binary synapses in Triton (CUDA): ``2·popcount(s ∧ w⁺) − popcount(s)`` on int64 words.

The packing and the packed im2col are the torch reference ones of :mod:`bsnn.snn.kernels.bitpack` (elementwise
and gather ops that run on any device); the reduction — a matrix product in which multiply-add is replaced by
AND + popcount — is one Triton kernel: each program owns a ``BLOCK_M x BLOCK_N`` tile of output pixels x output
channels, walks the ``L`` words of the receptive fields ``BLOCK_K`` at a time, and writes
``[(out +)] scale·(2·Σ popcount(s ∧ w⁺) − Σ popcount(s)) [+ bias]`` in float32 (exact: integer sums).

Popcount is ``libdevice.popc`` (the ``popc.b64`` instruction) on CUDA; under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set before triton is imported: how the tests check this kernel on machines without a GPU)
libdevice is not available, so there it is the SWAR bit count (Hacker's Delight, 5-2) on the same words — same
integer result. Not measured on a GPU in this repository yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from bsnn.snn.kernels.bitpack import (Engine, Geometry, PackedWeights, pack_counts_reference, pack_spike_map,
                                      packed_im2col)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _popcount(x, USE_POPC: tl.constexpr):
    """Set bits of each uint64 lane, as int32."""
    if USE_POPC:
        return libdevice.popc(x.to(tl.int64, bitcast=True))  # __nv_popcll: signed int64 in, int32 out
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def _bitpack_mm_kernel(s_ptr, w_ptr, bias_ptr, out_ptr, M, N, L, scale, HAS_BIAS: tl.constexpr,
                       ACCUMULATE: tl.constexpr, USE_POPC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    ps = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, L, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        s = tl.load(s_ptr + rm[:, None] * L + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < L), other=0)
        w = tl.load(w_ptr + rn[:, None] * L + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < L), other=0)
        s = s.to(tl.uint64, bitcast=True)
        w = w.to(tl.uint64, bitcast=True)
        both = s[:, None, :] & w[None, :, :]  # [BLOCK_M, BLOCK_N, BLOCK_K]
        acc += tl.sum(_popcount(both, USE_POPC), axis=2)
        ps += tl.sum(_popcount(s, USE_POPC), axis=1)
    y = (2 * acc - ps[:, None]).to(tl.float32) * scale
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if ACCUMULATE:
        y = tl.load(out_ptr + offs, mask=mask, other=0.0) + y
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(out_ptr + offs, y, mask=mask)


def popcount_matmul(s: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``s [M, L]`` packed spikes, ``w [N, L]`` packed ``w⁺`` rows -> ``[(out +)] scale·(2·popc(s∧w) − popc(s))
    [+ bias]`` ``[M, N]`` float32 (accumulated into ``out`` when given)."""
    s, w = s.contiguous(), w.contiguous()
    m, length = s.shape
    n = w.shape[0]
    y = out if out is not None else torch.empty(m, n, dtype=torch.float32, device=s.device)
    b = bias.float().contiguous() if bias is not None else y  # any pointer when HAS_BIAS is False
    bm, bn, bk = 32, 32, 8
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _bitpack_mm_kernel[grid](s, w, b, y, m, n, length, float(scale), HAS_BIAS=bias is not None,
                             ACCUMULATE=out is not None, USE_POPC=not INTERPRETED, BLOCK_M=bm, BLOCK_N=bn,
                             BLOCK_K=bk)
    return y


def conv_packed(s: torch.Tensor, pw: PackedWeights, bias: torch.Tensor | None, g: Geometry,
                scale: float) -> torch.Tensor:
    """The :class:`~bsnn.snn.kernels.bitpack.Engine` convolution: packed spikes ``s [N, H, W, CW]`` or bit planes
    ``[P, N, H, W, CW]`` -> ``[N, Ho, Wo, Cout]`` float32 (the reference packed im2col, then
    :func:`popcount_matmul` per plane, accumulating ``scale·2^b·…``; the bias with the last plane)."""
    planes = s if s.dim() == 5 else s.unsqueeze(0)
    y = None
    for b, plane in enumerate(planes):
        cols = packed_im2col(plane, pw.in_channels, g)
        last = b == len(planes) - 1
        y = popcount_matmul(cols.reshape(-1, cols.shape[-1]), pw.rows, bias if last else None, scale * 2.0 ** b, y)
    return y.view(*cols.shape[:3], pw.cout)


def triton_engine() -> Engine:
    """The Triton engine (CUDA; CPU tensors under ``TRITON_INTERPRET=1``)."""
    return Engine("triton", pack_spike_map, pack_counts_reference, conv_packed)
