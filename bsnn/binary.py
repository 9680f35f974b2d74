"""Binary weights (XNOR-Net style, weights only): effective weight α·sign(W) with a clipped STE.

* ``sign(0) = +1`` (``torch.sign`` would give 0, which is not a binary value).
* α = mean|W| per output channel (``scale="channel"``), one α for the layer (``"layer"``) or 1 (``"none"``).
* Backward: straight-through estimator clipped to the latent range, d sign(w)/dw = 1 if |w| <= clip else 0.
* Latent weights are clamped to [-clip, clip] after every optimiser step (:func:`clamp_latent_`).

First and last layers (in execution order, :func:`execution_order`) stay full precision by default
(Lu & Sengupta 2020; REFERENCE §1, §4).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from bsnn._validate import _check, _finite
from bsnn.errors import ConfigError


@dataclass
class BinaryConfig:
    """Weight binarisation (XNOR-Net style, weights only).

    Attributes:
        scale: ``"channel"`` (α = mean|W| per output channel), ``"layer"`` (one α) or ``"none"`` (α = 1).
        keep_first: keep the first conv/linear layer full precision.
        keep_last: keep the last conv/linear layer full precision.
        clip: latent weights are clamped to [-clip, clip]; the STE gradient is zero outside.
    """

    scale: str = "channel"
    keep_first: bool = True
    keep_last: bool = True
    clip: float = 1.0

    def validate(self) -> None:
        _check(self.scale in ("channel", "layer", "none"),
               f"binary.scale must be 'channel', 'layer' or 'none', got {self.scale!r}")
        _check(_finite(self.clip) and self.clip > 0, f"binary.clip must be a finite number > 0, got {self.clip}")


def binary_sign(w: torch.Tensor) -> torch.Tensor:
    """Sign with ``sign(0) = +1``: returns a tensor of exactly ±1 in ``w``'s dtype (no gradient)."""
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


class _SignSTE(torch.autograd.Function):
    """sign(w) forward, clipped straight-through estimator backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, clip: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        ctx.clip = clip
        return binary_sign(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Binarise ``w`` to ±1 with a clipped straight-through gradient (zero where ``|w| > clip``)."""
    return _SignSTE.apply(w, clip)


def weight_scale(w: torch.Tensor, scale: str) -> torch.Tensor:
    """Scaling factor α broadcastable to ``w``.

    Args:
        w: latent weight, shape ``[C_out, ...]``.
        scale: ``"channel"`` (mean|W| over all but dim 0), ``"layer"`` (mean|W|) or ``"none"`` (1).

    Returns:
        α with shape ``[C_out, 1, ...]`` (channel) or ``[]`` (layer / none).
    """
    if scale == "channel":
        return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    if scale == "layer":
        return w.abs().mean()
    if scale == "none":
        return torch.ones((), dtype=w.dtype, device=w.device)
    raise ConfigError(f"binary scale must be 'channel', 'layer' or 'none', got {scale!r}")


class BinaryMixin:
    """Shared behaviour of binary layers: α·sign(W) from a latent full-precision weight."""

    weight: nn.Parameter
    scale: str
    clip: float
    #: when set (:class:`bsnn.bop.Bop` does it), the forward uses α·b with ``b = sign(W)`` a fresh leaf tensor and
    #: α detached, and this hook receives ``dL/db`` at backward (the latent weight then gets no gradient)
    sign_grad_hook: Callable[[torch.Tensor], None] | None = None

    def binary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sign, alpha)``: ``sign`` exactly ±1 with the weight's shape, ``alpha`` broadcastable."""
        w = self.weight.detach()
        return binary_sign(w), weight_scale(w, self.scale)

    def effective_weight(self) -> torch.Tensor:
        """α·sign(W) with gradients through the clipped STE (and through α, as in XNOR-Net); with a
        ``sign_grad_hook``, α·b whose gradient goes to the hook only (``b`` = the ±1 signs)."""
        if self.sign_grad_hook is not None:
            sign, alpha = self.binary_weight()
            sign.requires_grad_(True)
            sign.register_hook(self.sign_grad_hook)
            return alpha * sign
        return weight_scale(self.weight, self.scale) * sign_ste(self.weight, self.clip)

    @torch.no_grad()
    def clamp_latent_(self) -> None:
        """Clamp the latent weight to ``[-clip, clip]`` in place."""
        self.weight.clamp_(-self.clip, self.clip)


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    """``nn.Conv2d`` whose effective weight is α·sign(W).

    Shapes as ``nn.Conv2d``: input ``[B, C_in, H, W]`` -> output ``[B, C_out, H', W']``.
    """

    def __init__(self, *args, scale: str = "channel", clip: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale, self.clip = scale, float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}, clip={self.clip}"


