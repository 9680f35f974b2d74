"""Bit-packed binary synapses: {0, 1} spikes times ±1 weights through AND and popcount on 64-bit words.

A ±1 weight ``w`` is stored as one bit ``w⁺ = (w == +1)``, a spike ``s`` as one bit; 64 of them per int64 word
along the reduction axis (input channel, then kernel position). For one output,

    Σ_k w_k·s_k = #{s = 1, w = +1} − #{s = 1, w = −1} = 2·popcount(s ∧ w⁺) − popcount(s),

an integer, so the result is exact and bit-identical to the fp32 convolution (the oracle). This is the
AND-popcount form of the XNOR-popcount product of binary networks (XNOR-Net, Rastegari et al. 2016; the
{0, 1} x {±1} case is the one of binary *spiking* layers, where the input bits are the spikes themselves).

Compared with the CPU kernel of BMXNet (Yang et al. 2017; ``hpi-xnor/BMXNet``, ``smd_hpi/src/xnor_cpu.cc``,
``xnor_gemm``: one packed input word broadcast against a row of packed weights laid out [K words, N outputs],
``popcount(~(a ^ b))`` accumulated into the float output): the same broadcast-against-transposed-weights loop
(our ``cols [L, CoutP]``, 8 outputs per AVX-512 VPOPCNTQ instead of one ``__builtin_popcountl``), but (1) AND
with the ``+1`` bits and ``2·popcount − popcount(s)`` instead of XNOR, since the inputs are {0, 1}, not ±1 (no
``K − 2·popcount(a ⊕ b)`` correction, and zero padding is simply zero bits, where BMXNet's ±1 encoding cannot
represent it); (2) integer accumulation, converted to float once, with the bias added afterwards (exactness);
(3) a direct convolution on row windows instead of BMXNet's patch2col + gemm; (4) bit planes for pooled inputs.

Inputs that are not {0, 1} — average-pooled spikes, multiples ``n·q`` of a quantum ``q = 2^-k`` with small integer
counts ``n`` (:mod:`bsnn.snn.synapse`) — are split into bit planes: ``n = Σ_b 2^b·n_b`` with ``n_b ∈ {0, 1}``, and
``y = Σ_b q·2^b·(2·popcount(n_b ∧ w⁺) − popcount(n_b))``, still exact (every partial sum is an integer multiple
of ``q`` far below 2^24·q).

Layouts (all int64 words; bit ``k`` of word ``j`` is element ``64·j + k``, zero bits beyond the end):

* spikes ``[N, H, W, CW]``: the channels of each pixel, ``CW = ceil(C / 64)`` (a linear layer: ``[M, 1, 1, KW]``);
* receptive fields (packed im2col, :func:`packed_im2col`): each kernel row's ``KW·C`` bits in (kw, channel)
  order packed into its own ``KWW = ceil(KW·C / 64)`` words (no padding bits between the columns of a row, so
  16 channels x 3 columns take one word, not three), the KH rows one after the other: ``L = KH·KWW`` words.
  The C++ kernel builds the row windows once per (input row, output column) — each is shared by the KH output
  rows whose fields contain it — and reads the fields straight from them (a direct convolution: the im2col
  matrix never exists in memory);
* weights :class:`PackedWeights`: ``rows [Cout, L]`` in the same order, and transposed, ``cols [L, CoutP]``, with
  ``CoutP = Cout`` rounded up to 8 (the AVX-512 path does 8 output channels per 512-bit register);
* output ``[N, Ho, Wo, Cout]`` float32 (a channels-last ``[N, Cout, Ho, Wo]``), bias added last as in fp32.

Engines (:class:`Engine`) implement the two packed primitives, *pack* and *packed convolution*:

* :func:`reference_engine`: pure torch, any device, written from the formula above (the oracle of the others:
  :func:`pack_bits`, :func:`unpack_bits`, :func:`popcount_dot`, :func:`packed_im2col`);
* :func:`cpp_engine`: the C++ extension ``csrc/bitpack.cpp`` (``torch.utils.cpp_extension.load``, compiled once on
  first use into torch's extension cache, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), with an
  AVX-512 VPOPCNTDQ path where the CPU has it (checked at run time), a scalar POPCNT path and a generic
  ``__builtin_popcountll`` one, rows of output pixels in parallel over torch's threads (``at::parallel_for``);
* ``bsnn.snn.kernels.triton_bitpack.triton_engine``: Triton, for CUDA.

If the extension cannot be built (no compiler, a failed compilation, ``BSNN_NO_COMPILE`` set),
:func:`extension_paths` logs one warning and returns None; the ``bitpack`` synapse mode then computes its layers
in the ``bf16`` mode (:mod:`bsnn.snn.synapse`).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, NamedTuple

import torch

from bsnn.snn.kernels.extension import code_paths

log = logging.getLogger(__name__)

WORD_BITS = 64
EXTENSION_NAME = "bsnn_bitpack"
PATHS = {"auto": 0, "generic": 1, "popcnt": 2, "avx512_vpopcntdq": 3}
"""C++ code paths by name (``auto``: the best this CPU runs); ids as in ``csrc/bitpack.cpp``."""


# --------------------------------------------------------------------------------------- pure reference
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack the last axis of ``bits [..., K]`` (nonzero = 1) 64 per word: ``-> [..., ceil(K/64)]`` int64, bit
    ``k`` of word ``j`` = element ``64·j + k``, zero bits beyond ``K``."""
    k = bits.shape[-1]
    kw = -(-k // WORD_BITS)
    b = torch.zeros(*bits.shape[:-1], kw * WORD_BITS, dtype=torch.int64, device=bits.device)
    b[..., :k] = (bits != 0).to(torch.int64)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=bits.device)
    return (b.view(*bits.shape[:-1], kw, WORD_BITS) << shifts).sum(-1)  # distinct bits: the sum is an OR


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``words [..., KW]`` int64 -> the first ``k`` bits ``[..., k]`` uint8."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift, then the low bit: correct for bit 63 too
    return bits.flatten(-2)[..., :k].to(torch.uint8)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word, ``[...] -> [...]`` int64 (by unpacking: the oracle, not fast)."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).sum(-1)


