"""Conversion-friendly VGG networks: CIFAR VGG-7 / VGG-11 (with BN), the VGG-15 of Lu & Sengupta, and a plain
6-conv + 2-FC VGG written as users write one (``plain_vgg8``).

All of them use one ``nn.ReLU`` module per activation and ``nn.Flatten``, and average pooling by default
(``plain_vgg8(pool="max")`` has max-pools, which convert through a spiking max-pool).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from bsnn.errors import ConfigError
from bsnn.models._common import (check_channels, check_dropout, check_positive_int, check_width, init_weights,
                                 scaled)
from bsnn.models.registry import MODELS

_Cfg = Sequence[Union[int, str]]

VGG7_CFG: tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M")
VGG11_CFG: tuple[Union[int, str], ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M",
                                         512, 512, "M")
VGG15_CFG: tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                         512, 512, 512, "M", 512, 512, 512, "M")


def make_bn_features(cfg: _Cfg, in_channels: int, width: float) -> tuple[nn.Sequential, int]:
    """Build ``conv3x3 - BN - ReLU`` blocks with ``AvgPool2d(2)`` at every ``"M"``.

    Args:
        cfg: channel counts and ``"M"`` (down-sampling) markers.
        in_channels: input channels.
        width: channel multiplier.

    Returns:
        The feature extractor and its number of output channels.
    """
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.AvgPool2d(2))
        else:
            out = scaled(int(v), width)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
    return nn.Sequential(*layers), c


class _VGGBN(nn.Module):
    """``features`` then ``classifier``; shared forward of the CIFAR VGGs."""

    features: nn.Sequential
    classifier: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.classifier(self.features(x))


@MODELS.register("vgg7_cifar")
class VGG7(_VGGBN):
    """VGG-7 for 32x32 inputs (binary-net style): six BN convs and two fully connected layers.

    Layout (channels times ``width``)::

        [conv-BN-ReLU] 64, 64, AvgPool2 | 128, 128, AvgPool2 | 256, 256, AvgPool2
        Flatten - Linear(256*4*4, hidden) - BN1d - ReLU - Dropout - Linear(hidden, num_classes)

    Args:
        num_classes: number of output classes.
        in_channels: input image channels.
        width: channel multiplier for the convolutions.
        hidden: units of the hidden fully connected layer.
        dropout: dropout probability before the last layer.

    Shape:
        input ``[B, in_channels, 32, 32]``, output ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, width: float = 1.0,
                 hidden: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        check_width("vgg7_cifar", width)
        check_positive_int("vgg7_cifar", "hidden", hidden)
        check_dropout("vgg7_cifar", dropout)
        self.features, c = make_bn_features(VGG7_CFG, in_channels, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * 4 * 4, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)


