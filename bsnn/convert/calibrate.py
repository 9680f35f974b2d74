"""Activation statistics of the ANN's ReLU outputs, gathered by hook observers over a calibration loader.

Percentiles are exact and memory-bounded: the p-th percentile of N values (``torch.quantile`` with
``interpolation='higher'``) is the k-th largest value with ``k = N - ceil(q·(N-1))``, so each observer keeps
only the running top-k values (per channel when requested) and merges every batch into them with
``torch.topk`` — O(k) memory (0.1 % of the activations for p = 99.9), torch ops only, no numpy.

:class:`MSE` is SNN Calibration's threshold search (Li et al., ICML 2021; authors' code read and reimplemented:
``yhhhli/SNN_Calibration``, ``models/spiking_layer.py``: ``find_threshold_mse``, ``DataSaverHook``,
``get_maximum_activation(mse=True, momentum=0.9)``): on each calibration batch, among the 95 candidates
``θ_i = max·(1 − 0.01·i)`` the one minimising the squared error between the activation ``a`` and its T-step
rate code ``q(a) = θ/T·clamp(floor(a·T/θ + v0), 0, T)``; the batches' choices are combined by an exponential
moving average (momentum 0.9, the first batch's choice as the start). :func:`mse_threshold` computes every
candidate's error exactly from the sorted values and their prefix sums (one sort per batch instead of 95 passes).
Differences from the authors' code: ``v0`` (the initial membrane, in units of θ) is bsnn's θ/2 shift by default —
the exact spike count of bsnn's IF neuron with constant input — where their search quantises with ``floor`` alone
(``v0 = 0``, ``MSE(v0=0.0)``) although their neuron adds the same half-threshold shift; every batch of the
calibration loader is used (theirs: 7 batches of 128); per-channel search also applies to linear layers' features
(theirs: conv layers only; their CIFAR scripts search layer-wise).
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

    def spec(self) -> str:
        """The text form :func:`bsnn.convert.config.parse_statistic` reads back."""
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

    def spec(self) -> str:
        """The text form :func:`bsnn.convert.config.parse_statistic` reads back."""
        return f"p{self.p:.12g}"


@dataclass(frozen=True)
class MSE:
    """Threshold statistic of SNN Calibration: per batch, the candidate ``θ = max·(1 − 0.01·i)`` (i = 0..94) with
    the least squared quantisation error at ``timesteps`` steps, EMA over batches (see the module docstring).

    Attributes:
        timesteps: the T whose rate code the threshold is fitted to (the authors: the simulation length).
        v0: initial membrane (fraction of θ) in the quantiser; None: the conversion's ``v_init`` (bsnn's θ/2
            shift by default); ``0.0``: the authors' ``floor`` quantiser.
        momentum: EMA momentum over batches (authors: 0.9).
    """

    timesteps: int = 8
    v0: float | None = None
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 1:
            raise ConfigError(f"MSE(timesteps) needs an integer >= 1, got {self.timesteps!r}")
        if self.v0 is not None and not 0.0 <= self.v0 < 1.0:
            raise ConfigError(f"MSE(v0) must be None or in [0, 1), got {self.v0}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"MSE(momentum) must be in [0, 1), got {self.momentum}")

    def spec(self) -> str:
        """The text form :func:`bsnn.convert.config.parse_statistic` reads back (``mse:T`` or ``mse:T:v0``)."""
        if self.momentum != 0.9:
            raise ConfigError(f"{self} has no text form (only momentum 0.9 has): use it from Python")
        return f"mse:{self.timesteps}" + ("" if self.v0 is None else f":{self.v0:g}")

    def describe(self) -> str:
        return f"mse@T{self.timesteps}" + ("" if self.v0 is None else f",v0={self.v0:g}")


Statistic = Union[Max, Percentile, MSE]


@torch.no_grad()
def mse_threshold(values: torch.Tensor, timesteps: int, v0: float = 0.0, candidates: int = 95,
                  step: float = 0.01) -> torch.Tensor:
    """SNN Calibration's threshold search on one batch, per row.

    Args:
        values: activations ``[C, N]`` (one row per channel, or one row for a layer-wise threshold).
        timesteps: T of the rate code ``q(a) = θ/T·clamp(floor(a·T/θ + v0), 0, T)``.
        v0: initial membrane in units of θ (0: the authors' ``floor``; 0.5: rounding, bsnn's θ/2 shift).
        candidates, step: the grid ``θ_i = max_row·(1 − step·i)``, i < candidates (authors: 95, 0.01).

    Returns:
        ``[C]`` thresholds: per row the candidate of least ``Σ (a − q(a))²`` (the largest θ among equal errors, as
        the authors' strict ``<`` scan from the max down). Computed exactly in float64 from the sorted values:
        level k of the code holds the values in ``[(k − v0)·θ/T, (k + 1 − v0)·θ/T)`` (k = 0 below, T above), so
        each candidate's error is ``Σ_k S2_k − 2·q_k·S1_k + q_k²·n_k`` from prefix sums at ``T`` searchsorted
        boundaries.
    """
    v = values.detach()
    if v.shape[0] == 1:  # values <= 0 code as 0 under every candidate: a constant error, dropped (one row only)
        positive = v[v > 0]
        v = positive.reshape(1, -1) if positive.numel() else v.new_zeros(1, 1)
    v = v.sort(dim=1).values.double().contiguous()  # [C, N] (sorted in the input dtype)
    c, n = v.shape
    zero = v.new_zeros(c, 1)
    s1, s2 = torch.cat([zero, v.cumsum(1)], 1), torch.cat([zero, (v * v).cumsum(1)], 1)  # [C, N + 1]
    theta = v[:, -1:] * (1.0 - step * torch.arange(candidates, dtype=torch.float64))  # [C, K]
    delta = theta / timesteps
    bounds = (torch.arange(1, timesteps + 1, dtype=torch.float64) - v0) * delta[..., None]  # [C, K, T]
    idx = torch.searchsorted(v, bounds.reshape(c, -1), side="left").reshape(c, candidates, timesteps)
    edges = torch.cat([idx.new_zeros(c, candidates, 1), idx, idx.new_full((c, candidates, 1), n)], 2)  # [C, K, T+2]
    flat = edges.reshape(c, -1)

    def span(prefix: torch.Tensor) -> torch.Tensor:  # per level k = 0..T: sum over [edges_k, edges_k+1)
        at = prefix.gather(1, flat).reshape(c, candidates, timesteps + 2)
        return at[..., 1:] - at[..., :-1]

    counts = (edges[..., 1:] - edges[..., :-1]).double()
    q = torch.arange(timesteps + 1, dtype=torch.float64) * delta[..., None]  # [C, K, T + 1] level values
    sse = (span(s2) - 2.0 * q * span(s1) + q * q * counts).sum(-1)  # [C, K]
    best = sse.argmin(dim=1, keepdim=True)  # the first (largest θ) of equal minima
    return theta.gather(1, best)[:, 0].to(values.dtype)


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Activation ``[B, C, ...]`` / ``[B, F]`` as float32 rows: ``[C, B·...]`` per channel, else ``[1, all]``."""
    x = x.detach().float()
    return x.transpose(0, 1).reshape(x.shape[1], -1) if per_channel else x.reshape(1, -1)


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
        flat = _rows(x, self.per_channel)
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


class MSEObserver(nn.Module):
    """Identity module that fits :class:`MSE` thresholds to what flows through it (one search per batch, EMA).

    Args:
        stat: the :class:`MSE` statistic (its ``v0`` must be resolved: not None).
        per_channel: one threshold per channel (dim 1) instead of one for the tensor.
    """

    def __init__(self, stat: MSE, per_channel: bool) -> None:
        super().__init__()
        if stat.v0 is None:
            raise ConfigError("MSEObserver needs MSE(v0=...) resolved to the conversion's v_init")
        self.stat, self.per_channel = stat, per_channel
        self.ema: torch.Tensor | None = None
        self.seen = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: activation ``[B, C, ...]`` or ``[B, F]``; returned unchanged."""
        flat = _rows(x, self.per_channel)
        self.seen += flat.shape[1]
        found = mse_threshold(flat, self.stat.timesteps, self.stat.v0)
        m = self.stat.momentum
        self.ema = found if self.ema is None else m * self.ema + (1.0 - m) * found
        return x

    def value(self, stat: Statistic | None = None) -> torch.Tensor:
        """The EMA of the batches' thresholds: ``[C]`` per channel or a scalar tensor."""
        if stat is not None and stat != self.stat:
            raise ConfigError(f"this observer fitted {self.stat.describe()}, not {stat.describe()}")
        if self.ema is None:
            raise ConfigError("observer saw no data: the calibration loader is empty")
        return self.ema if self.per_channel else self.ema[0]


def make_observer(stat: Statistic, per_channel: bool, expected_count: int | None = None) -> nn.Module:
    """The observer that computes ``stat`` (:class:`MSEObserver` for :class:`MSE`, else
    :class:`ActivationObserver`)."""
    if isinstance(stat, MSE):
        return MSEObserver(stat, per_channel)
    return ActivationObserver(stat, per_channel, expected_count)


@contextmanager
def observe(modules: dict[str, nn.Module], stat: Statistic, per_channel: bool,
            values_per_channel: dict[str, int] | None = None) -> Iterator[dict[str, ActivationObserver]]:
    """Attach an :class:`ActivationObserver` as a forward hook on each named module's *output*.

    Hooks are removed on exit, whatever happens. Yields the observers by name.
    """
    observers = {n: make_observer(stat, per_channel, (values_per_channel or {}).get(n)) for n in modules}
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
    """Several statistics from one pass over the data for the max / percentiles (one top-k buffer sized for the
    lowest percentile) and one more pass per :class:`MSE` statistic.

    Returns:
        statistic -> (module name -> value).
    """
    check_finite_weights(model, "calibration")
    ranked = [s for s in stats if not isinstance(s, MSE)]
    passes = ([(_widest(ranked), ranked)] if ranked else []) + [(s, [s]) for s in stats if isinstance(s, MSE)]
    out: dict = {}
    for stat, read in passes:
        observers = _observe_pass(model, modules, loader, stat, per_channel, max_samples, device)
        out.update({s: {n: o.value(s) for n, o in observers.items()} for s in read})
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
