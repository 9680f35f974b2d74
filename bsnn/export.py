"""Export converted networks to other frameworks.

:func:`to_spikingjelly` builds an equivalent network of spikingjelly 2.0 modules working multi-step on
``[T, B, ...]``: every stateless op is wrapped in ``layer.SeqToANNContainer`` and every bsnn IF layer becomes
``neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode='m')`` (reset by subtraction) preceded by a
per-channel input gain 1/θ (spikingjelly thresholds are scalars; bsnn's are per channel because the binary
layers' α is folded into them). The output is the output layer's current per timestep ``[T, B, K]``; sum it
over time for the integrator's membrane.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.errors import ConversionError
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.neuron import ChannelScale, IFNeuron, Integrator
from bsnn.snn.pool import SpikingMaxPool2d


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
        ConversionError: when spikingjelly is not installed, or the network uses a feature with no
            spikingjelly counterpart (a non-zero initial membrane potential).
    """
    try:
        from spikingjelly.activation_based import layer, neuron
    except ImportError as e:  # pragma: no cover - spikingjelly is a core dependency
        raise ConversionError("to_spikingjelly needs spikingjelly>=2.0: pip install spikingjelly") from e
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
                if torch.any(m.v_init_frac + m.v_init_bias != 0):
                    raise ConversionError(f"IF layer '{node.target}' starts from a non-zero membrane potential, which "
                                          "spikingjelly's IFNode cannot express; convert with convert.v_init=0")
                root.add_module(name + "_gain", ChannelScale(m.gain(), m.i_bias if bool(m.i_bias.any()) else None))
                root.add_module(name, neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode="m"))
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
