"""How max-pooling is converted: the registry of strategies (``convert.maxpool``).

Max commutes with every monotone non-decreasing activation (ReLU, clipped ReLUs, bsnn's ClipReLU and QCFS), so
``pool(act(x)) == act(pool(x))`` in the ANN and capture (:func:`bsnn.convert.graph.capture`) may put a max-pool
on either side of the activation next to it without changing the ANN. Each strategy picks a side and says what
the pool becomes in the spiking graph when its input varies over time (a pool of the analog input stays a plain
max-pool: that input is the same every timestep):

* ``spiking`` (default): pool after the IF neuron, realised by :class:`~bsnn.snn.pool.SpikingMaxPool2d` in
  ``count`` mode — the pooled spike count is the max of the window's spike counts at every T, and its output is
  again {0, 1} spikes;
* ``gate``: pool after the IF neuron, gated by running spike counts (Rueckauer et al. 2017): right in the rate
  limit only;
* ``preact``: pool *before* the IF neuron, a plain max-pool of each timestep's input currents (the placement
  LTB uses): exact where the currents are constant over time (the first layer), biased upward elsewhere (the
  mean of a max exceeds the max of the means) — 4x fewer IF neurons for 2x2 pools;
* ``avg``: the max-pool replaced by an average pool of the same window (``count_include_pad=False``) *in the
  ANN* before calibration: the SNN converges to that changed network, so use it for networks that will be
  fine-tuned (or were trained) with average pooling.

Measured in ``benchmarks/maxpool.py`` (results ``benchmarks/results/maxpool.md``); the default is the best there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from bsnn._registry import Registry
from bsnn.errors import ConversionError
from bsnn.snn.pool import SpikingMaxPool2d

MAXPOOL_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class MaxPoolStrategy:
    """One way to convert max-pooling.

    Attributes:
        activation_first: ``True``: capture puts the pool after its neighbouring activation (the SNN pools spikes);
            ``False``: before it (the SNN pools input currents); ``None``: the pool is replaced in the ANN.
        spiking: the module of the spiking graph for a max-pool of a time-varying value (``None`` for ``avg``).
        summary: one line for docs and error messages.
    """

    activation_first: bool | None
    spiking: Callable[[nn.Module], nn.Module] | None
    summary: str


MAXPOOL_STRATEGIES: Registry[MaxPoolStrategy] = Registry("max-pool strategy (convert.maxpool)")
MAXPOOL_STRATEGIES.register("spiking")(MaxPoolStrategy(
    True, lambda pool: SpikingMaxPool2d(pool, "count"),
    "max of running spike counts after the IF neuron (exact pooled counts at every T)"))
MAXPOOL_STRATEGIES.register("gate")(MaxPoolStrategy(
    True, lambda pool: SpikingMaxPool2d(pool, "gate"),
    "each window passes the spikes of its neuron with the highest running count (Rueckauer et al. 2017)"))
MAXPOOL_STRATEGIES.register("preact")(MaxPoolStrategy(
    False, lambda pool: copy.deepcopy(pool),
    "max-pool of each timestep's input current before the IF neuron (LTB's placement)"))
MAXPOOL_STRATEGIES.register("avg")(MaxPoolStrategy(
    None, None, "replaced by average pooling of the same window in the ANN (for fine-tuned networks)"))


def average_pool_like(pool: nn.Module, where: str) -> nn.Module:
    """The average pool with ``pool``'s window (``count_include_pad=False``: the max-pool's padding is ignored).

    Raises:
        ConversionError: a dilated max-pool (average pooling has no dilation).
    """
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveAvgPool2d(pool.output_size)
    if pool.dilation not in (1, (1, 1)):
        raise ConversionError(f"max-pool at {where} is dilated ({pool.dilation}); average pooling has no dilation: "
                              "use convert.maxpool=spiking")
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, count_include_pad=False)
