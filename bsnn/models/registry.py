"""The model registry and :func:`create_model`, the one way to build a registered architecture."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from torch import nn

from bsnn._registry import Registry
from bsnn.errors import ConfigError
from bsnn.models._common import check_positive_int

#: Registered architectures: each entry is a class (or factory) taking ``num_classes``, ``in_channels``
#: and keyword-only options.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

_COMMON = ("num_classes", "in_channels")


def list_models() -> list[str]:
    """Return the sorted names of all registered models."""
    return MODELS.names()


def _model_options(factory: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    """The keyword options ``factory`` accepts besides ``num_classes`` and ``in_channels``."""
    params = inspect.signature(factory).parameters
    return {
        k: p for k, p in params.items()
        if k not in _COMMON and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def create_model(name: str, num_classes: int = 10, in_channels: Optional[int] = None,
                 **kw: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered model name (case-insensitive); see :func:`list_models`.
        num_classes: size of the output layer.
        in_channels: input image channels; ``None`` uses the model's own default
            (1 for ``small_cnn``, 3 for the CIFAR models).
        **kw: model-specific options (e.g. ``width``, ``dropout``); unknown options are errors.

    Returns:
        The freshly initialised model, mapping ``[B, in_channels, H, W]`` to ``[B, num_classes]``.

    Raises:
        ConfigError: unknown model name (the message lists the valid names), unknown option (the
            message names the model and the accepted options) or an out-of-range value.
    """
    factory = MODELS.get(name)
    key = str(name).lower()
    options = _model_options(factory)
    passes_on = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    unknown = [] if passes_on else sorted(set(kw) - set(options))  # **options: the library checks them
    if unknown:
        accepted = ", ".join(
            f"{k}={p.default!r}" if p.default is not p.empty else k for k, p in options.items()
        ) or "(none)"
        raise ConfigError(
            f"model {key!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"accepted options: num_classes, in_channels, {accepted}"
        )
    check_positive_int(key, "num_classes", num_classes)
    if in_channels is not None:
        check_positive_int(key, "in_channels", in_channels)
        kw["in_channels"] = in_channels
    return factory(num_classes=num_classes, **kw)
