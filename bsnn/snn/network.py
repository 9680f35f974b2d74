"""The converted spiking network: a spiking fx graph plus what simulation and costing need to know."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.snn.kernels import get_kernel
from bsnn.snn.neuron import IFNeuron, Integrator
from bsnn.snn.pool import SpikingMaxPool2d

#: modules whose output depends on earlier timesteps (reset per batch, told the time chunk)
STATEFUL = (IFNeuron, SpikingMaxPool2d)


def is_pass_through(gm: fx.GraphModule, node: fx.Node, modules: tuple[type, ...]) -> bool:
    """``node`` only pools or reshapes its input: a call of one of ``modules`` (e.g. ``nn.AvgPool2d``,
    ``nn.Flatten``), ``torch.flatten`` or ``.flatten`` / ``.view`` / ``.reshape``."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    return (node.op == "call_function" and node.target is torch.flatten) or \
        (node.op == "call_method" and node.target in ("flatten", "view", "reshape"))


class _ShapeInterpreter(fx.Interpreter):
    """Runs a spiking graph once with stateful layers (IF neurons, the integrator) as the identity, recording
    every node's output shape in :attr:`shapes`; no membrane or spike record is touched."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out

    def call_method(self, target, args, kwargs):
        if target == "forward_residual":  # a fused residual sum (bsnn.snn.synapse.synapse_mode): the sum's shape
            return args[1]
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, (IFNeuron, Integrator)):
            return args[0]
        if isinstance(m, SpikingMaxPool2d):
            return m.pool_once(args[0])
        return super().call_module(target, args, kwargs)


@torch.no_grad()
def node_shapes(gm: fx.GraphModule, input_shape: list[int] | tuple[int, ...]) -> dict[fx.Node, tuple[int, ...] | None]:
    """Output shape of every node of the spiking graph ``gm`` for one zero sample ``[1, *input_shape]``
    (``None`` for nodes that do not produce a tensor). IF neurons pass their input through (same shape)."""
    ref = next(iter(gm.parameters()), None)
    if ref is None:
        ref = next(iter(gm.buffers()), torch.zeros(()))
    interp = _ShapeInterpreter(gm)
    interp.run(torch.zeros(1, *input_shape, device=ref.device, dtype=torch.float32))
    return interp.shapes


class SpikingNetwork(nn.Module):
    """A binary spiking network produced by :func:`bsnn.convert`.

    ``forward`` takes one chunk of timesteps with time folded into the batch, ``[Tc * B, C, H, W]``, and returns
    the output layer's input current per timestep ``[Tc * B, K]``; the membrane of the non-spiking output
    integrator is the running sum of those currents (see :func:`bsnn.simulate`).

    Attributes:
        graph_module: the spiking fx graph (synaptic layers, :class:`IFNeuron` s, pooling, residual adds).
        layers: synaptic layer table (name, type, binary, in/out shapes, kernel, stride, ...).
        neuron_names: names of the IF layers in graph order.
        input_shape: one sample's shape ``[C, H, W]``.
        meta: conversion record (config, ANN architecture) saved with the network.
    """

    def __init__(self, graph_module: fx.GraphModule, layers: list[dict], neuron_names: list[str],
                 input_shape: list[int], meta: dict | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.layers = layers
        self.neuron_names = list(neuron_names)
        self.input_shape = list(input_shape)
        self.meta = dict(meta or {})

    def neurons(self) -> dict[str, IFNeuron]:
        """IF layers by name, in graph order."""
        return {n: self.graph_module.get_submodule(n) for n in self.neuron_names}

    def stateful(self) -> list[nn.Module]:
        """The modules with state across timesteps: IF neurons and spiking max-pools."""
        return [m for m in self.graph_module.modules() if isinstance(m, STATEFUL)]

    def reset(self) -> None:
        """Reset every neuron's membrane and spike record, and every spiking max-pool's counts (before a new
        batch)."""
        for m in self.stateful():
            m.reset()

    def set_time_chunk(self, timesteps: int) -> None:
        """Tell the neurons and spiking max-pools how many timesteps are folded into the batch of the next calls."""
        for m in self.stateful():
            m.time_chunk = timesteps

    def set_kernel(self, name: str) -> None:
        """Select the IF-scan backend by registered name (see :mod:`bsnn.snn.kernels`)."""
        get_kernel(name)
        for m in self.neurons().values():
            m.kernel = name

    def synaptic_modules(self) -> dict[str, nn.Module]:
        """Conv/linear modules by layer name."""
        return {l["name"]: self.graph_module.get_submodule(l["name"]) for l in self.layers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def node_shapes(self) -> dict[fx.Node, tuple[int, ...] | None]:
        """Output shape of every node of :attr:`graph_module` for one sample (see :func:`node_shapes`)."""
        return node_shapes(self.graph_module, self.input_shape)

    def split_static(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """Split the graph at the first stateful layers: ``(prefix, suffix)``.

        ``prefix(x [B, ...])`` computes everything that depends only on the input (the first synaptic layer and
        whatever stateless ops follow it) and returns a tuple of boundary tensors; ``suffix(*boundary)`` computes
        the rest. With direct encoding the input is the same every timestep, so the simulator runs the prefix
        once per batch instead of once per timestep. Built on each call (cheap), so modules swapped in since
        (e.g. by hardware constraints) are always the ones used.
        """
        return _split_static(self.graph_module)

    def split_static_constant(self) -> tuple[fx.GraphModule, fx.GraphModule, tuple[bool, ...], list[IFNeuron]]:
        """:meth:`split_static`, with the IF neurons that read a boundary tensor directly called through
        :meth:`IFNeuron.forward_constant`: ``(prefix, suffix, once, neurons)``.

        ``once[i]``: boundary tensor ``i`` goes to ``suffix`` as computed (``[B, ...]``, not repeated over the
        chunk) because every consumer of it is such a neuron; ``neurons``: those neurons. Forward hooks do not run
        on ``forward_constant``, so the caller uses this suffix only while none of ``neurons`` has hooks (an SNN
        calibration or offset correction attaching its own falls back to :meth:`split_static`)."""
        return _split_static(self.graph_module, constant=True)


def _is_stateful(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), (*STATEFUL, Integrator))


def _takes_constant(gm: fx.GraphModule, node: fx.Node, boundary: fx.Node) -> bool:
    """``node`` calls an IF neuron whose ``forward`` is :class:`IFNeuron`'s (so ``forward_constant`` is its
    equivalent) with ``boundary`` as its only tensor: ``neuron(boundary)``, or ``neuron.forward_pooled(boundary,
    pool)`` (IF and average pooling fused, :func:`bsnn.snn.synapse.synapse_mode`)."""
    if node.kwargs:
        return False
    if node.op == "call_module" and node.args == (boundary,):
        m = gm.get_submodule(node.target)
    elif (node.op == "call_method" and node.target == "forward_pooled" and len(node.args) == 3
          and node.args[1] is boundary and node.args[0].op == "get_attr"):
        m = gm.get_submodule(node.args[0].target)
    else:
        return False
    return isinstance(m, IFNeuron) and type(m).forward is IFNeuron.forward


def static_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of ``gm`` that depend only on the input (no stateful layer on their way from it): with direct
    encoding, the same at every timestep (:meth:`SpikingNetwork.split_static`)."""
    static: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.op in ("call_module", "call_function", "call_method")
                                        and not _is_stateful(gm, node)
                                        and node.all_input_nodes and all(a in static for a in node.all_input_nodes)):
            static.add(node)
    return static


