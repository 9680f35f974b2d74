"""Reading intermediate features through forward hooks, so any model works without changing its forward.

A *layer spec* is a module name from ``model.named_modules()``: ``"conv3"`` taps that module's **output**,
``"fc2:in"`` its **input** (first positional argument). :func:`default_layer` picks the input of the last
``nn.Linear`` (in registration order): the penultimate features of a classifier.

Hooks only exist inside a :class:`FeatureTap` ``with`` block (registered on enter, removed on exit), so a
distiller never leaves hooks behind on the student or the teacher: copies, exports, ``torch.fx`` tracing and
conversion of the trained student see a clean model.

Example:
    >>> with FeatureTap(model, ["conv3", "fc2:in"]) as feats:
    ...     logits = model(x)
    >>> conv3_out, penultimate = feats
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from bsnn.errors import ConfigError

_INPUT_SUFFIXES = (":in", ":input")
_PROBE_SIDES = (32, 28, 64, 16, 8, 224, 96)


def parse_layer(spec: str) -> tuple[str, bool]:
    """``"name"`` -> ``("name", False)`` (output); ``"name:in"`` -> ``("name", True)`` (input)."""
    for suffix in _INPUT_SUFFIXES:
        if spec.endswith(suffix):
            return spec[: -len(suffix)], True
    return spec, False


def find_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule called ``name``; an unknown name raises a :class:`ConfigError` listing the valid ones."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        shown = ", ".join(names[:60]) + (" ..." if len(names) > 60 else "")
        raise ConfigError(f"{role} has no layer {name!r}; valid layer names: {shown}")
    return modules[name]


def last_module_name(model: nn.Module, kind: type | tuple[type, ...]) -> str | None:
    """Name of the last submodule (registration order) that is an instance of ``kind``, or None."""
    found = None
    for name, m in model.named_modules():
        if name and isinstance(m, kind):
            found = name
    return found


def default_layer(model: nn.Module, role: str = "model", spatial: bool = False) -> str:
    """Default tap: the input of the last ``nn.Linear`` (penultimate features).

    With ``spatial=True`` (attention transfer) it is the output of the last ``nn.Conv2d`` instead.
    """
    if spatial:
        name = last_module_name(model, nn.Conv2d)
        if name is None:
            raise ConfigError(f"{role} has no nn.Conv2d; name a layer with a [B, C, H, W] output in "
                              "distill.params (student_layer / teacher_layer)")
        return name
    name = last_module_name(model, nn.Linear)
    if name is None:
        raise ConfigError(f"{role} has no nn.Linear to take penultimate features from; name a layer in "
                          "distill.params (student_layer / teacher_layer)")
    return name + ":in"


def as_layer_list(value: str | Sequence[str] | None) -> list[str] | None:
    """A layer spec or a list of them -> list (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"a layer must be a module name or a list of module names, got {value!r}")


class FeatureTap:
    """Context manager capturing the outputs (or inputs) of named layers during one forward.

    Args:
        model: the network to tap.
        specs: layer specs (see :func:`parse_layer`); validated immediately.
        role: ``"student"`` / ``"teacher"``, used in error messages.

    ``with FeatureTap(...) as feats`` yields a list filled in ``specs`` order once the forward has run; a layer
    called several times keeps its last call. Reading a layer that did not run raises ``RuntimeError``.
    """

    def __init__(self, model: nn.Module, specs: Sequence[str], role: str = "model") -> None:
        self.role = role
        self.specs = list(specs)
        self._targets = []
        for spec in self.specs:
            name, use_input = parse_layer(spec)
            self._targets.append((find_module(model, name, role), use_input))
        self._handles: list = []
        self._values: list = [None] * len(self.specs)

    def _make_hook(self, i: int, use_input: bool):
        if use_input:
            def pre_hook(module, args):
                self._values[i] = args[0]
            return pre_hook

        def hook(module, args, output):
            self._values[i] = output
        return hook

    def __enter__(self) -> "_Features":
        self._values = [None] * len(self.specs)
        for i, (module, use_input) in enumerate(self._targets):
            hook = self._make_hook(i, use_input)
            handle = module.register_forward_pre_hook(hook) if use_input else module.register_forward_hook(hook)
            self._handles.append(handle)
        return _Features(self)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _Features(Sequence):
    """Lazy view of a :class:`FeatureTap`'s captured tensors (valid after the forward)."""

    def __init__(self, tap: FeatureTap) -> None:
        self._tap = tap

    def __len__(self) -> int:
        return len(self._tap.specs)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        v = self._tap._values[i]
        if v is None:
            raise RuntimeError(f"{self._tap.role} layer {self._tap.specs[i]!r} was not called during the forward")
        if not torch.is_tensor(v):
            raise ConfigError(f"{self._tap.role} layer {self._tap.specs[i]!r} produced a {type(v).__name__}, "
                              "not a tensor; tap a layer with a tensor output")
        return v


