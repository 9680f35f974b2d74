"""ANN -> binary spiking network conversion: capture, calibrate, balance, surgery."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from bsnn.convert.balance import balanced_thresholds, clipped_thresholds
from bsnn.convert.calibrate import MSE, Max, Percentile, calibrate, calibrate_many
from bsnn.convert.config import ConvertConfig, parse_statistic
from bsnn.convert.ltb import ltb_batches, ltb_thresholds
from bsnn.convert.phases import late_gains, phase_neurons_
from bsnn.convert.snn_calibration import WeightCalibration, calibrate_snn_
from bsnn.activations import QCFS, is_trained_threshold
from bsnn.convert.checks import warn_architecture
from bsnn.convert.graph import (activation_modules, capture, clip_bounds, observed_modules, per_channel_allowed,
                                relu_modules)
from bsnn.convert.surgery import build_spiking_graph
from bsnn.data import unpack_batch
from bsnn.distributed import all_reduce_sum, collective_device, current_env
from bsnn.errors import ConfigError, ConversionError
from bsnn.simulate import run_batch
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.offset import suspended

__all__ = ["MSE", "Max", "Percentile", "convert", "convert_with_thresholds", "calibrate", "capture"]


def convert(model: nn.Module, calib_loader, cfg: ConvertConfig | None = None,
            device: torch.device | str = "cpu") -> SpikingNetwork:
    """Convert a trained (binary-weight or full-precision) ANN into a spiking network.

    The ANN is not modified. Steps: fx capture (functional ReLUs included, dropout removed), activation
    calibration over ``cfg.calib_samples`` samples of ``calib_loader``, threshold balancing (optionally choosing
    the percentile by SNN accuracy at a target T; or, with ``threshold_opt="ltb"``, thresholds fitted by local
    threshold balancing, :mod:`bsnn.convert.ltb`), graph surgery (BN folded, binary weights stored as exactly ±1
    with α moved into thresholds, ReLU -> IF neurons with reset by subtraction, output = non-spiking
    integrator), then optionally a layer-wise bias/potential correction against the ANN (``advanced``: weight
    calibration first, :mod:`bsnn.convert.snn_calibration`).

    Under ``torchrun`` every rank calls it with the same loader: the SNN simulations (percentile search, SNN
    calibration) are dealt to the ranks and their results gathered, the ANN statistics computed on each, so every
    rank returns the single process's network, bit for bit.

    Args:
        model: the ANN (eval-mode semantics are used: BN running statistics, no dropout).
        calib_loader: yields ``(x [B, C, H, W], y)``; typically the training set without augmentation.
        cfg: conversion settings.
        device: where calibration runs.

    Returns:
        A :class:`SpikingNetwork` on CPU (move it with ``.to``).
    """
    cfg = cfg or ConvertConfig()
    cfg.validate()
    warn_architecture(model, cfg.v_init, cfg.snn_calibration, where="convert: ")
    example = _first_batch(calib_loader)
    # capture a copy: fx shares submodules with the traced model, and calibration moves them to ``device``
    gm = capture(copy.deepcopy(model).to(device), example.to(device), cfg.maxpool)
    acts = activation_modules(gm)
    if not acts:
        raise ConversionError(f"{type(model).__name__} has no ReLU activation to turn into spiking neurons")
    relus = relu_modules(gm)
    candidates = [_resolved(parse_statistic(p, "convert.search_percentiles"), cfg) for p in cfg.search_percentiles] \
        or [_resolved(cfg.threshold, cfg)]
    pc = per_channel_allowed(gm, set(relus)) if cfg.per_channel else set()
    late = cfg.late_statistic()
    late = None if late is None else _resolved(late, cfg)
    stats: dict = {c: {} for c in candidates + ([late] if late is not None and late not in candidates else [])}
    if cfg.threshold_opt == "ltb":  # λ fitted by local threshold balancing instead of a statistic
        x_ltb, _ = _first_samples(calib_loader, cfg.ltb_iterations * cfg.ltb_batch_size)
        stats[candidates[0]] = ltb_thresholds(gm, observed_modules(gm, relus), pc,
                                              ltb_batches(x_ltb, cfg.ltb_iterations, cfg.ltb_batch_size), device)
    for group, per_channel in (({k: m for k, m in relus.items() if k not in pc}, False),
                               ({k: m for k, m in relus.items() if k in pc}, True)):
        # per-channel statistics only where the consumers are full precision (one extra pass)
        if group and cfg.threshold_opt == "none":
            for c, values in calibrate_many(gm, observed_modules(gm, group), calib_loader, list(stats), per_channel,
                                            cfg.calib_samples, device).items():
                stats[c].update(values)
    gm = gm.cpu()

    def balanced(stat) -> dict[str, torch.Tensor]:
        values = {k: v.cpu() for k, v in stats[stat].items()}
        values.update({k: m.clip.detach().cpu().clamp_min(1e-6) for k, m in acts.items() if is_trained_threshold(m)})
        return clipped_thresholds(balanced_thresholds({k: values[k] for k in acts}, cfg.threshold_scale),
                                  clip_bounds(gm))

    def build(stat) -> SpikingNetwork:
        thresholds = balanced(stat)
        bounds = {**clip_bounds(gm), **{k: float(m.clip.detach().max()) for k, m in acts.items()
                                         if is_trained_threshold(m)}}
        gains = None if late is None else late_gains(thresholds, balanced(late), bounds)
        return convert_with_thresholds(gm, thresholds, cfg, list(example.shape[1:]), gains)

    search = {}
    if len(candidates) > 1:
        x, y = _first_samples(calib_loader, cfg.search_samples)
        search = {c: _accuracy_at(build(c), x, y, cfg.search_timesteps) for c in candidates}
        best = max(candidates, key=lambda c: (search[c], c.p if isinstance(c, Percentile) else 100.0))
    else:
        best = candidates[0]
    snn = build(best)
    snn.meta["convert"]["threshold"] = _spec(best) if cfg.threshold_opt == "none" else cfg.threshold_opt
    if search:
        snn.meta["threshold_search"] = {_spec(c): a for c, a in search.items()}
    if cfg.snn_calibration != "none":
        x, _ = _first_samples(calib_loader, cfg.snn_calibration_samples)
        weights = WeightCalibration(cfg.snn_calibration_weight_iters, cfg.snn_calibration_weight_lr,
                                    cfg.snn_calibration_weight_batch)
        with suspended(snn):  # the run-time offset correction (if any) acts on the calibrated network
            snn.meta["snn_calibration_error"] = calibrate_snn_(snn, gm, x, cfg.snn_calibration_timesteps,
                                                               cfg.snn_calibration, weights=weights,
                                                               joint_timesteps=cfg.snn_calibration_joint_timesteps)
    return snn


def _spec(stat) -> str:
    """``stat`` as recorded in ``SpikingNetwork.meta["convert"]``: its text form, which :func:`load_snn
    <bsnn.modelfile.load_snn>` parses back (an MSE search with a non-default momentum has none: its description)."""
    try:
        return stat.spec()
    except ConfigError:
        return stat.describe()


def _resolved(stat, cfg: ConvertConfig):
    """``stat`` with an :class:`MSE` search's unset ``v0`` taken from the conversion's ``v_init`` (the quantiser
    then codes what the IF neurons will compute)."""
    return dataclasses.replace(stat, v0=cfg.v_init) if isinstance(stat, MSE) and stat.v0 is None else stat


def _first_batch(loader) -> torch.Tensor:
    """The inputs ``[B, C, H, W]`` of the loader's first batch (a clear error for an empty loader)."""
    for batch in loader:
        x, _, _ = unpack_batch(batch, "calibration", 0, labels=False)
        if x.shape[0] > 0:
            return x
        break
    raise ConversionError("convert: the calibration loader yielded no samples; pass a DataLoader over (a part of) "
                          "the training set, e.g. bsnn.data.calibration_loader(splits, data_cfg, 2048)")


