"""A small conversion-friendly CNN for MNIST-like inputs (28x28, also 8x8 digits)."""

from __future__ import annotations

import torch
from torch import nn

from bsnn.errors import ConfigError
from bsnn.models._common import check_dropout, check_positive_int, init_weights
from bsnn.models.registry import MODELS


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Three conv blocks and a two-layer classifier, built for ANN -> SNN conversion.

    Layout (``w = width``)::

        conv(in, w, 3, p1) - BN - ReLU - AvgPool(2)
        conv(w, 2w, 3, p1) - BN - ReLU - AvgPool(2)
        conv(2w, 4w, 3, p1) - BN - ReLU - AdaptiveAvgPool(pool_size)
        Flatten - Linear(4w * pool_size**2, hidden) - BN1d - ReLU - Dropout - Linear(hidden, num_classes)

    The adaptive pool makes the classifier input size independent of the image size, so the same
    network takes 28x28 MNIST and 8x8 scikit-learn digits (any side >= 4).

    Args:
        num_classes: number of output classes.
        in_channels: input image channels.
        width: channels of the first conv; the next two have ``2*width`` and ``4*width``.
        hidden: units of the hidden fully connected layer.
        dropout: dropout probability before the last layer.
        pool_size: output side of the adaptive average pool.
        bn_momentum: BatchNorm running-statistics momentum. The default 0.3 (PyTorch's is 0.1) keeps the
            eval-mode statistics close to the weights in the short trainings this model is meant for
            (a few hundred steps); with 0.1 the eval accuracy lagged the train-mode one by 1-2 points.

    Shape:
        input ``[B, in_channels, H, W]`` (H, W >= 4), output ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width: int = 32,
                 hidden: int = 256, dropout: float = 0.1, pool_size: int = 2,
                 bn_momentum: float = 0.3) -> None:
        super().__init__()
        for key, val in (("width", width), ("hidden", hidden), ("pool_size", pool_size)):
            check_positive_int("small_cnn", key, val)
        check_dropout("small_cnn", dropout)
        if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) \
                or not 0 < bn_momentum <= 1:
            raise ConfigError(f"model 'small_cnn': bn_momentum must be in (0, 1], got {bn_momentum!r}")
        c1, c2, c3 = width, 2 * width, 4 * width
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c3 * pool_size * pool_size, hidden, bias=False)
        self.bn4 = nn.BatchNorm1d(hidden)
        self.relu4 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)
        init_weights(self)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.momentum = float(bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W]`` images to ``[B, num_classes]`` logits."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        x = self.relu4(self.bn4(self.fc1(self.flatten(x))))
        return self.fc2(self.dropout(x))
