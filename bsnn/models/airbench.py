"""Fast-training CIFAR networks after Keller Jordan's airbench94 (Jordan 2024, "94 % on CIFAR-10 in 3.29 seconds on a
single GPU", github.com/KellerJordan/cifar10-airbench): the full-precision teacher ``airbench94`` and its
conversion-friendly binary-student sibling ``airbench_snn``.

``airbench94`` (a teacher; not convertible: GELU and max-pooling)::

    WhiteningConv2d(3, 24, 2x2, bias)  - GELU                       32 -> 31
    ConvGroup(24 -> w0)  conv3x3 - MaxPool2 - BN - GELU - conv3x3 - BN - GELU      31 -> 15
    ConvGroup(w0 -> w1)                                               15 -> 7
    ConvGroup(w1 -> w2)                                               7 -> 3
    MaxPool3 - Flatten - Linear(w2, classes, no bias) - x scale (1/9)

with the authors' initialisation and BatchNorm: the stem's weights are the ZCA-style whitening filters of 2x2 image
patches (eigenvectors of their covariance scaled by ``1/sqrt(eigenvalue + 5e-4)``, and their negatives), computed from
training images by :func:`data_init_` and then frozen; every 3x3 conv starts with its first ``in_channels`` filters
as the identity (``dirac_``); BatchNorm with ``eps = 1e-12``, running-statistics momentum 0.4 (the authors' 0.6 in
their convention) and a frozen unit weight (only the bias learns). bsnn's trainer supplies the rest of their recipe
(``configs/cifar10.yaml``'s teacher section): the stem's bias optimised with the weights and frozen after 3 epochs
(``weight_like_parameters``, ``train.freeze_data_init_epochs``), Lookahead, the warm-up / linear-decay schedule, the
decoupled weight decay on BN biases and the translate + alternating-flip augmentation (``data.augmentation``).

``airbench_snn`` keeps the layout's width profile and cost but obeys the converter's rules (ReLU modules, average
pooling, conv-BN-ReLU, global average pooling)::

    conv3x3(3, s) - BN - ReLU                                         32x32   (kept full precision)
    group(ci -> co): conv3x3 - BN - ReLU - AvgPool2 - conv3x3 - BN - ReLU    x3: 32 -> 16 -> 8 -> 4
    AdaptiveAvgPool(1) - Flatten - Linear(w2, classes)                       (kept full precision)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bsnn.errors import ConfigError
from bsnn.models._common import check_positive_int, init_weights
from bsnn.models.registry import MODELS

#: airbench94's widths of its three conv groups.
AIRBENCH_WIDTHS: tuple[int, int, int] = (64, 256, 256)


def _check_widths(model: str, widths: Sequence[int]) -> tuple[int, int, int]:
    if not isinstance(widths, (list, tuple)) or len(widths) != 3 or \
            any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"model {model!r}: widths must list 3 positive ints (one per conv group), got {widths!r}")
    return int(widths[0]), int(widths[1]), int(widths[2])


class WhiteningConv2d(nn.Conv2d):
    """A ``k x k`` conv whose ``2 * C * k * k`` filters whiten ``k x k`` patches: set from data by
    :meth:`init_from_data`, then frozen (the bias still learns; ``frozen_parameters`` names the weight). airbench
    optimises the bias like a weight (learning rate and decay not those of BN biases): ``weight_like_parameters``.

    Shape:
        input ``[B, C, H, W]``, output ``[B, 2 C k^2, H - k + 1, W - k + 1]``.
    """

    frozen_parameters = ("weight",)
    weight_like_parameters = ("bias",)

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4) -> None:
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the filters from ``images`` ``[N, C, H, W]`` (normalised training images, a few thousand).

        The filters are ``V / sqrt(λ + eps)`` for the eigen-pairs ``(λ, V)`` (largest first) of the second-moment
        matrix of every ``k x k`` patch of the images, followed by their negatives (so a ReLU-like activation keeps both signs)."""
        c, k = self.in_channels, self.kernel_size[0]
        x = images.to(self.weight.device, torch.float64)
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = patches.T @ patches / patches.shape[0]  # the authors' second moment (normalised images: mean ~ 0)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + self.eps)[:, None]).flip(0).reshape(-1, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))


def data_init_modules(model: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``model`` with a data-dependent initialisation (an ``init_from_data`` method)."""
    return [m for m in model.modules() if callable(getattr(m, "init_from_data", None))]


def data_init_(model: nn.Module, images: torch.Tensor) -> bool:
    """Run ``init_from_data(images)`` of every sub-module that has one (data-dependent initialisation, e.g.
    :class:`WhiteningConv2d`); return whether any had."""
    modules = data_init_modules(model)
    for m in modules:
        m.init_from_data(images)
    return bool(modules)


def frozen_weight_batchnorm(channels: int) -> nn.BatchNorm2d:
    """airbench's BatchNorm: ``eps = 1e-12``, running-statistics momentum 0.4, the unit weight frozen (only the bias
    learns). A plain ``nn.BatchNorm2d`` (torch.fx traces it as a leaf) whose ``frozen_parameters`` attribute tells
    methods that unfreeze a model (:func:`bsnn.distill.base.unfreeze_`) to keep the weight frozen."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    bn.frozen_parameters = ("weight",)
    return bn


def _dirac_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    return conv


@MODELS.register("airbench94")
def airbench94(num_classes: int = 10, in_channels: int = 3, *, widths: Sequence[int] = AIRBENCH_WIDTHS,
               scale: float = 1 / 9) -> nn.Sequential:
    """The airbench94 network (module docstring): a fast-training full-precision CIFAR teacher.

    Args:
        widths: channels of the three conv groups.
        scale: multiplier of the logits (the authors' 1/9).

    Shape:
        input ``[B, in_channels, 32, 32]``, output ``[B, num_classes]``.
    """
    w = _check_widths("airbench94", widths)
    stem = WhiteningConv2d(in_channels, 2)
    layers: list[nn.Module] = [stem, nn.GELU()]
    c = stem.out_channels
    for out in w:
        layers += [_dirac_conv(c, out), nn.MaxPool2d(2), frozen_weight_batchnorm(out), nn.GELU(),
                   _dirac_conv(out, out), frozen_weight_batchnorm(out), nn.GELU()]
        c = out
    head = nn.Linear(c, num_classes, bias=False)
    return nn.Sequential(*layers, nn.MaxPool2d(3), nn.Flatten(), head, _Scale(scale))


class _Scale(nn.Module):
    """Multiply by a constant."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * x``."""
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


@MODELS.register("airbench_snn")
def airbench_snn(num_classes: int = 10, in_channels: int = 3, *, widths: Sequence[int] = AIRBENCH_WIDTHS,
                 stem: int = 32) -> nn.Sequential:
    """airbench's width profile in the converter's form (module docstring): a binary-student architecture.

    Args:
        widths: channels of the three conv groups.
        stem: channels of the first conv (full precision in a binary student: ``binary.keep_first``).

    Shape:
        input ``[B, in_channels, H, W]`` (H, W multiples of 8), output ``[B, num_classes]``.
    """
    w = _check_widths("airbench_snn", widths)
    check_positive_int("airbench_snn", "stem", stem)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                               nn.ReLU()]
    c = stem
    for out in w:
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.AvgPool2d(2),
                   nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    init_weights(net)
    return net
