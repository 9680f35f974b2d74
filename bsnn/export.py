"""Export converted networks to other frameworks.

:func:`to_spikingjelly` builds an equivalent network of spikingjelly 2.0 modules working multi-step on
``[T, B, ...]``: every stateless op is wrapped in ``layer.SeqToANNContainer`` and every bsnn IF layer becomes
a per-channel input gain 1/θ (spikingjelly thresholds are scalars; bsnn's are per channel because the binary
layers' α is folded into them) followed by ``neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode='m')``
(reset by subtraction) — or, where the layer starts from a non-zero membrane (the θ/2 shift, potential
calibration) or carries a bias-calibration current, by :class:`CalibratedIFNode`, an ``IFNode`` subclass that adds
exactly those two things; a two-phase layer (the default's ``convert.late_threshold``) by :class:`PhasedIFNode`.
Every SNN bsnn's default recipe produces exports, spike for spike. The output is the
output layer's current per timestep ``[T, B, K]``; sum it over time for the integrator's membrane.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from spikingjelly.activation_based import layer, neuron

from bsnn.errors import ConversionError
from bsnn.export_nir import check_exportable, from_nir, to_nir  # noqa: F401 (bsnn.export.to_nir / from_nir)
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.neuron import ChannelScale, IFNeuron, Integrator, PhasedIFNeuron
from bsnn.snn.pool import SpikingMaxPool2d


class CalibratedIFNode(neuron.IFNode):
    """spikingjelly's ``IFNode`` (threshold 1, reset by subtraction, multi-step) with bsnn's two calibration terms:

    * an initial membrane ``v_init`` (units of the threshold, per channel ``[C, 1, 1]`` / ``[F]`` or a scalar)
      instead of 0 after every ``reset()``: the θ/2 shift plus potential calibration's correction;
    * a bias current ``i_bias`` (units of the threshold, per channel) added to the input during the first
      ``i_bias_steps`` timesteps after a reset (0 = every timestep): bias calibration's windowed current.

    With both zero it is exactly ``IFNode(v_threshold=1.0, v_reset=None, step_mode='m')``.
    """

    def __init__(self, v_init: torch.Tensor, i_bias: torch.Tensor | None = None, i_bias_steps: int = 0) -> None:
        super().__init__(v_threshold=1.0, v_reset=None, step_mode="m")
        self.register_buffer("v_init", torch.as_tensor(v_init, dtype=torch.float32).clone())
        self.register_buffer("i_bias", None if i_bias is None else torch.as_tensor(i_bias, dtype=torch.float32))
        self.i_bias_steps = int(i_bias_steps)
        self.steps_seen = 0

    def reset(self) -> None:
        super().reset()
        self.steps_seen = 0

    def materialize_states(self, inputs, states, step_mode):
        if isinstance(states[0], float):  # the first step after a reset: start from v_init, not from 0
            x = inputs[0][0] if step_mode == "m" else inputs[0]
            states = (torch.zeros_like(x) + self.v_init.to(x.dtype) + states[0], *states[1:])
        return super().materialize_states(inputs, states, step_mode)

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        if self.i_bias is not None:
            t = x_seq.shape[0]
            n = t if not self.i_bias_steps else min(t, max(0, self.i_bias_steps - self.steps_seen))
            if n:
                x_seq = torch.cat((x_seq[:n] + self.i_bias.to(x_seq.dtype), x_seq[n:]))
        self.steps_seen += x_seq.shape[0]
        return super().multi_step_forward(x_seq, *args, **kwargs)


class PhasedIFNode(CalibratedIFNode):
    """:class:`CalibratedIFNode` with bsnn's two-phase threshold (:class:`bsnn.snn.neuron.PhasedIFNeuron`): threshold
    1 for the first ``switch_steps`` timesteps after a reset, then ``late_gain`` (k), each late spike emitted as k;
    at the first late step the membrane gains ``(k - 1) * switch_shift`` (the late code's θ/2 shift)."""

    def __init__(self, v_init: torch.Tensor, i_bias: torch.Tensor | None, i_bias_steps: int, late_gain: int,
                 switch_steps: int, switch_shift: float) -> None:
        super().__init__(v_init, i_bias, i_bias_steps)
        self.late_gain, self.switch_steps, self.switch_shift = float(late_gain), int(switch_steps), float(switch_shift)

    def reset(self) -> None:
        super().reset()
        self.v_threshold = 1.0

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        start, t = self.steps_seen, x_seq.shape[0]
        head = min(t, max(0, self.switch_steps - start))
        parts = []
        if head:
            self.v_threshold = 1.0
            parts.append(super().multi_step_forward(x_seq[:head], *args, **kwargs))
        if head < t:
            if start + head == self.switch_steps:  # the first late step (the membrane exists: switch_steps >= 1)
                self.v = self.v + (self.late_gain - 1.0) * self.switch_shift
            self.v_threshold = self.late_gain
            parts.append(super().multi_step_forward(x_seq[head:], *args, **kwargs) * self.late_gain)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _TimeFlatten(nn.Module):
    """``flatten(start_dim)`` of a per-timestep tensor applied to ``[T, B, ...]``."""

    def __init__(self, start_dim: int) -> None:
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(self.start_dim + 1)


def to_spikingjelly(snn: SpikingNetwork) -> fx.GraphModule:
    """An equivalent multi-step spikingjelly network: input ``[T, B, C, H, W]`` -> output currents ``[T, B, K]``.

    Raises:
        ConversionError: the network uses a layer with no spikingjelly counterpart (a spiking max-pool of
            running spike counts), naming it; or a firing rule or run-time correction an IF graph cannot carry
            (:func:`bsnn.export_nir.check_exportable`).
    """
    check_exportable(snn, "to_spikingjelly", phased=True)
    gm = copy.deepcopy(snn.graph_module)
    root, graph = nn.Module(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "output":
            graph.output(env[node.args[0]])
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            name = node.target.replace(".", "_")
            x = env[node.args[0]]
            if isinstance(m, IFNeuron):
                v_init = (m.v_init_frac + m.v_init_bias).detach()
                bias = m.i_bias.detach() if bool(m.i_bias.any()) else None
                root.add_module(name + "_gain", ChannelScale(m.gain()))
                plain = not bool(v_init.any()) and bias is None
                if isinstance(m, PhasedIFNeuron):
                    node_module = PhasedIFNode(v_init, bias, int(m.i_bias_steps), int(m.late_gain),
                                               int(m.switch_steps), float(m.v_init_frac))
                elif plain:
                    node_module = neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode="m")
                else:
                    node_module = CalibratedIFNode(v_init, bias, int(m.i_bias_steps))
                root.add_module(name, node_module)
                env[node] = graph.call_module(name, (graph.call_module(name + "_gain", (x,)),))
            elif isinstance(m, SpikingMaxPool2d):
                raise ConversionError(f"to_spikingjelly: '{node.target}' is a spiking max-pool of running spike "
                                      "counts, which spikingjelly has no layer for (its max-pool pools each "
                                      "step's spikes); convert with convert.maxpool=preact or avg to export")
            elif isinstance(m, (ChannelScale, Integrator)):
                root.add_module(name, m)  # broadcast over [T, B, ...] as they are
                env[node] = graph.call_module(name, (x,))
            else:
                root.add_module(name, layer.SeqToANNContainer(m))
                env[node] = graph.call_module(name, (x,))
        elif node.op == "call_method" and node.target == "flatten":
            name = f"flatten_{node.name}"
            root.add_module(name, _TimeFlatten(node.args[1] if len(node.args) > 1 else 0))
            env[node] = graph.call_module(name, (env[node.args[0]],))
        elif node.op == "call_function" and node.target is torch.add:
            env[node] = graph.node_copy(node, lambda n: env[n])
        else:
            raise ConversionError(f"to_spikingjelly: no spikingjelly counterpart for node '{node.name}' "
                                  f"({node.op} {node.target})")
    graph.lint()
    return fx.GraphModule(root, graph)