def model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the first parameter (or buffer) of ``model``; CPU / float32 if none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _candidate_inputs(model: nn.Module) -> list[tuple[int, ...]]:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    if isinstance(first, nn.Linear):
        return [(first.in_features,)]
    if isinstance(first, nn.Conv2d):
        return [(first.in_channels, s, s) for s in _PROBE_SIDES]
    if isinstance(first, nn.Conv1d):
        return [(first.in_channels, s) for s in (64, 32, 128, 16)]
    return []


@torch.no_grad()
def probe_features(model: nn.Module, specs: Sequence[str], role: str = "model",
                   example_input: torch.Tensor | None = None, input_shape: Sequence[int] | None = None
                   ) -> list[torch.Tensor]:
    """Run one side-effect-free forward to learn the shapes of tapped features.

    The model runs in eval mode under ``no_grad`` (BatchNorm statistics untouched, no RNG used) and every
    submodule's train/eval flag is restored afterwards. The input is, in order of preference: the first two
    rows of ``example_input``, zeros of ``[2, *input_shape]``, or zeros of a guessed image size (the first
    conv's channels at 32, 28, 64, ... pixels) until one runs.

    Returns:
        The tapped tensors (batch of 2).

    Raises:
        ConfigError: when no input could be found; set ``distill.params.input_shape=[C, H, W]``.
    """
    device, dtype = model_device(model)
    if example_input is not None:
        candidates = [example_input[:2].to(device)]
    elif input_shape is not None:
        candidates = [torch.zeros((2, *[int(s) for s in input_shape]), device=device, dtype=dtype)]
    else:
        candidates = [torch.zeros((2, *shape), device=device, dtype=dtype) for shape in _candidate_inputs(model)]
    modes = {m: m.training for m in model.modules()}
    tap = FeatureTap(model, specs, role)
    errors = []
    try:
        model.eval()
        for x in candidates:
            try:
                with tap as feats:
                    model(x)
                return [f.detach() for f in feats]
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                if isinstance(e, ConfigError):
                    raise
                errors.append(f"{tuple(x.shape)}: {str(e).splitlines()[0]}")
    finally:
        for m, mode in modes.items():
            m.training = mode
    detail = ("; tried " + " | ".join(errors[:3])) if errors else ""
    raise ConfigError(f"cannot run a probe forward through the {role} to size the distillation heads{detail}; "
                      "set distill.params.input_shape=[C, H, W] (or pass example_input to build_distiller)")


def _is_global_pool(m: nn.Module) -> bool:
    size = getattr(m, "output_size", None)
    return isinstance(m, nn.AdaptiveAvgPool2d) and size in (1, (1, 1), [1, 1])


def global_pool_head(model: nn.Module, role: str = "model", example_input: torch.Tensor | None = None,
                     input_shape: Sequence[int] | None = None) -> tuple[str, str] | None:
    """``(pool, fc)`` names when the model ends ``global-average-pool -> (flatten, dropout) -> fc``, else None.

    Then ``fc`` applied at every location of the pool's input map ``[B, C, H, W]`` gives per-location logits (the
    dense predictions of Zipf's LS, the classifier head of CA-MKD). Checked on one probe forward
    (:func:`probe_features`): the fc input must equal the spatial mean of the pool's input.
    """
    fc = last_module_name(model, nn.Linear)
    pools = [name for name, m in model.named_modules() if name and _is_global_pool(m)]
    if fc is None or not pools:
        return None
    pool = pools[-1]
    try:
        fmap, vec = probe_features(model, [pool + ":in", fc + ":in"], role, example_input, input_shape)
    except ConfigError:
        return None
    if fmap.dim() != 4 or vec.dim() != 2 or vec.shape[1] != fmap.shape[1]:
        return None
    return (pool, fc) if torch.allclose(fmap.mean(dim=(2, 3)), vec, rtol=1e-4, atol=1e-5) else None


def stage_input_layer(model: nn.Module) -> str | None:
    """Spec of the input of the last ``nn.Conv2d`` that changes the channel count (where the last stage starts),
    e.g. the mid-level features of USKD's weak head; None if only the first conv (the stem) does."""
    convs = [(name, m) for name, m in model.named_modules() if name and isinstance(m, nn.Conv2d)]
    found = [name for name, m in convs[1:] if m.in_channels != m.out_channels]  # the stem's input is the image
    return found[-1] + ":in" if found else None
