"""NIR (Neuromorphic Intermediate Representation) export and import of converted networks.

:func:`to_nir` writes a :class:`~bsnn.snn.network.SpikingNetwork` as a ``nir.NIRGraph``: ``Conv2d`` / ``Affine``
for the synaptic layers, ``Scale`` for per-channel gains (each IF layer's input gain 1/θ, residual alignments,
the output scale), ``IF`` (``r = 1``, ``v_threshold = 1`` after its gain), ``AvgPool2d`` / ``SumPool2d``,
``Flatten``, ``Input`` / ``Output``, and the edges; a residual add is two edges into one node (NIR sums a node's
inputs). What NIR's ``IF`` does not say is kept in the graph's ``metadata["bsnn"]`` (a JSON string): reset by **subtraction**
(NIR's IF resets to a value), firing at ``v ≥ θ``, the initial membrane (θ/2 shift, potential calibration) and the
windowed bias current. :func:`from_nir` reads such graphs back into a SpikingNetwork — spike for spike with the
metadata; without it an ``IF`` is read as bsnn's subtractive-reset neuron starting from 0.

``fold_scales=True`` writes a graph without ``Scale`` / ``AvgPool2d`` nodes for simulators that lack them (sinabs'
``from_nir``): each IF gain is folded into the conv/affine layer feeding it (weights and bias times the gain of
their output channel) and each average pool becomes a ``SumPool2d`` with ``1/k²`` folded into the next synaptic
layer's weights. Not exportable (a clear error names the node): spiking max-pools, concatenations, per-channel
affine maps with a bias.
"""

from __future__ import annotations

import json

import nir
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.errors import ConversionError
from bsnn.snn.network import SpikingNetwork, node_shapes
from bsnn.snn.neuron import ChannelScale, IFNeuron, Integrator
from bsnn.snn.offset import network_correction

SEMANTICS = "bsnn IF: v += gain·x (+ i_bias while t <= i_bias_steps); spike when v >= 1; v -= 1 (reset by subtraction)"


def _np(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().double().numpy(), dtype=np.float32)


def _per_channel(v: torch.Tensor, shape: tuple) -> np.ndarray:
    """A scalar / ``[C]`` / ``[C, 1, 1]`` tensor as a NIR parameter broadcastable to a per-sample ``shape``."""
    v = torch.as_tensor(v).float()
    if v.numel() == 1:
        return _np(v.reshape(()))
    return _np(v.reshape(v.numel(), *([1] * (len(shape) - 1))))


