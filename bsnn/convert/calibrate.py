"""Activation statistics of the ANN's ReLU outputs, gathered by hook observers over a calibration loader.

Percentiles are exact and memory-bounded: the p-th percentile of N values (``torch.quantile`` with
``interpolation='higher'``) is the k-th largest value with ``k = N - ceil(q·(N-1))``, so each observer keeps
only the running top-k values (per channel when requested) and merges every batch into them with
``torch.topk`` — O(k) memory (0.1 % of the activations for p = 99.9), torch ops only, no numpy.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Union

import torch
import torch.nn as nn

from bsnn.data import unpack_batch
from bsnn.errors import ConfigError, ConversionError


@dataclass(frozen=True)
class Max:
    """Threshold statistic: the maximum activation."""

    def describe(self) -> str:
        return "max"


@dataclass(frozen=True)
class Percentile:
    """Threshold statistic: the p-th percentile of the activations (Rueckauer 2017: 99.9)."""

    p: float = 99.9

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 100.0:
            raise ConfigError(f"Percentile(p) needs 0 < p <= 100, got {self.p}")

    def describe(self) -> str:
        return f"p{self.p:g}"


Statistic = Union[Max, Percentile]


def topk_size(n: int, p: float) -> int:
    """Number of largest values to keep so that the k-th largest of ``n`` is the ``p``-th percentile."""
    q = p / 100.0
    return max(1, n - math.ceil(q * (n - 1)))


class ActivationObserver(nn.Module):
    """Identity module that records statistics of what flows through it.

    Args:
        stat: :class:`Max` or :class:`Percentile`.
        per_channel: statistics per channel (dim 1) instead of over the whole tensor.
        expected_count: total number of values (per channel when ``per_channel``) the observer will see;
            needed by percentiles to size the top-k buffer exactly.
    """

    def __init__(self, stat: Statistic, per_channel: bool, expected_count: int | None = None) -> None:
        super().__init__()
        self.stat, self.per_channel, self.expected_count = stat, per_channel, expected_count
        self.top: torch.Tensor | None = None  # [C, k] or [1, k]
        self.seen = 0
        self.channels = 0

    def _k(self) -> int:
        if isinstance(self.stat, Max):
            return 1
        if self.expected_count is None:
            raise ConfigError("percentile calibration needs the number of calibration values")
        return topk_size(self.expected_count, self.stat.p)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: activation ``[B, C, ...]`` or ``[B, F]``; returned unchanged."""
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1) if self.per_channel \
            else x.detach().float().reshape(1, -1)
        self.channels = flat.shape[0]
        self.seen += flat.shape[1]
        k = self._k()
        if k == 1:  # Max: a running amax (one pass, no top-k selection)
            m = flat.amax(dim=1, keepdim=True)
            self.top = m if self.top is None else torch.maximum(self.top, m)
            return x
        merged = flat if self.top is None else torch.cat([self.top, flat], dim=1)
        self.top = merged.topk(min(k, merged.shape[1]), dim=1, sorted=False).values
        return x

    def value(self, stat: Statistic | None = None) -> torch.Tensor:
        """The statistic (default: the observer's own; any percentile >= it can be read from the same buffer),
        ``[C]`` per channel or a scalar tensor."""
        stat = stat or self.stat
        if self.top is None:
            raise ConfigError("observer saw no data: the calibration loader is empty")
        k = topk_size(self.seen, stat.p) if isinstance(stat, Percentile) else 1
        if k > self.top.shape[1]:
            raise ConfigError(f"observer kept the top {self.top.shape[1]} values; {stat} needs {k}")
        v = self.top.topk(k, dim=1).values[:, -1]
        return v if self.per_channel else v[0]


@contextmanager
def observe(modules: dict[str, nn.Module], stat: Statistic, per_channel: bool,
            values_per_channel: dict[str, int] | None = None) -> Iterator[dict[str, ActivationObserver]]:
    """Attach an :class:`ActivationObserver` as a forward hook on each named module's *output*.

    Hooks are removed on exit, whatever happens. Yields the observers by name.
    """
    observers = {n: ActivationObserver(stat, per_channel, (values_per_channel or {}).get(n)) for n in modules}
    handles = [m.register_forward_hook(lambda _m, _i, out, o=observers[n]: o(out)) for n, m in modules.items()]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


def _widest(stats: list[Statistic]) -> Statistic:
    """The statistic needing the largest top-k buffer (lowest percentile; Max needs 1)."""
    ps = [s for s in stats if isinstance(s, Percentile)]
    return min(ps, key=lambda s: s.p) if ps else Max()


