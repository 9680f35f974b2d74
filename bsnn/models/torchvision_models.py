"""torchvision's classification architectures as ``torchvision:<name>`` models (``resnet18``, ``vgg11_bn``,
``mobilenet_v2``, ``densenet121``, ...), built with random initialisation (``weights=None``: nothing is
downloaded; a user's trained weights are loaded from their own state-dict file, see :func:`bsnn.modelfile.load_state_dict_file`).

torchvision is imported only when such a name is used (it adds about a second to ``import bsnn``). Which of these
convert is decided by the converter's supported operations (``docs/conversion.md``): conv / linear / BatchNorm /
ReLU / ReLU6 / pooling / add / concat networks do; SiLU, GELU, LayerNorm or attention (EfficientNet, ConvNeXt,
ViT, Swin, ...) are refused naming the op.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from bsnn.errors import ConfigError
from bsnn.models.registry import MODELS


def torchvision_names() -> list[str]:
    """The classification architectures of the installed torchvision (sorted)."""
    import torchvision.models as tvm  # third-party, lazily: only when a torchvision name is asked for

    return sorted(tvm.list_models(module=tvm))


def _with_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first ``nn.Conv2d`` (the stem) by one reading ``in_channels`` channels, same settings."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Conv2d stem to give {in_channels} input channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups if conv.groups == 1 else in_channels, conv.bias is not None, conv.padding_mode)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def torchvision_factory(arch: str) -> Callable[..., nn.Module]:
    """A model factory for torchvision architecture ``arch`` (one of :func:`torchvision_names`)."""

    def build(num_classes: int = 1000, in_channels: int = 3, **options: Any) -> nn.Module:
        import torchvision.models as tvm  # third-party, lazily

        try:
            model = tvm.get_model(arch, weights=None, num_classes=num_classes, **options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"torchvision:{arch} cannot be built with options {sorted(options)}: {e}") from None
        return model if in_channels == 3 else _with_input_channels(model, in_channels)

    build.__name__ = build.__qualname__ = f"torchvision_{arch}"
    build.__doc__ = f"torchvision's ``{arch}`` (random initialisation); options go to torchvision's builder."
    return build


MODELS.register_namespace("torchvision", torchvision_factory, torchvision_names)