class _Exporter:
    def __init__(self, snn: SpikingNetwork, fold_scales: bool) -> None:
        self.snn, self.fold = snn, fold_scales
        self.gm = snn.graph_module
        self.shapes = node_shapes(self.gm, snn.input_shape)
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []
        self.src: dict[fx.Node, list[str]] = {}  # fx value -> NIR nodes whose sum it is
        self.pending: dict[fx.Node, float] = {}  # value -> factor still to fold into its synaptic consumer
        self.neurons: dict[str, dict] = {}
        self.folded_gain: str | None = None  # the IF module whose input gain the last synaptic layer absorbed

    def shape(self, node: fx.Node) -> tuple:
        return tuple(self.shapes[node][1:])

    def add(self, name: str, nir_node: nir.NIRNode, inputs: list[str]) -> None:
        self.nodes[name] = nir_node
        self.edges += [(i, name) for i in inputs]

    def refuse(self, node: fx.Node, what: str) -> None:
        raise ConversionError(f"to_nir: node '{node.name}' ({what}) has no NIR counterpart; NIR exports convolutions, "
                              "linear layers, scales, IF neurons, average pooling, flatten and residual adds")

    def synaptic(self, node: fx.Node, m: nn.Module) -> None:
        src = node.args[0]
        w = m.weight.detach().clone()
        b = m.bias.detach().clone() if m.bias is not None else torch.zeros(w.shape[0])
        w = w * self.pending.get(src, 1.0)
        users = list(node.users)
        if self.fold and len(users) == 1 and users[0].op == "call_module" and \
                isinstance(self.gm.get_submodule(users[0].target), IFNeuron):
            gain = self.gm.get_submodule(users[0].target).gain().detach().reshape(-1)
            g = gain.expand(w.shape[0]) if gain.numel() == 1 else gain
            w = w * g.view(-1, *([1] * (w.dim() - 1)))
            b = b * g
            self.folded_gain = users[0].target
        if isinstance(m, nn.Conv2d):
            nir_node = nir.Conv2d(input_shape=tuple(self.shape(src)[1:]), weight=_np(w), stride=m.stride,
                                  padding=m.padding, dilation=m.dilation, groups=m.groups, bias=_np(b))
        else:
            nir_node = nir.Affine(weight=_np(w), bias=_np(b))
        self.add(node.name, nir_node, self.src[src])
        self.src[node] = [node.name]

    def neuron(self, node: fx.Node, m: IFNeuron) -> None:
        shape = self.shape(node)
        inputs = self.src[node.args[0]]
        if self.folded_gain != node.target:
            if self.fold:
                raise ConversionError(f"to_nir(fold_scales=True): IF layer '{node.target}' is not fed by one "
                                      "conv/linear layer alone, so its input gain cannot be folded; export with "
                                      "fold_scales=False (a Scale node)")
            self.add(f"{node.name}_gain", nir.Scale(scale=_per_channel(m.gain(), shape)), inputs)
            inputs = [f"{node.name}_gain"]
        self.folded_gain = None
        ones = np.ones(shape, dtype=np.float32)
        self.add(node.name, nir.IF(r=ones, v_threshold=ones), inputs)
        self.neurons[node.name] = {
            "module": node.target, "reset": "subtract", "fire": "v >= v_threshold",
            "v_init": _np((m.v_init_frac + m.v_init_bias).float()).tolist(),
            "i_bias": _np(m.i_bias).tolist() if bool(m.i_bias.any()) else None,
            "i_bias_steps": int(m.i_bias_steps), "channel_shape": list(m.v_init_bias.shape)}
        self.src[node] = [node.name]

    def module(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(node.target)
        src = node.args[0]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return self.synaptic(node, m)
        if isinstance(m, IFNeuron):
            return self.neuron(node, m)
        if isinstance(m, Integrator):
            self.src[node] = self.src[src]
            return None
        if isinstance(m, ChannelScale):
            if m.bias is not None:
                self.refuse(node, "a per-channel scale with a bias")
            if self.fold and bool((m.scale == 1).all()):
                self.src[node] = self.src[src]
                return None
            if self.fold:
                raise ConversionError(f"to_nir(fold_scales=True): scale node '{node.name}' cannot be folded; export "
                                      "with fold_scales=False (a Scale node)")
            self.add(node.name, nir.Scale(scale=_per_channel(m.scale, self.shape(node))), self.src[src])
            self.src[node] = [node.name]
            return None
        pool = self.as_avg_pool(node, m)
        if pool is not None:
            k, s, p = pool
            if self.fold:
                self.add(node.name, nir.SumPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p)),
                         self.src[src])
                self.pending[node] = self.pending.get(src, 1.0) / (k[0] * k[1])
            else:
                self.add(node.name, nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p)),
                         self.src[src])
            self.src[node] = [node.name]
            return None
        if isinstance(m, nn.Flatten):
            return self.flatten(node)
        self.refuse(node, type(m).__name__)
        return None

    def as_avg_pool(self, node: fx.Node, m: nn.Module) -> tuple | None:
        """``(kernel, stride, padding)`` of an average pool NIR can express (an adaptive pool whose output divides
        its input is a plain one), else None."""
        pair = nn.modules.utils._pair
        if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.divisor_override is None and \
                (m.count_include_pad or pair(m.padding) == (0, 0)):
            return pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            (h, w), (ho, wo) = self.shape(node.args[0])[1:], self.shape(node)[1:]
            if h % ho == 0 and w % wo == 0:
                return (h // ho, w // wo), (h // ho, w // wo), (0, 0)
        return None

    def flatten(self, node: fx.Node) -> None:
        src = node.all_input_nodes[0]
        in_shape = self.shape(src)
        if len(in_shape) == 1:
            self.src[node] = self.src[src]
        else:
            self.add(node.name, nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=0, end_dim=-1),
                     self.src[src])
            self.src[node] = [node.name]
        if src in self.pending:
            self.pending[node] = self.pending[src]

    def run(self) -> nir.NIRGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.add("input", nir.Input(input_type={"input": np.array(self.snn.input_shape)}), [])
                self.src[node] = ["input"]
            elif node.op == "call_module":
                self.module(node)
            elif node.op == "call_function" and node.target is torch.add:
                a, b = node.args
                self.src[node] = self.src[a] + self.src[b]
            elif (node.op == "call_method" and node.target in ("flatten", "reshape", "view")) or \
                    (node.op == "call_function" and node.target is torch.flatten):
                self.flatten(node)
            elif node.op == "output":
                src = node.args[0]
                self.add("output", nir.Output(output_type={"output": np.array(self.shape(src))}), self.src[src])
            else:
                self.refuse(node, f"{node.op} {getattr(node.target, '__name__', node.target)}")
        meta = {"semantics": SEMANTICS, "neurons": self.neurons, "input_shape": list(self.snn.input_shape),
                "folded_scales": self.fold}
        # one JSON string: NIR's HDF5 files (nir.write / nir.read) keep strings, not nested dicts or None
        return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata={"bsnn": json.dumps(meta)})