def _first_samples(loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, seen = [], [], 0
    for batch in loader:
        xs.append(batch[0][: n - seen].cpu())
        ys.append(batch[1][: n - seen].cpu())
        seen += xs[-1].shape[0]
        if seen >= n:
            break
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _accuracy_at(snn: SpikingNetwork, x: torch.Tensor, y: torch.Tensor, timesteps: int, batch: int = 256) -> float:
    """Accuracy (%) of ``snn`` at T = ``timesteps`` on ``(x, y)``; under torchrun the batches are dealt to the
    ranks and the (integer) correct counts summed: every rank gets the single process's value."""
    env = current_env()
    correct = 0
    for k, i in enumerate(range(0, len(x), batch)):
        if k % env.world_size == env.rank:
            mem = run_batch(snn, x[i:i + batch], timesteps, min(16, timesteps))[-1]
            correct += (mem.argmax(1) == y[i:i + batch]).sum().item()
    correct = int(all_reduce_sum([correct], collective_device())[0])
    return 100.0 * correct / max(1, len(x))


def initial_potentials(gm, cfg: ConvertConfig) -> dict[str, float]:
    """Initial membrane per IF layer as a fraction of θ: 0.5 for QCFS layers (their built-in shift), else
    ``cfg.v_init``."""
    return {k: 0.5 if isinstance(m, QCFS) else cfg.v_init for k, m in activation_modules(gm).items()}


def convert_with_thresholds(gm, thresholds: dict[str, torch.Tensor], cfg: ConvertConfig,
                            input_shape: list[int], gains: dict[str, int] | None = None) -> SpikingNetwork:
    """Surgery only: build the SNN from a captured graph and given thresholds λ (no calibration); with
    ``cfg.late_statistic()``, phased neurons where the integer late ``gains`` per activation exceed 1
    (:func:`bsnn.convert.phases.phase_neurons_`; a loaded network passes the gains its meta records)."""
    sgm, layers, neurons = build_spiking_graph(gm, thresholds, initial_potentials(gm, cfg), cfg.maxpool,
                                                 cfg.neuron, cfg.max_burst)
    record = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    record["threshold"] = _spec(cfg.threshold)
    late = cfg.late_statistic()
    record["late_threshold"] = None if late is None else _spec(late)  # resolved: a loaded network is rebuilt as is
    meta = {"convert": record,
            "thresholds": {k: v.tolist() for k, v in thresholds.items()}}
    if late is not None:
        meta["late_gains"] = dict(gains or {})
    snn = SpikingNetwork(sgm, layers, neurons, input_shape, meta)
    if late is not None:
        phase_neurons_(snn, gains, cfg.late_threshold_after)
    return snn.eval()
