"""Helpers shared by the architectures: option checks and weight initialisation."""

from __future__ import annotations

from typing import Any

from torch import nn

from bsnn.errors import ConfigError


def check_width(model: str, width: Any) -> None:
    """Raise :class:`ConfigError` unless ``width`` is a positive number."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ConfigError(f"model {model!r}: width must be a positive number, got {width!r}")


def check_dropout(model: str, dropout: Any) -> None:
    """Raise :class:`ConfigError` unless ``0 <= dropout < 1``."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model {model!r}: dropout must be in [0, 1), got {dropout!r}")


def check_positive_int(model: str, name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model {model!r}: {name} must be a positive int, got {value!r}")


def check_channels(model: str, channels: Any, n: int) -> list[int] | None:
    """``channels`` as a list of ``n`` positive ints (per-conv widths), or None when not given.

    Raises:
        ConfigError: not a list of ``n`` positive ints.
    """
    if channels is None:
        return None
    if not isinstance(channels, (list, tuple)) or len(channels) != n or \
            any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ConfigError(f"model {model!r}: channels must list {n} positive ints (one width per conv), got "
                          f"{channels!r}")
    return [int(c) for c in channels]


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def init_weights(model: nn.Module, conv_mode: str = "fan_out", linear_std: float | None = None) -> None:
    """Initialise ``model`` in place.

    Conv2d: Kaiming normal for ReLU (``conv_mode`` fan); Linear: Kaiming uniform for ReLU, or
    ``N(0, linear_std)`` when given; BatchNorm: weight 1, bias 0; every bias 0.

    Args:
        model: the network to initialise.
        conv_mode: ``"fan_out"`` or ``"fan_in"`` for the convolutions.
        linear_std: if set, standard deviation of a normal init for every Linear.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            if linear_std is None:
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, linear_std)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            continue
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