@torch.no_grad()
def calibrate_many(model: nn.Module, modules: dict[str, nn.Module], loader, stats: list[Statistic],
                   per_channel: bool = False, max_samples: int | None = None, device: torch.device | str = "cpu"
                   ) -> dict[Statistic, dict[str, torch.Tensor]]:
    """Several statistics from one pass over the data (one top-k buffer sized for the lowest percentile).

    Returns:
        statistic -> (module name -> value).
    """
    check_finite_weights(model, "calibration")
    widest = _widest(stats)
    observers = _observe_pass(model, modules, loader, widest, per_channel, max_samples, device)
    out = {s: {n: o.value(s) for n, o in observers.items()} for s in stats}
    for s, values in out.items():
        for n, v in values.items():
            if not bool(torch.isfinite(v).all()):
                raise ConversionError(f"calibration: the {s.describe()} of layer '{n}' is {v.flatten()[:4].tolist()} "
                                      "(non-finite activations); the inputs or the weights before it overflow: "
                                      "check the model and rescale the inputs")
    return out


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse NaN / infinite parameters or buffers, naming the layers that hold them.

    Raises:
        ConversionError: the first few offending tensors (``layer.weight``, ``bn.running_var``, ...).
    """
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        named = [f"layer '{n.rpartition('.')[0] or n}' ({n.rpartition('.')[2]})" for n in bad[:5]]
        raise ConversionError(f"{where}: {', '.join(named)}{' and more' if len(bad) > 5 else ''} "
                              f"hold{'s' if len(bad) == 1 else ''} NaN or infinite values; the model is broken: "
                              "retrain it or use an earlier checkpoint")


@torch.no_grad()
def calibrate(model: nn.Module, modules: dict[str, nn.Module], loader, stat: Statistic, per_channel: bool = False,
              max_samples: int | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Statistics of each module's output over (the first ``max_samples`` of) ``loader``.

    Args:
        model: the ANN, run in eval mode.
        modules: name -> module whose output is observed (the ReLUs).
        loader: yields ``(x [B, ...], y)``; only ``x`` is used.
        stat: :class:`Max` or :class:`Percentile`.
        per_channel: per-channel statistics (dim 1).
        max_samples: stop after this many samples (None: the whole loader).
        device: where the model runs.

    Returns:
        name -> statistic (``[C]`` per channel, scalar otherwise).
    """
    return calibrate_many(model, modules, loader, [stat], per_channel, max_samples, device)[stat]


def _observe_pass(model: nn.Module, modules: dict[str, nn.Module], loader, stat: Statistic, per_channel: bool,
                  max_samples: int | None, device: torch.device | str) -> dict[str, ActivationObserver]:
    device = torch.device(device)
    model.eval().to(device)
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None
    if max_samples is not None:
        n_total = max_samples if n_total is None else min(n_total, max_samples)
    if n_total is None or n_total == 0:
        raise ConfigError("calibration loader is empty or has no dataset length")
    first = None
    for batch in loader:
        first = unpack_batch(batch, "calibration", 0, labels=False)[0]
        break
    if first is None or first.shape[0] == 0:
        raise ConversionError("calibration: the loader yielded no samples; pass a DataLoader over (a part of) the "
                              "training set")
    # one sample's activation sizes -> exact value counts for the percentile buffers
    sizes: dict[str, int] = {}
    with observe(modules, Max(), per_channel) as probe:
        _run(model, first[:1].to(device), 0, first.shape)
        for n, o in probe.items():
            sizes[n] = o.seen * n_total
    seen = 0
    with observe(modules, stat, per_channel, sizes) as observers:
        for step, batch in enumerate(loader):
            x = unpack_batch(batch, "calibration", step, labels=False)[0]
            if max_samples is not None:
                x = x[: max_samples - seen]
            if x.shape[0] == 0:
                break
            _run(model, x.to(device), step, first.shape)
            seen += x.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    return observers


def _run(model: nn.Module, x: torch.Tensor, step: int, first_shape: tuple) -> None:
    """``model(x)`` with a failure on this batch's data (wrong shape, channels, ...) named as such."""
    if x.shape[1:] != first_shape[1:]:
        raise ConversionError(f"calibration: batch {step + 1} has inputs of shape {tuple(x.shape[1:])}, the first "
                              f"batch {tuple(first_shape[1:])}; every calibration sample must have the model's input "
                              "shape")
    try:
        model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        raise ConversionError(f"calibration: the model fails on batch {step + 1} (inputs {tuple(x.shape)}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; give calibration inputs "
                              "of the shape the model was trained on") from None