@MODELS.register("vgg11_cifar")
class VGG11(_VGGBN):
    """VGG-11 with BatchNorm for 32x32 inputs, average pooling instead of max pooling.

    Layout (channels times ``width``)::

        [conv-BN-ReLU] 64, AvgPool2, 128, AvgPool2, 256, 256, AvgPool2, 512, 512, AvgPool2,
                       512, 512, AvgPool2
        Flatten - Dropout - Linear(512, num_classes)

    Args:
        num_classes: number of output classes.
        in_channels: input image channels.
        width: channel multiplier for the convolutions.
        dropout: dropout probability before the classifier.

    Shape:
        input ``[B, in_channels, 32, 32]``, output ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, width: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        check_width("vgg11_cifar", width)
        check_dropout("vgg11_cifar", dropout)
        self.features, c = make_bn_features(VGG11_CFG, in_channels, width)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))
        init_weights(self)


@MODELS.register("vgg15_snn")
class VGG15SNN(nn.Module):
    """The "VGG-15" of Lu & Sengupta (2020): 13 conv3x3 + 2 FC, no bias, no BatchNorm.

    Inside a stage every conv is ``conv - ReLU - Dropout``; the last conv of each of the 5 stages is
    ``conv - AvgPool2d(2) - ReLU`` (pooling *before* the ReLU, so conv and pool feed one IF layer
    after conversion). Channels (times ``width``)::

        64, 64 | 128, 128 | 256, 256, 256 | 512, 512, 512 | 512, 512, 512
        Flatten - Dropout - Linear(512*s*s, hidden) - ReLU - Dropout - Linear(hidden, num_classes)

    with ``s = input_size // 32`` (1 for CIFAR, 7 for 224x224 ImageNet). Initialisation as in the
    authors' code: Kaiming normal (fan-out) convs, ``N(0, 0.01)`` linears.

    Args:
        num_classes: number of output classes.
        in_channels: input image channels.
        width: channel multiplier for the convolutions.
        hidden: units of the hidden fully connected layer.
        dropout: dropout probability (after the in-stage ReLUs and around the hidden FC layer).
        input_size: side of the square input image, a multiple of 32.
        channels: the 13 convs' widths, overriding ``width`` (e.g. ``prune_distill``'s ``student_plan``).

    Shape:
        input ``[B, in_channels, input_size, input_size]``, output ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, width: float = 1.0,
                 hidden: int = 4096, dropout: float = 0.1, input_size: int = 32, channels: list | None = None) -> None:
        super().__init__()
        check_width("vgg15_snn", width)
        widths = check_channels("vgg15_snn", channels, sum(v != "M" for v in VGG15_CFG))
        check_positive_int("vgg15_snn", "hidden", hidden)
        check_positive_int("vgg15_snn", "input_size", input_size)
        check_dropout("vgg15_snn", dropout)
        if input_size % 32:
            raise ConfigError(f"model 'vgg15_snn': input_size must be a multiple of 32, got {input_size}")
        layers: list[nn.Module] = []
        c, k = in_channels, 0
        for i, v in enumerate(VGG15_CFG):
            if v == "M":
                continue
            out = widths[k] if widths else scaled(int(v), width)
            k += 1
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=False))
            if i + 1 < len(VGG15_CFG) and VGG15_CFG[i + 1] == "M":
                layers += [nn.AvgPool2d(2), nn.ReLU()]
            else:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
            c = out
        self.features = nn.Sequential(*layers)
        s = input_size // 32
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * s * s, hidden, bias=False),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes, bias=False),
        )
        init_weights(self, conv_mode="fan_out", linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W]`` images to ``[B, num_classes]`` logits."""
        return self.classifier(self.features(x))


@MODELS.register("plain_vgg8")
def plain_vgg8(num_classes: int = 10, in_channels: int = 3, *, width: int = 32, pool: str = "avg",
               input_size: int = 32, channels: list | None = None) -> nn.Sequential:
    """A plain 6-conv + 2-FC VGG as users write one (``nn.Sequential`` of torch layers, PyTorch's default init):
    ``conv3x3-BN-ReLU`` x 6 with a 2x2 pool after every second conv, then ``Linear(4w·s², 256)-BN-ReLU-Linear``.
    Channels ``w, w, 2w, 2w, 4w, 4w``; ``s = input_size // 8``. The network of ``benchmarks/train_plain_vgg.py`` and
    of the zoo's ``cifar10_plain_*`` entries.

    Args:
        width: channels of the first two convs.
        pool: ``"avg"`` (conversion-friendly) or ``"max"`` (converted by a spiking max-pool).
        input_size: side of the square input, a multiple of 8.
        channels: the six convs' widths, overriding ``width`` (e.g. a student shaped from a pruned teacher,
            ``prune_distill``'s ``student_plan``).

    Shape:
        input ``[B, in_channels, input_size, input_size]``, output ``[B, num_classes]``.
    """
    check_positive_int("plain_vgg8", "width", width)
    channels = check_channels("plain_vgg8", channels, 6) or [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    if pool not in ("avg", "max"):
        raise ConfigError(f"model 'plain_vgg8': pool must be 'avg' or 'max', got {pool!r}")
    if input_size % 8:
        raise ConfigError(f"model 'plain_vgg8': input_size must be a multiple of 8, got {input_size}")
    layers: list[nn.Module] = []
    c = in_channels
    for i, out in enumerate(channels):
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
        c = out
    s = input_size // 8
    layers += [nn.Flatten(), nn.Linear(c * s * s, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(),
               nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)
