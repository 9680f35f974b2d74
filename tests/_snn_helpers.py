"""Shared by the conversion tests: a small binary CNN and an unlabelled loader over given inputs."""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_


def small_binary_cnn(seed: int = 1) -> nn.Module:
    """conv-BN-ReLU-avgpool-conv-BN-ReLU-FC-ReLU-FC on ``[B, 1, 8, 8]`` -> 3 classes, binarised (first and last
    layer full precision), eval mode, seeded."""
    torch.manual_seed(seed)
    return binarize_(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                                   nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))).eval()


def input_loader(x: torch.Tensor, batch_size: int = 32) -> DataLoader:
    """``(x, 0)`` batches of ``batch_size``."""
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch_size)
