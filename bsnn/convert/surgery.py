"""Graph surgery: ANN graph -> spiking graph, by propagating each value's *scale* through the network.

Every value in the spiking graph is stored in its own domain: ``real = scale · stored`` with ``scale`` > 0,
a scalar or one factor per channel. The pass walks the captured ANN graph once:

* analog input: scale 1;
* full-precision conv/linear: the input scale is folded into the weights (output scale 1);
* binary conv/linear: the stored weight is **sign(W), exactly ±1**; α (per output channel) and the input
  scale move into the output scale, the bias is divided by it (``real = α·s_in·(sign(W)*x + b/(α·s_in))``);
* BatchNorm: folded into the producing conv/linear (also in residual shortcuts): the BN gain multiplies the
  scale and its shift goes into the bias; a negative gain flips that output channel's weight row (still ±1);
* ReLU / ClipReLU / QCFS -> :class:`IFNeuron`: threshold θ = λ / scale in the stored domain, where λ is the calibrated
  activation statistic (threshold balancing); its spikes stand for λ, the new scale (the ``convert.neuron`` firing
  rule builds the neuron, :data:`~bsnn.snn.neuron.FIRING_RULES`; a rule carrying n spikes per step — burst: Γ —
  gets θ = λ / (n · scale) and its spikes stand for λ / n, so one step still spans ``[0, λ]``);
* avg-pool / flatten / reshape: scale passes through (per-channel scales are expanded by flatten);
* max-pool (scales are positive, so max commutes with them): a plain max-pool of values that depend only on the
  input (the same every timestep), else the ``convert.maxpool`` strategy's module
  (:mod:`bsnn.convert.maxpool`: a spiking max-pool of running spike counts by default);
* add (``a + b``, ``torch.add(a, b, alpha=...)``): the second operand, times alpha, is re-expressed in the first
  operand's scale by a :class:`ChannelScale`; a constant operand (parameter, buffer, number) becomes that
  ChannelScale's bias, in the value's scale;
* cat along the channels: the output scale is the inputs' scales side by side (one factor per channel, a scalar
  where all inputs share it);
* BatchNorm that follows no conv/linear of its own (e.g. after a cat, DenseNet-style): a :class:`ChannelScale`
  with gain BN-gain·scale and bias the BN shift, output scale 1;
* output: a :class:`ChannelScale` back to logits, then the non-spiking :class:`Integrator`.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.binary import is_binary
from bsnn.convert.graph import ACTIVATION_MODULES, ADD_FUNCTIONS, CAT_FUNCTIONS, cat_inputs, where
from bsnn.convert.maxpool import MAXPOOL_MODULES, MAXPOOL_STRATEGIES
from bsnn.errors import ConversionError
from bsnn.snn.neuron import FIRING_RULES, ChannelScale, Integrator


def _finite(t: torch.Tensor | None, what: str) -> None:
    """Refuse a NaN / infinite tensor ``t`` (``what`` names the layer and tensor)."""
    if t is not None and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise ConversionError(f"{what} holds {n} NaN or infinite value(s); the model is broken: retrain it or use "
                              "an earlier checkpoint")


def _bcast(scale: torch.Tensor, shape: tuple | None) -> torch.Tensor:
    """Reshape a 1-D scale ``[1]`` or ``[C]`` to broadcast on one sample ``shape[1:]``."""
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(scale.numel(), *([1] * (len(shape) - 2)))


def _joins(node: fx.Node) -> bool:
    """``node`` is a ``torch.cat`` or only pools / reshapes one."""
    while node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        if not (node.op in ("call_module", "call_method") or node.target is torch.flatten) or not node.all_input_nodes:
            return False
        if node.op == "call_module" and not isinstance(node.graph.owning_module.get_submodule(node.target),
                                                       (nn.AvgPool2d, nn.AdaptiveAvgPool2d, *MAXPOOL_MODULES,
                                                        nn.Flatten, nn.Identity)):
            return False
        node = node.all_input_nodes[0]
    return True


class _Builder:
    def __init__(self, gm: fx.GraphModule, thresholds: dict[str, torch.Tensor], v_init: dict[str, float],
                 maxpool: str = "spiking", neuron: str = "if", max_burst: int = 2) -> None:
        self.gm, self.thresholds, self.v_init = gm, thresholds, v_init
        self.firing, self.max_burst = FIRING_RULES.get(neuron), max_burst
        self.maxpool = MAXPOOL_STRATEGIES.get(maxpool)
        self.static: set[fx.Node] = set()  # values computed from the input alone (the same every timestep)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.scale: dict[fx.Node, torch.Tensor] = {}
        self.synapse: dict[fx.Node, nn.Module] = {}  # ANN node -> new conv/linear producing it (for BN folding)
        self.layers: list[dict] = []
        self.neurons: list[str] = []

    def add_module(self, name: str, module: nn.Module) -> str:
        name = name.replace(".", "_")
        self.root.add_module(name, module)
        return name

    # ------------------------------------------------------------------------------------------ ops
    def synaptic(self, node: fx.Node, m: nn.Module) -> None:
        src = node.args[0]
        s_in, in_shape = self.scale[src], src.meta["shape"]
        w = m.weight.detach().float()
        _finite(w, f"layer '{node.target}': weight")
        _finite(m.bias.detach() if m.bias is not None else None, f"layer '{node.target}': bias")
        if is_binary(m):
            if s_in.numel() != 1 and _joins(src):
                raise ConversionError(
                    f"binary layer '{node.target}' at {where(node)} receives a concatenation of values with different "
                    "scales (branches with their own thresholds); spikes worth different amounts per channel cannot "
                    "meet ±1 weights. Put a BatchNorm + ReLU between the torch.cat and the binary layer (as DenseNet "
                    "does), or keep this layer full precision")
            if s_in.numel() != 1:
                raise ConversionError(
                    f"binary layer '{node.target}' at {where(node)} receives per-channel scaled spikes; its weights "
                    "could not stay ±1. Use layer-wise thresholds (convert.per_channel=false) for layers that "
                    "feed binary layers")
            sign, alpha = m.binary_weight()
            alpha = alpha.float().reshape(-1) * torch.ones(w.shape[0])
            out_scale = alpha * s_in
            new_w = sign.float()
            bias = m.bias.detach().float() / out_scale if m.bias is not None else None
        else:
            if s_in.numel() == 1:
                new_w = w * s_in
            elif isinstance(m, nn.Conv2d):  # output channel o reads the input channels of its group g(o)
                per_group = s_in.view(m.groups, -1)[torch.arange(w.shape[0]) // (w.shape[0] // m.groups)]
                new_w = w * per_group.view(w.shape[0], -1, 1, 1)
            else:
                new_w = w * s_in.view(1, -1)
            out_scale = torch.ones(1)
            bias = m.bias.detach().float() if m.bias is not None else None
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            bias=True, padding_mode=m.padding_mode)
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(new_w)
            new.bias.copy_(bias if bias is not None else torch.zeros(new.bias.shape))
        name = self.add_module(node.target, new)
        self.env[node] = self.graph.call_module(name, (self.env[src],))
        self.scale[node] = out_scale
        self.synapse[node] = new
        self.layers.append({"name": name, "type": type(new).__name__, "binary": is_binary(m),
                            "in_shape": list(in_shape[1:]), "out_shape": list(node.meta["shape"][1:]),
                            "kernel": list(getattr(m, "kernel_size", (1, 1))), "stride": list(getattr(m, "stride", (1, 1))),
                            "padding": list(getattr(m, "padding", (0, 0))), "groups": getattr(m, "groups", 1),
                            "in_features": w[0].numel(), "out_channels": w.shape[0]})

    def batchnorm(self, node: fx.Node, bn: nn.Module) -> None:
        src = node.args[0]
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, key, None)
            _finite(t.detach() if isinstance(t, torch.Tensor) else None, f"BatchNorm '{node.target}': {key}")
        if (bn.running_var < 0).any():
            raise ConversionError(f"BatchNorm '{node.target}': running_var has negative entries; the model is broken: "
                                  "retrain it or use an earlier checkpoint")
        gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones(bn.num_features)  # affine=False
        beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros(bn.num_features)
        k = gamma / torch.sqrt(bn.running_var.float() + bn.eps)
        shift = beta - k * bn.running_mean.float()
        if src not in self.synapse or len(src.users) != 1:  # nothing to fold into: an affine map per channel
            shape = node.meta["shape"]
            gain = k * self.scale[src]  # real out = k·(s·stored) + shift, kept at scale 1
            name = self.add_module(f"bn_{node.target}", ChannelScale(_bcast(gain.reshape(-1), shape),
                                                                     _bcast(shift.reshape(-1), shape)))
            self.env[node] = self.graph.call_module(name, (self.env[src],))
            self.scale[node] = torch.ones(1)
            return
        conv = self.synapse[src]
        c = k * self.scale[src]
        if (c == 0).any():
            raise ConversionError(f"BatchNorm '{node.target}' has channels with zero gain "
                                  f"{torch.nonzero(c == 0).flatten().tolist()}; they cannot carry spikes")
        sign = torch.sign(c)
        with torch.no_grad():  # flip channels with negative gain: weights stay ±1, the scale stays positive
            conv.weight.mul_(sign.view(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias.mul_(sign).add_(shift / c.abs())
        self.env[node] = self.env[src]
        self.scale[node] = c.abs()
        self.synapse[node] = conv

    def relu(self, node: fx.Node) -> None:
        src = node.args[0]
        if node.target not in self.thresholds:
            raise ConversionError(f"no threshold for activation '{node.target}'; thresholds given for "
                                  f"{sorted(self.thresholds)}")
        lam = torch.as_tensor(self.thresholds[node.target]).float().reshape(-1)
        _finite(lam, f"threshold of layer '{node.target}'")
        lam = lam.clamp_min(1e-6) / self.firing.levels(self.max_burst)  # what one spike stands for
        s_in = self.scale[src]
        theta = _bcast(lam / s_in, node.meta["shape"])
        _finite(theta, f"threshold of layer '{node.target}' (in the stored domain: λ / input scale)")
        shape = node.meta["shape"]
        channel_shape = (shape[1], *([1] * (len(shape) - 2)))
        neuron = self.firing.build(theta, self.v_init[node.target], node.target, channel_shape, self.max_burst)
        name = self.add_module("if_" + node.target, neuron)
        self.env[node] = self.graph.call_module(name, (self.env[src],))
        self.scale[node] = lam
        self.neurons.append(name)

    def passthrough(self, node: fx.Node, module: nn.Module | None = None) -> None:
        """Channel-preserving ops (pooling, flatten, reshape): copy (or call ``module`` instead of the ANN's);
        scale follows the layout."""
        if node.op == "call_module":
            name = self.add_module(node.target, module if module is not None else self.gm.get_submodule(node.target))
            new = self.graph.call_module(name, tuple(self.env.get(a, a) for a in node.args))
        else:
            new = self.graph.node_copy(node, lambda n: self.env[n])
        self.env[node] = new
        src = node.all_input_nodes[0]
        s = self.scale.get(src, torch.ones(1))
        in_shape, out_shape = src.meta["shape"], node.meta["shape"]
        if s.numel() > 1 and out_shape is not None and len(out_shape) < len(in_shape):
            s = s.repeat_interleave(int(torch.tensor(in_shape[2:]).prod()))  # [C] -> [C*H*W], C-major flatten
        self.scale[node] = s

    def add(self, node: fx.Node) -> None:
        """``a + alpha·b`` (``operator.add`` / ``iadd``, ``torch.add`` with ``alpha``): two network values, or one
        value and a constant (a parameter, buffer or number), on either side."""
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            raise ConversionError(f"add at {where(node)} has arguments the converter cannot honour "
                                  f"(args {len(node.args)}, keywords {sorted(node.kwargs)}); use a + alpha * b with "
                                  "two operands and at most torch.add's alpha")
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConversionError(f"add at {where(node)}: alpha must be a Python number, got {alpha!r}")
        a, b = node.args
        is_value = [isinstance(v, fx.Node) and v.op != "get_attr" for v in (a, b)]
        shape = node.meta["shape"]
        if all(is_value):  # b re-expressed in a's scale: stored = a + (alpha·s_b/s_a)·b
            ratio = alpha * self.scale[b] / self.scale[a]
            name = self.add_module(f"align_{node.name}", ChannelScale(_bcast(ratio.reshape(-1), shape)))
            b_new = self.graph.call_module(name, (self.env[b],))
            self.env[node] = self.graph.call_function(torch.add, (self.env[a], b_new))
            sa = self.scale[a]
            self.scale[node] = sa if sa.numel() >= self.scale[b].numel() else sa.expand(self.scale[b].numel()).clone()
            return
        if not any(is_value):
            raise ConversionError(f"add at {where(node)} adds two constants; compute the sum once in __init__")
        value, const = (a, b) if is_value[0] else (b, a)
        c = self.constant(const, node)
        s = _bcast(self.scale[value], shape)
        if is_value[0]:  # value + alpha·c: stored = value + alpha·c/s
            gain, bias = torch.ones(()), alpha * c / s
        else:  # c + alpha·value: stored = alpha·value + c/s
            gain, bias = torch.tensor(float(alpha)), c / s
        if bias.dim() > len(shape) or (bias.dim() == len(shape) and bias.shape[0] != 1):
            raise ConversionError(f"add at {where(node)}: the constant of shape {tuple(c.shape)} is not one per-sample "
                                  f"tensor for values of shape {shape}; give it a shape broadcastable to {shape[1:]}")
        name = self.add_module(f"const_{node.name}", ChannelScale(gain, bias))
        self.env[node] = self.graph.call_module(name, (self.env[value],))
        self.scale[node] = self.scale[value]

    def cat(self, node: fx.Node) -> None:
        """``torch.cat(values, dim=1)``: each input keeps its stored values; the output's scale lists each input's
        scale for its channels (a scalar when all inputs share one)."""
        inputs = cat_inputs(node)
        scales = [self.scale[a] for a in inputs]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        self.env[node] = self.graph.call_function(torch.cat, ([self.env[a] for a in inputs], dim))
        if all(t.numel() == 1 for t in scales) and all(bool(t == scales[0]) for t in scales):
            self.scale[node] = scales[0]
        else:
            self.scale[node] = torch.cat([t.reshape(-1).expand(a.meta["shape"][1]) for t, a in zip(scales, inputs)])

    def constant(self, operand, node: fx.Node) -> torch.Tensor:
        """The value of a constant operand of ``node``: a number or a parameter / buffer (``get_attr``)."""
        if isinstance(operand, fx.Node):
            value = self.gm
            for part in operand.target.split("."):
                value = getattr(value, part)
            c = torch.as_tensor(value).detach().float().cpu()
            _finite(c, f"constant '{operand.target}' added at {where(node)}")
            return c
        if isinstance(operand, bool) or not isinstance(operand, (int, float)):
            raise ConversionError(f"add at {where(node)}: unsupported operand {operand!r}")
        return torch.tensor(float(operand))

    def get_attr(self, node: fx.Node) -> None:
        """A parameter or buffer read in forward: only usable as the constant operand of an add."""
        for user in node.users:
            if not (user.op == "call_function" and user.target in ADD_FUNCTIONS):
                raise ConversionError(f"parameter/buffer '{node.target}' is used by {where(user)}; the converter "
                                      "supports model tensors only as weights of conv/linear/BatchNorm modules or as "
                                      "a constant added to a value")

    def output(self, node: fx.Node) -> None:
        src = node.args[0]
        if not isinstance(src, fx.Node):
            raise ConversionError(f"the network must return one tensor of logits, got {where(node)}")
        name = self.add_module("output_scale", ChannelScale(_bcast(self.scale[src], src.meta["shape"])))
        scaled = self.graph.call_module(name, (self.env[src],))
        integ = self.graph.call_module(self.add_module("integrator", Integrator()), (scaled,))
        self.graph.output(integ)

    # --------------------------------------------------------------------------------------- driver
    def build(self) -> tuple[fx.GraphModule, list[dict], list[str]]:
        for node in self.gm.graph.nodes:
            m = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            if node.op in ("placeholder", "get_attr") or (node.all_input_nodes and not isinstance(m, ACTIVATION_MODULES)
                                                         and all(a in self.static for a in node.all_input_nodes)):
                self.static.add(node)
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
                self.scale[node] = torch.ones(1)
            elif node.op == "output":
                self.output(node)
            elif node.op == "call_module":
                m = self.gm.get_submodule(node.target)
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    self.synaptic(node, m)
                elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    self.batchnorm(node, m)
                elif isinstance(m, ACTIVATION_MODULES):
                    self.relu(node)
                elif isinstance(m, MAXPOOL_MODULES) and node not in self.static:
                    self.passthrough(node, self.maxpool.spiking(m))
                else:
                    self.passthrough(node)
            elif node.op == "get_attr":
                self.get_attr(node)
            elif node.op == "call_function" and node.target in ADD_FUNCTIONS:
                self.add(node)
            elif node.op == "call_function" and node.target in CAT_FUNCTIONS:
                self.cat(node)
            else:
                self.passthrough(node)
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph), self.layers, self.neurons


def build_spiking_graph(gm: fx.GraphModule, thresholds: dict[str, torch.Tensor], v_init: dict[str, float],
                        maxpool: str = "spiking", neuron: str = "if", max_burst: int = 2
                        ) -> tuple[fx.GraphModule, list[dict], list[str]]:
    """Turn a captured ANN graph into a spiking graph.

    Args:
        gm: graph from :func:`bsnn.convert.graph.capture` (shapes recorded).
        thresholds: activation module name -> λ, the balanced threshold in the ANN's activation domain
            (scalar or ``[C]``).
        v_init: activation module name -> initial membrane potential as a fraction of θ (0.5 = the θ/2 shift).
        maxpool: the ``convert.maxpool`` strategy (the graph's pools were placed for it by ``capture``).
        neuron: the ``convert.neuron`` firing rule; max_burst: its Γ (``burst``).

    Returns:
        ``(spiking GraphModule, synaptic layer table, IF neuron module names)``.
    """
    return _Builder(gm, thresholds, v_init, maxpool, neuron, max_burst).build()