def popcount_dot(s: torch.Tensor, w: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """``2·popcount(s ∧ w⁺) − popcount(s)`` summed over words: ``s [M, L]``, ``w [N, L]`` packed -> ``[M, N]`` int64,
    the dot product of the {0, 1} vectors ``s`` with the ±1 vectors ``w`` (bit set = +1)."""
    out = []
    for sc in s.split(rows_per_chunk):
        both = popcount(sc.unsqueeze(1) & w.unsqueeze(0)).sum(-1)
        out.append(2 * both - popcount(sc).sum(-1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, w.shape[0], dtype=torch.int64, device=s.device)


def pack_spike_map(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Reference packing of ``x [N, C, H, W]`` (nonzero = 1) into ``[N, H, W, CW]`` int64 words; also says
    whether ``x`` holds values other than 0 and 1 (then the caller splits it into bit planes)."""
    not_binary = bool(((x != 0) & (x != 1)).any())
    return pack_bits(x.permute(0, 2, 3, 1)), not_binary


class Geometry(NamedTuple):
    """Convolution geometry: kernel ``(kh, kw)``, ``stride``, ``padding``, ``dilation`` (pairs)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def flat(self) -> list[int]:
        return [*self.kernel, *self.stride, *self.padding, *self.dilation]

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


LINEAR = Geometry((1, 1), (1, 1), (0, 0), (1, 1))


def packed_im2col(s: torch.Tensor, channels: int, g: Geometry) -> torch.Tensor:
    """Receptive fields of packed spikes ``s [N, H, W, CW]`` (``channels`` bits per pixel) -> ``[N, Ho, Wo, L]``:
    each kernel row's ``kw·channels`` bits in (kw, channel) order packed into its own ``KWW = ceil(kw·channels/64)``
    words, the kh rows one after the other (``L = kh·KWW``), zeros where the window covers the padding."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g
    n, h, w, _ = s.shape
    ho, wo = g.output_hw(h, w)
    bits = torch.zeros(n, h + 2 * ph, w + 2 * pw, channels, dtype=torch.uint8, device=s.device)
    bits[:, ph:ph + h, pw:pw + w] = unpack_bits(s, channels)
    dev = s.device
    iy = (torch.arange(ho, device=dev) * sh).view(ho, 1, 1, 1) + (torch.arange(kh, device=dev) * dh).view(1, 1, kh, 1)
    ix = (torch.arange(wo, device=dev) * sw).view(1, wo, 1, 1) + (torch.arange(kw, device=dev) * dw).view(1, 1, 1, kw)
    fields = bits[:, iy, ix]  # [N, Ho, Wo, kh, kw, C]
    return pack_bits(fields.reshape(n, ho, wo, kh, kw * channels)).reshape(n, ho, wo, -1)


class PackedWeights(NamedTuple):
    """±1 weights packed as ``w⁺`` bits: ``rows [Cout, L]`` (each row the kh·kw·Cin bits in (kh, kw, channel)
    order, as :func:`packed_im2col` lays out a receptive field), ``cols [L, CoutP]`` (CoutP = Cout rounded up to 8,
    zero columns), ``cout`` output channels, ``in_channels`` (Cin; K for a linear layer)."""

    rows: torch.Tensor
    cols: torch.Tensor
    cout: int
    in_channels: int

    def to(self, device: torch.device) -> "PackedWeights":
        return PackedWeights(self.rows.to(device), self.cols.to(device), self.cout, self.in_channels)


def pack_weights(w: torch.Tensor) -> PackedWeights:
    """Pack ±1 weights ``[Cout, Cin, kh, kw]`` (conv) or ``[Cout, K]`` (linear) into :class:`PackedWeights`."""
    w = w.detach()
    if w.dim() == 2:
        w = w[:, :, None, None]
    if not bool((w.abs() == 1).all()):
        raise ValueError("bitpack: weights must be exactly ±1; binarize and convert the network first")
    cout, cin, kh, kw = w.shape
    rows = pack_bits((w.permute(0, 2, 3, 1) > 0).reshape(cout, kh, kw * cin)).reshape(cout, -1).contiguous()
    coutp = -(-w.shape[0] // 8) * 8
    cols = torch.zeros(rows.shape[1], coutp, dtype=torch.int64, device=w.device)
    cols[:, :w.shape[0]] = rows.t()
    return PackedWeights(rows, cols.contiguous(), w.shape[0], w.shape[1])


def pack_counts_reference(x: torch.Tensor, quantum: float) -> tuple[torch.Tensor, bool]:
    """Reference bit planes of ``x [N, C, H, W]`` = counts ``n·quantum`` with integer ``0 <= n <= 255``:
    ``-> (planes [P, N, H, W, CW], exact)``, plane ``b`` packing bit ``b`` of the counts, ``P`` the bit length of the
    largest count (at least 1); ``exact`` is False where some value is not such a multiple."""
    xf = x.float()
    counts = torch.round(xf / quantum)
    exact = bool(((counts * quantum == xf) & (counts >= 0) & (counts <= 255)).all())
    n = counts.clamp(0, 255).to(torch.int64)
    n_planes = max(1, int(n.max()).bit_length()) if n.numel() else 1
    return torch.stack([pack_spike_map((n >> b) & 1)[0] for b in range(n_planes)]), exact


def conv_packed_reference(s: torch.Tensor, pw: PackedWeights, bias: torch.Tensor | None, g: Geometry,
                          scale: float) -> torch.Tensor:
    """Reference packed convolution of spikes ``s [N, H, W, CW]`` or bit planes ``[P, N, H, W, CW]``:
    ``scale·Σ_b 2^b·popcount_dot(im2col(s_b), w) [+ bias]`` in float32 -> ``[N, Ho, Wo, Cout]``."""
    acc = None
    for b, plane in enumerate(s if s.dim() == 5 else s.unsqueeze(0)):
        cols = packed_im2col(plane, pw.in_channels, g)
        dot = popcount_dot(cols.reshape(-1, cols.shape[-1]), pw.rows).reshape(*cols.shape[:3], pw.cout)
        acc = dot * 2 ** b if acc is None else acc + dot * 2 ** b
    y = acc.to(torch.float32) * scale
    return y if bias is None else y + bias.float()


# --------------------------------------------------------------------------------------- engines
class Engine(NamedTuple):
    """The packed primitives of one backend.

    ``pack(x [N, C, H, W]) -> (words [N, H, W, CW], not_binary)``;
    ``pack_counts(x, quantum) -> (planes [P, N, H, W, CW], exact)`` (:func:`pack_counts_reference`);
    ``conv(words or planes, packed weights, bias or None, geometry, scale) -> [N, Ho, Wo, Cout]`` float32
    (:func:`conv_packed_reference`).
    """

    name: str
    pack: Callable[[torch.Tensor], tuple[torch.Tensor, bool]]
    pack_counts: Callable[[torch.Tensor, float], tuple[torch.Tensor, bool]]
    conv: Callable[..., torch.Tensor]


def reference_engine() -> Engine:
    """The pure torch engine (any device): the oracle of the fast ones."""
    return Engine("reference", pack_spike_map, pack_counts_reference, conv_packed_reference)


@functools.lru_cache(maxsize=1)
def extension_paths() -> tuple[str, ...] | None:
    """The C++ code paths this CPU runs (e.g. ``('generic', 'popcnt', 'avx512_vpopcntdq')``, best last), building
    the extension on first use; None, with one logged warning, where it cannot be built."""
    return code_paths(EXTENSION_NAME, "bitpack.cpp", "the bitpack C++ extension",
                      "binary layers use the bf16 synapse mode instead")


def cpp_engine(path: str = "auto") -> Engine:
    """The C++ engine on ``path`` (a key of :data:`PATHS`; ``auto`` = the best this CPU runs). Raises
    ``RuntimeError`` where the extension is unavailable (check :func:`extension_paths` first)."""
    paths = extension_paths()
    if paths is None:
        raise RuntimeError("bitpack: the C++ extension is not available here (see the warning logged when it was "
                           "built); use the reference engine or the bf16 synapse mode")
    if path not in PATHS or (path != "auto" and path not in paths):
        raise ValueError(f"bitpack: unknown or unsupported code path {path!r}; this CPU runs {', '.join(paths)}")
    ops, pid = torch.ops.bsnn_bitpack, PATHS[path]

    def conv(s, pw, bias, g, scale):
        geom = [pw.in_channels, *g.flat()]
        return ops.conv(s, pw.rows, pw.cols, None if bias is None else bias.detach(), geom, float(scale), pid)

    return Engine(f"cpp:{path}", lambda x: tuple(ops.pack(x, pid)),
                  lambda x, q: tuple(ops.pack_counts(x, 1.0 / q, pid)), conv)


# --------------------------------------------------------------------------------------- layers
def conv2d(x: torch.Tensor, pw: PackedWeights, bias: torch.Tensor | None, g: Geometry, quantum: float = 1.0,
           engine: Engine | None = None) -> torch.Tensor:
    """Binary convolution of spikes (or multiples of ``quantum``) ``x [N, C, H, W]`` (any memory layout) with packed
    ±1 weights: ``-> [N, Cout, Ho, Wo]`` float32 in channels-last memory, equal to
    ``F.conv2d(x, w, None, stride, padding, dilation) + bias`` bit for bit (the fp32 engine's arithmetic).

    {0, 1} input is packed as it is; other input as the bit planes of its counts ``x / quantum``
    (``y = quantum·Σ_b 2^b·dot(plane_b)``).

    Args:
        x: the input; time folded into ``N``.
        pw: :func:`pack_weights` of the ±1 weights.
        bias: ``[Cout]`` or None, added last (as fp32 does).
        g: the geometry (groups 1, zero padding).
        quantum: input quantum ``q`` (a power of two; used only when ``x`` is not {0, 1}).
        engine: the backend (default :func:`cpp_engine`).

    Raises:
        ValueError: ``x`` is neither {0, 1} nor made of multiples 0..255 of ``quantum``.
    """
    engine = engine or cpp_engine()
    words, not_binary = engine.pack(x)
    scale = 1.0
    if not_binary:
        words, exact = engine.pack_counts(x, quantum)
        if not exact:
            raise ValueError(f"bitpack: the input is not made of multiples 0..255 of the quantum {quantum:g}; "
                             "compute this layer in the float synapse mode")
        scale = quantum
    return engine.conv(words, pw, bias, g, scale).permute(0, 3, 1, 2)


def linear(x: torch.Tensor, pw: PackedWeights, bias: torch.Tensor | None, quantum: float = 1.0,
           engine: Engine | None = None) -> torch.Tensor:
    """Binary linear layer: ``x [..., K]`` spikes (or multiples of ``quantum``) -> ``[..., Cout]`` float32, equal to
    ``F.linear(x, w, bias)`` bit for bit (see :func:`conv2d`)."""
    lead = x.shape[:-1]
    y = conv2d(x.reshape(-1, x.shape[-1])[:, :, None, None], pw, bias, LINEAR, quantum, engine)
    return y.reshape(*lead, pw.cout)
