"""CIFAR ResNet-20 (He et al. 2016) in a conversion-friendly form."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bsnn.models._common import check_width, init_weights, scaled
from bsnn.models.registry import MODELS


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity when the
    shape is unchanged, else a 1x1 strided conv + BN ("option B"). ``relu1`` and ``relu2`` are
    distinct modules, each used once.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of ``conv1`` and of the shortcut.

    Shape:
        input ``[B, in_channels, H, W]``, output ``[B, out_channels, H / stride, W / stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``[B, C, H, W]``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


@MODELS.register("resnet20_cifar")
class ResNet20(nn.Module):
    """ResNet-20 for 32x32 inputs: stem, 3 stages of 3 BasicBlocks, global average pool, Linear.

    Layout (channels times ``width``)::

        conv3x3(in, 16) - BN - ReLU
        stage1: 3 x BasicBlock(16), stage2: 3 x BasicBlock(32, first stride 2),
        stage3: 3 x BasicBlock(64, first stride 2)
        AdaptiveAvgPool2d(1) - Flatten - Linear(64, num_classes)

    19 main 3x3 convs plus 2 option-B 1x1 shortcut convs.

    Args:
        num_classes: number of output classes.
        in_channels: input image channels.
        width: channel multiplier.

    Shape:
        input ``[B, in_channels, 32, 32]`` (any size >= 4 works), output ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, width: float = 1.0) -> None:
        super().__init__()
        check_width("resnet20_cifar", width)
        chans = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu1 = nn.ReLU()
        c = chans[0]
        stages = []
        for i, out in enumerate(chans):
            blocks = []
            for j in range(3):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c, out, stride))
                c = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W]`` images to ``[B, num_classes]`` logits."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))