class BinaryLinear(BinaryMixin, nn.Linear):
    """``nn.Linear`` whose effective weight is α·sign(W). Input ``[B, in]`` -> output ``[B, out]``."""

    def __init__(self, *args, scale: str = "channel", clip: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale, self.clip = scale, float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}, clip={self.clip}"


def is_binary(module: nn.Module) -> bool:
    """True for :class:`BinaryConv2d` / :class:`BinaryLinear`."""
    return isinstance(module, BinaryMixin)


def _to_binary(m: nn.Module, cfg: BinaryConfig) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        new: nn.Module = BinaryConv2d(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
            scale=cfg.scale, clip=cfg.clip,
        )
    else:
        new = BinaryLinear(m.in_features, m.out_features, bias=m.bias is not None, scale=cfg.scale, clip=cfg.clip)
    new = new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight.clamp(-cfg.clip, cfg.clip))
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


class _LayerTracer(fx.Tracer):
    """fx tracer that stops at conv/linear layers (bsnn's binary ones included), so each is one graph node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)


def execution_order(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str] | None:
    """Qualified names of the conv/linear layers of ``model`` in the order its forward calls them (a layer called
    twice appears twice); layers forward never calls are left out.

    With ``example_input`` (a batch ``[B, ...]``) the order is recorded by forward hooks on one forward pass, in
    eval mode and without gradients (BatchNorm statistics and the train/eval flags are left as they were);
    otherwise it is read from a ``torch.fx`` trace. Returns None when there is no example and forward cannot be
    traced (e.g. Python control flow on tensor values).
    """
    layers = {id(m): n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if example_input is None:
        try:
            graph = _LayerTracer().trace(model)
        except Exception:  # noqa: BLE001 - fx raises many types; the caller falls back
            return None
        return [n.target for n in graph.nodes if n.op == "call_module" and id(model.get_submodule(n.target)) in layers]
    order: list[str] = []
    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, _args: order.append(layers[id(mod)]))
             for m in model.modules() if id(m) in layers]
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return order


def binarize_(
    model: nn.Module,
    cfg: BinaryConfig | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    *,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Replace conv/linear layers of ``model`` by binary-weight layers, in place.

    "First" and "last" layer mean the first and last conv/linear layer *forward runs* (not the first and last
    registered): the order comes from :func:`execution_order` — forward hooks on ``example_input`` when given,
    else a ``torch.fx`` trace. If there is no example and forward cannot be traced, it falls back to registration
    order (``model.named_modules()``) with a warning; pass ``example_input`` for such models.

    Args:
        model: the network to edit.
        cfg: binarisation settings; ``keep_first`` / ``keep_last`` keep the first / last executed conv-or-linear
            layer full precision.
        filter_fn: optional ``(qualified_name, module) -> bool``; when given, a layer is binarised only if it
            returns True (applied after the first/last rule).
        example_input: optional input batch ``[B, ...]`` to record the execution order with (one forward pass in
            eval mode, no gradients; nothing in the model changes).

    Returns:
        ``model`` itself (edited in place), for chaining.
    """
    cfg = cfg or BinaryConfig()
    cfg.validate()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not is_binary(m)]
    if not layers:
        raise ConfigError(f"binarize_: {type(model).__name__} has no nn.Conv2d / nn.Linear layer to binarise")
    order = execution_order(model, example_input) if cfg.keep_first or cfg.keep_last else []
    if order is None:
        warnings.warn(f"binarize_: cannot trace {type(model).__name__}.forward with torch.fx, so the first/last layer "
                      "kept full precision are the first/last registered ones; pass example_input=<a batch> to use "
                      "the execution order", stacklevel=2)
    if not order:
        order = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    skip = set()
    if cfg.keep_first:
        skip.add(order[0])
    if cfg.keep_last:
        skip.add(order[-1])
    for name, m in layers:
        if name in skip or (filter_fn is not None and not filter_fn(name, m)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _to_binary(m, cfg))
    return model


@torch.no_grad()
def clamp_latent_(model: nn.Module) -> None:
    """Clamp every binary layer's latent weight to its ``[-clip, clip]`` range (call after each step)."""
    for m in model.modules():
        if is_binary(m):
            m.clamp_latent_()


def binary_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the binary layers of ``model``."""
    return [n for n, m in model.named_modules() if is_binary(m)]


def materialize(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose binary layers are plain ``nn.Conv2d`` / ``nn.Linear`` holding the effective
    weight α·sign(W) — the same function, usable by tools that know nothing of bsnn (e.g. other converters)."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if not is_binary(m):
            continue
        sign, alpha = m.binary_weight()
        if isinstance(m, nn.Conv2d):
            new: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                       m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        new = new.to(m.weight.device, m.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(alpha * sign)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        new.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, new)
    return out