def _split_static(gm: fx.GraphModule, constant: bool = False):
    static = static_nodes(gm)
    boundary = [n for n in gm.graph.nodes if n in static and any(u not in static for u in n.users)]
    prefix, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node in static:
            env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output(tuple(env[b] for b in boundary))
    once = tuple(constant and all(_takes_constant(gm, u, b) for u in b.users) for b in boundary)
    rewritten = {u for b, o in zip(boundary, once) if o for u in b.users}
    suffix, env2 = fx.Graph(), {}
    for b in boundary:
        env2[b] = suffix.placeholder(f"static_{b.name}")
    for node in gm.graph.nodes:
        if node in rewritten and node.op == "call_module":  # neuron(x) -> neuron.forward_constant(x)
            module = suffix.get_attr(node.target)
            env2[node] = suffix.call_method("forward_constant", (module, env2[node.args[0]]))
        elif node in rewritten:  # neuron.forward_pooled(x, pool) -> the same with x one timestep, constant
            env2[node] = suffix.node_copy(node, lambda n: env2[n])
            env2[node].kwargs = {"constant": True}
        elif node not in static:
            env2[node] = suffix.node_copy(node, lambda n: env2[n])
    pre, post = fx.GraphModule(gm, prefix), fx.GraphModule(gm, suffix)
    if not constant:
        return pre, post
    return pre, post, once, [gm.get_submodule(n.target if n.op == "call_module" else n.args[0].target)
                             for n in rewritten]