def check_exportable(snn: SpikingNetwork, target: str, phased: bool = False) -> None:
    """Refuse what an exported IF network cannot carry: burst / signed firing rules (``convert.neuron``), two-phase
    thresholds (``convert.late_threshold``; accepted with ``phased``, for a target with a two-phase node) and
    run-time offset corrections with pre-steps (COS, SRP: ``convert.offset_correction``), whose per-sample
    pre-steps are bsnn's simulator's, not the exported graph's.

    Raises:
        ConversionError: naming the setting and how to export.
    """
    allowed = {"if", "phased"} if phased else {"if"}  # phased: the target has a two-phase IF node
    other = sorted({f"{n} ({m.firing})" for n, m in snn.neurons().items() if m.firing not in allowed})
    if other:
        raise ConversionError(f"{target}: layers {', '.join(other[:3])} are not plain integrate-and-fire neurons "
                              f"(convert.neuron, convert.late_threshold); {target} carries IF neurons with one "
                              "threshold only: convert with convert.neuron=if and convert.late_threshold=none to "
                              "export")
    method, _ = network_correction(snn)
    if method != "none":
        raise ConversionError(f"{target}: the network corrects its membranes at run time with {method!r} "
                              "pre-steps (convert.offset_correction), which the exported graph cannot carry; "
                              "convert with convert.offset_correction=none to export")


def to_nir(snn: SpikingNetwork, fold_scales: bool = False) -> nir.NIRGraph:
    """The NIR graph of ``snn`` (see the module docstring; ``fold_scales`` for simulators without ``Scale``).

    Raises:
        ConversionError: a node with no NIR counterpart (spiking max-pool, concatenation, ...), naming it; a
            firing rule or run-time correction NIR's IF graph cannot carry (:func:`check_exportable`).
    """
    check_exportable(snn, "to_nir")
    return _Exporter(snn, fold_scales).run()


def _order(graph: nir.NIRGraph) -> list[str]:
    preds = {n: [a for a, b in graph.edges if b == n] for n in graph.nodes}
    done, order = set(), []
    while len(order) < len(graph.nodes):
        ready = [n for n in graph.nodes if n not in done and all(p in done for p in preds[n])]
        if not ready:
            raise ConversionError("from_nir: the graph has a cycle (recurrent NIR graphs are not supported)")
        for n in ready:
            done.add(n)
            order.append(n)
    return order


