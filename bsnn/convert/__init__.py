"""ANN -> binary spiking network conversion: capture, calibrate, balance, surgery."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from bsnn.config import ConvertConfig
from bsnn.convert.balance import balanced_thresholds
from bsnn.convert.calibrate import Max, Percentile, calibrate
from bsnn.convert.graph import capture, relu_modules
from bsnn.convert.surgery import build_spiking_graph
from bsnn.errors import ConversionError
from bsnn.snn.network import SpikingNetwork

__all__ = ["Max", "Percentile", "convert", "convert_with_thresholds", "calibrate", "capture"]


def convert(model: nn.Module, calib_loader, cfg: ConvertConfig | None = None,
            device: torch.device | str = "cpu") -> SpikingNetwork:
    """Convert a trained (binary-weight or full-precision) ANN into a spiking network.

    The ANN is not modified. Steps: fx capture (functional ReLUs included, dropout removed), activation
    calibration over ``cfg.calib_samples`` samples of ``calib_loader``, threshold balancing, then graph surgery
    (BN folded, binary weights stored as exactly ±1 with α moved into thresholds, ReLU -> IF neurons with
    reset by subtraction, output = non-spiking integrator).

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
    example = next(iter(calib_loader))[0]
    gm = capture(model.to(device), example.to(device))
    relus = relu_modules(gm)
    if not relus:
        raise ConversionError(f"{type(model).__name__} has no ReLU activation to turn into spiking neurons")
    stats = calibrate(gm, relus, calib_loader, cfg.threshold, cfg.per_channel, cfg.calib_samples, device)
    return convert_with_thresholds(gm.cpu(), balanced_thresholds({k: v.cpu() for k, v in stats.items()},
                                                                 cfg.threshold_scale), cfg, list(example.shape[1:]))


def convert_with_thresholds(gm, thresholds: dict[str, torch.Tensor], cfg: ConvertConfig,
                            input_shape: list[int]) -> SpikingNetwork:
    """Surgery only: build the SNN from a captured graph and given thresholds λ (no calibration)."""
    sgm, layers, neurons = build_spiking_graph(gm, thresholds, cfg.v_init)
    record = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    record["threshold"] = cfg.threshold.describe()
    meta = {"convert": record,
            "thresholds": {k: v.tolist() for k, v in thresholds.items()}}
    return SpikingNetwork(sgm, layers, neurons, input_shape, meta).eval()
