"""Arithmetic of binary synaptic layers fed by spikes: float, bf16 (exact) and integer modes.

A binary layer of a converted network stores weights of exactly ±1 (α lives in the thresholds). When its input
is spikes {0, 1} — or average-pooled spikes, multiples of the *quantum* ``q`` (``1/k²`` for plain k x k pooling;
``1/lcm`` of the window divisors PyTorch uses with ``ceil_mode``, ``count_include_pad=False`` or
``divisor_override``, see :func:`input_grid`) — every output is an integer multiple of ``q``: ``y = q · Σ w·n``
with integer ``n``. Three registered modes compute it:

* ``float``: fp32 convolution / matmul, then the bias (exact: every partial sum is a multiple of ``q`` far below
  2^24·q).
* ``bf16``: operands in bfloat16 (0, 1, ±1 and multiples of ``q`` ≥ 2^-8 are exact), channels-last; oneDNN /
  cuBLAS accumulate in fp32, so the only rounding is the bf16 *output*, exact while ``|y| < 256·q`` (8 significant
  bits). The output's max is checked and the layer recomputed in fp32 when it reaches ``256·q`` — so the result
  is bit-identical to ``float``, at the speed of bf16 (2-5x faster convolutions on CPUs with AVX512-BF16).
* ``int``: what an in-memory crossbar computes: inputs as int8 counts ``n = x/q``, weights int8 ±1, int32
  accumulation (``torch._int_mm``; convolutions through im2col), then ``q·sum + bias`` in fp32. Bit-identical
  to ``float``; the integer oracle of the other two.
* ``bitpack``: spikes and ``w = +1`` bits packed 64 per int64 word, ``Σ w·s = 2·popcount(s ∧ w⁺) − popcount(s)``
  (:mod:`bsnn.snn.kernels.bitpack`: a C++ extension with an AVX-512 VPOPCNTDQ path on CPU, Triton on CUDA;
  non-{0, 1} inputs as bit planes of their counts). Bit-identical to ``float``. Where the extension cannot be
  built (no compiler) it computes in ``bf16``, after one logged warning.

Layers not eligible (analog input, full-precision weights, residual-add or scaled inputs, grouped or non-zero
padded convolutions, quanta that are not powers of two ≥ 1/64, inputs beyond an int8 count) are left in fp32. :func:`synapse_mode` swaps the
eligible layers of a :class:`~bsnn.snn.network.SpikingNetwork` for :class:`BinarySynapse` modules and restores
them on exit.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import math
import operator
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from bsnn._registry import Registry
from bsnn.snn.kernels import bitpack
from bsnn.snn.network import is_pass_through, node_shapes
from bsnn.snn.neuron import ChannelScale, ExactnessCheck, IFNeuron, memory_order, pools_2x2

log = logging.getLogger(__name__)

SynapseFn = Callable[["BinarySynapse", torch.Tensor], torch.Tensor]
SYNAPSE_MODES: Registry[SynapseFn] = Registry("synapse mode")

BF16_EXACT_LIMIT = 256
"""Integers of magnitude < 256 (8 significant bits) are exact in bfloat16."""


class InputGrid(NamedTuple):
    """The values a synaptic layer fed by spikes can receive: integer multiples of ``quantum``, in
    ``[0, max_value]``."""

    quantum: float
    max_value: float


def avg_pool_grid(pool: nn.AvgPool2d, in_hw: tuple[int, int]) -> tuple[int, float]:
    """``(L, top)`` for ``pool`` applied to {0, 1} maps of spatial size ``in_hw``: every output is an integer multiple
    of ``1/L`` and at most ``top``.

    ``L`` is the least common multiple of the divisors PyTorch uses over the output positions: ``k²`` for plain
    pooling, fewer elements where ``ceil_mode`` clips a window at the edge or ``count_include_pad=False`` leaves
    padding out, ``divisor_override`` when set. They are measured on an all-ones map, exactly as PyTorch pools it.
    """
    ones = torch.ones(1, 1, *in_hw, dtype=torch.float64)
    k, st, pad, ceil = pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode
    avg = F.avg_pool2d(ones, k, st, pad, ceil, pool.count_include_pad, pool.divisor_override)
    real = F.avg_pool2d(ones, k, st, pad, ceil, True, 1)  # input elements inside each window
    divisors = torch.round(real / avg).long().unique().tolist()
    return math.lcm(*divisors), float(avg.max())


def input_grid(gm: fx.GraphModule, node: fx.Node, shapes: dict[fx.Node, tuple[int, ...] | None]
               ) -> InputGrid | None:
    """The input grid of the synaptic layer at ``node``: quantum 1 for spikes, ``1/L`` after each average pooling
    (:func:`avg_pool_grid`; ``1/k²`` for plain k x k pooling), None otherwise (analog input, residual adds,
    scaling, signed spikes, or anything else between the layer and the IF neurons feeding it). Burst spikes
    (up to Γ per step) raise the grid's top to Γ.

    Args:
        gm: the spiking graph.
        node: the layer's node.
        shapes: every node's output shape for one sample (:func:`bsnn.snn.network.node_shapes`).
    """
    quantum, top, n = 1.0, 1.0, node.args[0]
    while isinstance(n, fx.Node):
        if n.op == "placeholder":
            return None
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, IFNeuron):  # its spikes: integers in [spike_min, spike_max] ({0, 1} for IF)
            return InputGrid(quantum, top * m.spike_max) if m.spike_min >= 0 else None
        if isinstance(m, nn.AvgPool2d):
            src = shapes.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            if src is None or len(src) < 3:
                return None
            lcm, pool_top = avg_pool_grid(m, tuple(src[-2:]))
            quantum, top = quantum / lcm, top * pool_top
        elif not is_pass_through(gm, n, (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)):
            return None
        n = n.args[0]
    return None


def input_grids(snn) -> dict[str, InputGrid | None]:
    """:func:`input_grid` of every synaptic layer of ``snn`` (a :class:`~bsnn.snn.network.SpikingNetwork`)."""
    gm = snn.graph_module
    shapes = node_shapes(gm, snn.input_shape)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    return {layer["name"]: input_grid(gm, nodes[layer["name"]], shapes) for layer in snn.layers}


INT8_MAX = 127


def eligible_layers(snn) -> dict[str, float]:
    """Binary synaptic layers fed by spikes with an exactly representable quantum: name -> quantum ``q``.

    ``q`` must be a power of two ≥ 1/64 (exact in bf16) and the largest input an int8 count (``max/q ≤ 127``);
    other layers (e.g. after 3 x 3 pooling, ``divisor_override=3``, or ``ceil_mode`` / ``count_include_pad=False``
    windows whose divisors are not powers of two) stay in fp32.
    """
    gm = snn.graph_module
    grids = input_grids(snn)
    out = {}
    for layer in snn.layers:
        m, grid = gm.get_submodule(layer["name"]), grids[layer["name"]]
        if not layer["binary"] or grid is None or type(m) not in (nn.Conv2d, nn.Linear):
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            continue
        q = grid.quantum
        if math.log2(1.0 / q) % 1 or 1.0 / q > 64 or grid.max_value / q > INT8_MAX:
            continue  # q must be an exact power of two with int8 counts
        if not bool((m.weight.abs() == 1).all()):
            continue  # weights must be exactly ±1
        out[layer["name"]] = q
    return out


class BinarySynapse(nn.Module):
    """A ±1-weight conv / linear layer with quantised input computed in a registered :data:`SYNAPSE_MODES` mode.

    Args:
        layer: the ``nn.Conv2d`` (groups 1, zero padding) or ``nn.Linear`` with weights exactly ±1; shared.
        quantum: input quantum ``q`` (1 for spikes, 1/k² after plain k x k average pooling; :func:`input_grid`).
        mode: registered mode name.

    Attributes:
        fallbacks: how many calls of the ``bf16`` mode had to be recomputed in fp32 (output ≥ 256·q).
        calls: calls since construction.
    """

    def __init__(self, layer: nn.Module, quantum: float, mode: str) -> None:
        super().__init__()
        self.layer, self.quantum, self.mode = layer, float(quantum), mode
        self.fn = SYNAPSE_MODES.get(mode)
        self.is_conv = isinstance(layer, nn.Conv2d)
        w = layer.weight.detach()
        self.register_buffer("w_bf16", (w.to(memory_format=torch.channels_last) if self.is_conv else w)
                             .to(torch.bfloat16), persistent=False)
        self.register_buffer("w_int8_t", w.reshape(w.shape[0], -1).t().contiguous().to(torch.int8), persistent=False)
        self.packed: bitpack.PackedWeights | None = None  # bitpack mode: w⁺ bits, packed on first use
        self.fallbacks = 0
        self.calls = 0
        self.defer_bias = False  # the consuming IF neuron adds the bias (its ``pre_bias``)
        self.consumer: IFNeuron | None = None  # that neuron, which also checks the bf16 sums' exactness

    def linear_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer's convolution / matmul of ``x`` with ``w``, without bias."""
        m = self.layer
        if self.is_conv:
            return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        b = self.layer.bias
        if b is None or self.defer_bias:
            return y
        return y + (b.view(1, -1, 1, 1) if self.is_conv else b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(self, x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, quantum={self.quantum:g}"


@SYNAPSE_MODES.register("float")
def float_mode(syn: BinarySynapse, x: torch.Tensor) -> torch.Tensor:
    """fp32 (the input's dtype) operation, bias added after the (exact) sum."""
    x = x.float()
    return syn.add_bias(syn.linear_op(x, syn.layer.weight.float()))


@SYNAPSE_MODES.register("bf16")
def bf16_mode(syn: BinarySynapse, x: torch.Tensor) -> torch.Tensor:
    """bf16 operands, fp32 accumulation, bf16 output checked for exactness (fp32 recompute otherwise)."""
    xb = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last if syn.is_conv else torch.preserve_format)
    y = syn.linear_op(xb, syn.w_bf16)
    m = syn.consumer
    if m is not None and m.kernel == "cpp" and not (m._forward_hooks or m._forward_pre_hooks):
        # the consuming neuron's C++ kernel checks the sums as it reads them (no separate pass over them here)
        m.exactness = ExactnessCheck(BF16_EXACT_LIMIT * syn.quantum, lambda: float_mode(syn, x.float()), syn)
        return y
    lo, hi = torch.aminmax(memory_order(y).reshape(-1))  # a view for channels-last: no copy
    if bool(torch.maximum(-lo, hi) >= BF16_EXACT_LIMIT * syn.quantum):
        syn.fallbacks += 1
        return float_mode(syn, x.float())
    if syn.defer_bias:
        return y
    out = syn.add_bias(y)  # bf16 + fp32 bias -> fp32 in one pass (the bf16 -> fp32 cast is exact)
    return out if out.dtype == torch.float32 else out.float()


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [K, N] int8 -> int32``: ``torch._int_mm`` where it supports the shapes, else int32."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return a.to(torch.int32) @ b.to(torch.int32)


@SYNAPSE_MODES.register("int")
def int_mode(syn: BinarySynapse, x: torch.Tensor) -> torch.Tensor:
    """Crossbar arithmetic: int8 input counts x/q and ±1 weights, int32 sums, then ``q·sum + bias``."""
    x = x.float()
    counts = torch.round(x / syn.quantum).to(torch.int8)
    m = syn.layer
    if syn.is_conv:
        cols = F.unfold(counts.float(), m.kernel_size, m.dilation, m.padding, m.stride)  # [N, Cin*k*k, L]
        n, _, length = cols.shape
        acc = int_matmul(cols.transpose(1, 2).reshape(n * length, -1).to(torch.int8), syn.w_int8_t)
        h_out = (x.shape[2] + 2 * m.padding[0] - m.dilation[0] * (m.kernel_size[0] - 1) - 1) // m.stride[0] + 1
        y = acc.reshape(n, length, -1).transpose(1, 2).reshape(n, -1, h_out, length // h_out)
    else:
        y = int_matmul(counts.reshape(-1, counts.shape[-1]), syn.w_int8_t).reshape(*x.shape[:-1], -1)
    return syn.add_bias(y.to(x.dtype) * syn.quantum)


@functools.lru_cache(maxsize=None)
def bitpack_engine(device_type: str) -> bitpack.Engine | None:
    """The packed engine for a device type: Triton on ``cuda`` (when triton imports), the C++ extension on ``cpu``
    (when it builds); None otherwise (the ``bitpack`` mode then computes in ``bf16``)."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            log.warning("bsnn: the bitpack synapse mode needs triton on CUDA (pip install triton); binary layers "
                        "use the bf16 synapse mode instead")
            return None
        from bsnn.snn.kernels.triton_bitpack import triton_engine  # optional dependency, imported when used

        return triton_engine()
    if device_type == "cpu" and bitpack.extension_paths() is not None:
        return bitpack.cpp_engine()
    return None


@SYNAPSE_MODES.register("bitpack")
def bitpack_mode(syn: BinarySynapse, x: torch.Tensor) -> torch.Tensor:
    """AND + popcount on bit-packed spikes and ±1 weights (:mod:`bsnn.snn.kernels.bitpack`), exact; the ``bf16``
    mode where no packed engine runs on ``x``'s device."""
    m = syn.layer
    engine = bitpack_engine(x.device.type)
    if engine is None or (syn.is_conv and isinstance(m.padding, str)):
        return bf16_mode(syn, x)
    if syn.packed is None or syn.packed.rows.device != x.device:
        syn.packed = bitpack.pack_weights(m.weight).to(x.device)
    bias = None if syn.defer_bias or m.bias is None else m.bias.detach()
    if syn.is_conv:
        g = bitpack.Geometry(m.kernel_size, m.stride, m.padding, m.dilation)
        return bitpack.conv2d(x, syn.packed, bias, g, syn.quantum, engine)
    return bitpack.linear(x, syn.packed, bias, syn.quantum, engine)


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs with native bf16 (oneDNN), else ``float``; others unchanged.

    Whether ``bitpack`` beats ``bf16`` depends on the network, so it is not decided here by layer shapes: on the
    AVX-512 VPOPCNTDQ + AVX512-BF16 CPU it was measured on (``benchmarks/simulation_speed.py``) whole simulations
    of the narrow benchmark networks (small CNN, VGG-7 width 0.25, ResNet-20: 16-64 channels) ran at 0.36-0.57x
    the ``bf16`` throughput, a trained airbench student (64-256 channels) at 1.31-1.45x; packing only the layers with
    >= 64 channels measured 0.98-1.04x of ``bf16`` on the narrow ones (the bf16 layers hand their sums to the C++
    IF kernel, the packed ones do not). :func:`bsnn.simulate.simulate` therefore times both on the first batch
    when ``auto`` resolves to ``bf16`` on a CPU (:func:`bsnn.simulate.tune_synapse_mode`).
    """
    if mode != "auto":
        SYNAPSE_MODES.get(mode)
        return mode
    if device.type == "cuda":
        return "bf16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "float"


_PASS_THROUGH = (nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def _shortcut_of(node: fx.Node, user: fx.Node) -> bool:
    """``user`` is a fused residual sum (``forward_residual``) whose shortcut input is ``node``."""
    return _fused_sum(user) and user.args[2] is node


def _fused_sum(node: fx.Node) -> bool:
    """``node`` is a fused residual sum: ``neuron.forward_residual(...)`` (:func:`_fuse_residual`)."""
    return node.op == "call_method" and node.target == "forward_residual"


def _fused_call(node: fx.Node) -> bool:
    """``node`` calls a neuron through a fused method (``forward_residual`` or ``forward_pooled``), the neuron's
    ``get_attr`` its first argument."""
    return node.op == "call_method" and node.target in ("forward_residual", "forward_pooled")


def pooled_neurons(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(neuron, pool)`` node pairs where a plain :class:`IFNeuron`'s only consumer is a 2x2, stride-2 average
    pooling (:func:`~bsnn.snn.neuron.pools_2x2`) that the neuron's kernel can apply on the way
    (:meth:`IFNeuron.forward_pooled`; a neuron reading the input-only part of the graph gets its current once
    per chunk there too, :meth:`~bsnn.snn.network.SpikingNetwork.split_static_constant`)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not IFNeuron or node.kwargs:
            continue
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module" and pools_2x2(gm.get_submodule(users[0].target))
                and users[0].args == (node,) and not users[0].kwargs and len(node.args) == 1):
            out.append((node, users[0]))
    return out


def _fuse_pool(gm: fx.GraphModule, neuron: fx.Node, pool: fx.Node) -> None:
    """Rewrite ``pool(neuron(x))`` as ``neuron.forward_pooled(x, pool)`` in ``gm.graph``."""
    g = gm.graph
    with g.inserting_before(neuron):
        fused = g.call_method("forward_pooled", (g.get_attr(neuron.target), neuron.args[0], g.get_attr(pool.target)))
    pool.replace_all_uses_with(fused)
    g.erase_node(pool)
    g.erase_node(neuron)


def _feeds_only(gm: fx.GraphModule, node: fx.Node, targets: set[str], shortcuts: bool = False) -> bool:
    """Every path from ``node`` reaches a module in ``targets`` (or, with ``shortcuts``, a fused residual sum as
    its shortcut input) through pass-through ops only."""
    for user in node.users:
        if (user.op == "call_module" and user.target in targets) or (shortcuts and _shortcut_of(node, user)):
            continue
        if not is_pass_through(gm, user, _PASS_THROUGH) or not _feeds_only(gm, user, targets):
            return False
    return bool(node.users)


_ADD = (torch.add, operator.add)


def residual_sum(gm: fx.GraphModule, syn_node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(add, other, neuron)`` when ``syn_node``'s only consumer is ``add(syn, other)`` (or ``add(other, syn)``)
    whose only consumer is a plain :class:`IFNeuron`: a residual block's sum, which the neuron can take apart
    (:meth:`IFNeuron.forward_residual`); else None."""
    users = list(syn_node.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _ADD or users[0].kwargs:
        return None
    add = users[0]
    if len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args) or add.args[0] is add.args[1]:
        return None
    after = list(add.users)
    if len(after) != 1 or after[0].op != "call_module" or type(gm.get_submodule(after[0].target)) is not IFNeuron:
        return None
    other = add.args[1] if add.args[0] is syn_node else add.args[0]
    return add, other, after[0]


def _alignment(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` calls a bias-free :class:`ChannelScale` (a shortcut's alignment) and has no other consumer than
    the one residual add: the neuron can apply the scale inside its kernel."""
    return (node.op == "call_module" and type(gm.get_submodule(node.target)) is ChannelScale
            and gm.get_submodule(node.target).bias is None and len(node.users) == 1 and len(node.args) == 1
            and isinstance(node.args[0], fx.Node) and not node.kwargs)


def _fuse_residual(gm: fx.GraphModule, syn_node: fx.Node, add: fx.Node, other: fx.Node, neuron: fx.Node) -> None:
    """Rewrite ``neuron(add(syn, other))`` as ``neuron.forward_residual(syn, other)`` in ``gm.graph``, and
    ``neuron(add(syn, align(x)))`` (``align`` a bias-free :class:`ChannelScale`) as
    ``neuron.forward_residual(syn, x, align)``."""
    g = gm.graph
    align = other if _alignment(gm, other) else None
    with g.inserting_before(neuron):
        module = g.get_attr(neuron.target)
        args = (module, syn_node, other) if align is None else (module, syn_node, align.args[0],
                                                               g.get_attr(align.target))
        fused = g.call_method("forward_residual", args)
    neuron.replace_all_uses_with(fused)
    g.erase_node(neuron)
    g.erase_node(add)
    if align is not None:
        g.erase_node(align)


@contextmanager
def synapse_mode(snn, mode: str) -> Iterator[dict[str, float]]:
    """Temporarily compute the eligible binary layers of ``snn`` in ``mode``; yields ``{layer: quantum}``.

    In ``bf16`` mode three fusions follow: a layer whose only consumer is an IF neuron hands it the exact bf16 sum
    and its bias (added inside the neuron's kernel, the same float32 operations in the same order); a layer whose
    only consumer is a residual add feeding an IF neuron does the same, the graph calling
    :meth:`IFNeuron.forward_residual` with the sum and the shortcut current instead of adding them first (the
    graph is rewritten for the duration); and IF neurons that feed only such layers emit bf16 spikes (0/1 are
    exact); in ``bitpack`` mode the last one (the packer reads bf16). In both, an IF neuron whose only consumer is
    a 2x2 average pooling pools inside its kernel (:meth:`IFNeuron.forward_pooled`, :func:`pooled_neurons`). Layers already swapped by something else
    (e.g. hardware constraints) are left alone. Everything is restored on exit, also after an exception.
    """
    gm = snn.graph_module
    layers = eligible_layers(snn)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    originals: dict[str, nn.Module] = {}
    touched: list[IFNeuron] = []
    graph = None  # the original graph while a residual sum is fused
    try:
        for name, q in layers.items():
            old = gm.get_submodule(name)
            originals[name] = old
            replace_submodule(gm, name, BinarySynapse(old, q, mode).to(old.weight.device))
        if mode == "bf16":  # the bias of a layer feeding one IF neuron moves into the neuron's kernel
            for name in layers:
                users = list(nodes[name].users)
                m = gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
                residual = None if type(m) is IFNeuron else residual_sum(gm, nodes[name])
                if residual is not None:
                    if graph is None:
                        graph = copy.deepcopy(gm.graph)
                    m = gm.get_submodule(residual[2].target)
                    _fuse_residual(gm, nodes[name], *residual)
                if type(m) is IFNeuron:
                    syn = gm.get_submodule(name)
                    syn.defer_bias, syn.consumer = True, m
                    b = syn.layer.bias
                    m.pre_bias = None if b is None else (b.detach().view(-1, 1, 1) if syn.is_conv else b.detach())
                    touched.append(m)
        if mode in ("bf16", "bitpack"):  # IF + 2x2 average pooling in one kernel pass
            for neuron, pool in pooled_neurons(gm):
                if graph is None:
                    graph = copy.deepcopy(gm.graph)
                _fuse_pool(gm, neuron, pool)
        if mode in ("bf16", "bitpack"):  # neurons feeding only fast binary layers (or fused shortcuts) emit bf16
            nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}  # after the rewrite: a
            nodes.update({n.args[0].target: n for n in gm.graph.nodes if _fused_call(n)})  # fused neuron's call
            for name in snn.neuron_names:
                m, node = gm.get_submodule(name), nodes.get(name)
                if node is None:  # not called from the graph itself
                    continue
                if type(m) is IFNeuron and _feeds_only(gm, node, set(layers), shortcuts=graph is not None):
                    m.spike_dtype = torch.bfloat16
                    touched.append(m)
                    for user in [u for u in node.users if _shortcut_of(node, u)]:
                        user.kwargs = {"spikes": True}  # bf16 spikes in place of float32 ones: scaled in float32
            if graph is not None:  # the fused calls and their spikes flags: one recompile for the whole rewrite
                gm.recompile()
        yield layers
    finally:
        if graph is not None:
            gm.graph = graph  # the setter recompiles
        for m in touched:
            m.pre_bias, m.spike_dtype, m.exactness = None, None, None
        for name, old in originals.items():
            replace_submodule(gm, name, old)


def replace_submodule(gm: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``gm`` to ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