def from_nir(graph: nir.NIRGraph) -> SpikingNetwork:
    """A SpikingNetwork simulating ``graph`` (written by :func:`to_nir`, or by another tool with the node types
    listed in the module docstring; ``SumPool2d`` becomes an average pool with divisor 1).

    Raises:
        ConversionError: an unsupported node type, naming it; a graph without ``Input`` / ``Output``.
    """
    meta = (graph.metadata or {}).get("bsnn", {})
    if isinstance(meta, (bytes, np.bytes_)):
        meta = meta.decode()
    if isinstance(meta, str):
        meta = json.loads(meta)
    neurons_meta = meta.get("neurons", {})
    preds = {n: [a for a, b in graph.edges if b == n] for n in graph.nodes}
    inputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Input)]
    if len(inputs) != 1 or not any(isinstance(v, nir.Output) for v in graph.nodes.values()):
        raise ConversionError("from_nir: the graph needs exactly one Input and an Output node")
    input_shape = [int(v) for v in np.asarray(graph.nodes[inputs[0]].input_type["input"]).reshape(-1)]
    root, fxg = nn.Module(), fx.Graph()
    env: dict[str, fx.Node] = {}
    neuron_names = []
    for name in _order(graph):
        node = graph.nodes[name]
        args = [env[p] for p in preds[name]]
        x = args[0] if args else None
        for other in args[1:]:
            x = fxg.call_function(torch.add, (x, other))
        key = name.replace(".", "_")
        module = None
        if isinstance(node, nir.Input):
            env[name] = fxg.placeholder("x")
            continue
        if isinstance(node, nir.Output):
            root.add_module("integrator", Integrator())
            fxg.output(fxg.call_module("integrator", (x,)))
            continue
        if isinstance(node, nir.Conv2d):
            w = torch.as_tensor(np.asarray(node.weight), dtype=torch.float32)
            module = nn.Conv2d(w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]), node.stride, node.padding,
                               node.dilation, int(node.groups), bias=True)
            module.weight.data.copy_(w)
            module.bias.data.copy_(torch.as_tensor(np.asarray(node.bias), dtype=torch.float32).reshape(-1))
        elif isinstance(node, nir.Affine):
            w = torch.as_tensor(np.asarray(node.weight), dtype=torch.float32)
            module = nn.Linear(w.shape[1], w.shape[0], bias=True)
            module.weight.data.copy_(w)
            module.bias.data.copy_(torch.as_tensor(np.asarray(node.bias), dtype=torch.float32))
        elif isinstance(node, nir.Scale):
            module = ChannelScale(torch.as_tensor(np.asarray(node.scale), dtype=torch.float32))
        elif isinstance(node, nir.IF):
            r = torch.as_tensor(np.asarray(node.r), dtype=torch.float32)
            v_th = torch.as_tensor(np.asarray(node.v_threshold), dtype=torch.float32)
            info = neurons_meta.get(name, {})
            theta = v_th / r  # v += r·x, spike at v >= v_th  <=>  v/v_th += x / (v_th/r)
            channel = tuple(info.get("channel_shape") or ((theta.shape[0], 1, 1) if theta.dim() == 3 else
                                                          tuple(theta.shape)))
            th = theta.reshape(theta.shape[0], -1)[:, 0].reshape(channel) if theta.dim() == 3 else theta
            module = IFNeuron(th, 0.0, name=name, channel_shape=channel)
            with torch.no_grad():
                for buf, value in ((module.v_init_bias, info.get("v_init", 0.0)), (module.i_bias, info.get("i_bias"))):
                    if value is not None:
                        v = torch.as_tensor(value, dtype=torch.float32)
                        buf.copy_(v.reshape(()).expand(buf.shape) if v.numel() == 1 else v.reshape(buf.shape))
                module.i_bias_steps.fill_(int(info.get("i_bias_steps", 0)))
            neuron_names.append(key)
        elif isinstance(node, nir.AvgPool2d):
            module = nn.AvgPool2d(tuple(np.asarray(node.kernel_size).tolist()), tuple(np.asarray(node.stride).tolist()),
                                  tuple(np.asarray(node.padding).tolist()))
        elif isinstance(node, nir.SumPool2d):
            module = nn.AvgPool2d(tuple(np.asarray(node.kernel_size).tolist()), tuple(np.asarray(node.stride).tolist()),
                                  tuple(np.asarray(node.padding).tolist()), divisor_override=1)
        elif isinstance(node, nir.Flatten):
            module = nn.Flatten(1)
        else:
            raise ConversionError(f"from_nir: node '{name}' is a {type(node).__name__}, which bsnn cannot simulate; "
                                  "supported: Input, Output, Conv2d, Affine, Scale, IF, AvgPool2d, SumPool2d, Flatten")
        root.add_module(key, module)
        env[name] = fxg.call_module(key, (x,))
    gm = fx.GraphModule(root, fxg)
    shapes = node_shapes(gm, input_shape)
    layers = []
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            layers.append({"name": n.target, "type": type(m).__name__, "binary": bool(((w == 1) | (w == -1)).all()),
                           "in_shape": list(shapes[n.args[0]][1:]), "out_shape": list(shapes[n][1:]),
                           "kernel": list(getattr(m, "kernel_size", (1, 1))), "stride": list(getattr(m, "stride", (1, 1))),
                           "padding": list(getattr(m, "padding", (0, 0))), "groups": getattr(m, "groups", 1),
                           "in_features": w[0].numel(), "out_channels": w.shape[0]})
    return SpikingNetwork(gm, layers, neuron_names, input_shape, {"imported_from": "nir", "nir_metadata": meta}).eval()
