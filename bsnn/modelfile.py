"""bsnn model files: ``teacher.pt`` / ``student.pt`` (architecture record + state_dict) and ``snn.pt`` (the
converted network), saved atomically with a content hash and loaded without executing code.

Loading checks, in order: the content hash (:func:`bsnn.io.load_checkpoint`), the architecture record (a dict
naming ``name``, ``num_classes``, ``in_channels``), that the weights fit that architecture — checked on PyTorch's
``meta`` device first, so a record asking for a huge model is refused before anything is allocated — and, for a
spiking network, that every binary layer holds exactly ±1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from bsnn.activations import replace_activations_
from bsnn.binary import BinaryConfig, binarize_
from bsnn._validate import from_dict
from bsnn.convert import capture, convert_with_thresholds
from bsnn.convert.config import ConvertConfig
from bsnn.errors import BsnnError, CheckpointError
from bsnn.io import load_checkpoint, save_checkpoint
from bsnn.models import create_model
from bsnn.snn.network import SpikingNetwork

_ARCH_KEYS = ("name", "num_classes", "in_channels")


def build_model(arch: dict) -> nn.Module:
    """Rebuild a model from its architecture record (see :func:`save_model`)."""
    model = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                         **arch.get("kwargs", {}))
    act = arch.get("activation") or {"kind": "relu"}
    replace_activations_(model, act["kind"], clip=act.get("clip", 4.0), levels=act.get("levels", 8))
    if arch.get("binary") is not None:
        binarize_(model, from_dict(arch["binary"], BinaryConfig))
    return model


def _check_arch(path: str | Path, arch) -> None:
    if not isinstance(arch, dict) or any(k not in arch for k in _ARCH_KEYS):
        shown = repr(arch)[:120]
        raise CheckpointError(f"{str(path)!r}: its architecture record ('arch') must name {', '.join(_ARCH_KEYS)}, "
                              f"got {shown}; it was not written by bsnn (save_model)")


def _build(path: str | Path, arch) -> nn.Module:
    """:func:`build_model` of a file's record, every failure a :class:`CheckpointError` naming the file."""
    _check_arch(path, arch)
    try:
        return build_model(arch)
    except BsnnError as e:
        raise CheckpointError(f"{str(path)!r}: its architecture record cannot be built: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r}: its architecture record {arch.get('name')!r} cannot be built "
                              f"({type(e).__name__}: {e})") from None


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_fits(path: str | Path, arch: dict, state_dict: dict) -> None:
    """Refuse ``state_dict`` if it does not fit ``arch``, building the architecture on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            shell = build_model(arch)
    except Exception:  # noqa: BLE001 - not buildable on meta: load_state_dict checks it after the real build
        return
    want, have = _shapes(shell.state_dict()), _shapes(state_dict)
    if want != have:
        first = next(k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
        n_want, n_have = (sum(math.prod(s) for s in d.values()) for d in (want, have))
        gb = sum(v.numel() * v.element_size() for v in shell.state_dict().values()) / 1e9
        raise CheckpointError(
            f"{str(path)!r}: weights do not fit architecture {arch['name']!r}: the record asks for {n_want:,} "
            f"parameters and buffers ({gb:.3g} GB), the file holds {n_have:,} (first difference: {first!r}: "
            f"{want.get(first)} vs {have.get(first)}); nothing was built")


def save_model(path: str | Path, model: nn.Module, arch: dict, extra: dict | None = None) -> str:
    """Atomically write ``{'arch', 'state_dict', **extra}`` with its content hash; loadable with
    ``weights_only=True``. Returns the file's content hash."""
    return save_checkpoint({"arch": arch, "state_dict": model.state_dict(), **(extra or {})}, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a model written by :func:`save_model` without executing code, its content hash verified (see
    :func:`bsnn.io.load_checkpoint`). Returns ``(model, record)``.

    Raises:
        CheckpointError: missing, corrupt or foreign file; an architecture record that cannot be built; weights
            that do not fit it (refused before the model is allocated).
    """
    ck = load_checkpoint(path, map_location=device)
    if "arch" not in ck or "state_dict" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a bsnn model file (needs 'arch' and 'state_dict' entries)")
    if not isinstance(ck["state_dict"], dict):
        raise CheckpointError(f"{str(path)!r}: 'state_dict' holds a {type(ck['state_dict']).__name__}, not a dict")
    _check_arch(path, ck["arch"])
    _check_fits(path, ck["arch"], ck["state_dict"])
    model = _build(path, ck["arch"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: weights do not fit architecture {ck['arch']['name']!r}: {e}") from None
    return model.to(device), ck


def save_snn(path: str | Path, snn: SpikingNetwork, arch: dict, extra: dict | None = None) -> str:
    """Atomically save a converted network: the source ANN's architecture, the conversion record and the SNN
    state (±1 weights, thresholds, scales), plus ``extra`` and the content hash. Loading rebuilds the graph from
    these — no code is unpickled. Returns the content hash."""
    return save_checkpoint({"arch": arch, "snn_meta": snn.meta, "input_shape": snn.input_shape,
                            "state_dict": snn.state_dict(), **(extra or {})}, path)


def check_binary(snn: SpikingNetwork, where: str) -> None:
    """Every binary layer of ``snn`` holds exactly ±1.

    Raises:
        CheckpointError: naming the first layer that does not, with some of its other values.
    """
    modules = snn.synaptic_modules()
    for layer in snn.layers:
        if not layer.get("binary"):
            continue
        w = modules[layer["name"]].weight.detach()
        bad = w[(w != 1) & (w != -1)]
        if bad.numel():
            shown = ", ".join(f"{v:.5g}" for v in bad.unique()[:4].tolist())
            raise CheckpointError(f"{where}: binary layer {layer['name']!r} holds {bad.numel()} weight(s) other than "
                                  f"±1 ({shown}); the file is damaged or was edited: re-create it with `bsnn convert`")


def load_snn(path: str | Path) -> tuple[SpikingNetwork, dict]:
    """Load a network written by :func:`save_snn` (``weights_only``, content hash verified, binary layers checked
    to hold exactly ±1). Returns ``(snn, record)``."""
    ck = load_checkpoint(path)
    if "snn_meta" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a bsnn spiking-network file (write one with `bsnn convert`)")
    ann = _build(path, ck.get("arch")).eval()
    meta = ck["snn_meta"]
    cfg = from_dict({k: v for k, v in meta["convert"].items()}, ConvertConfig)
    gm = capture(ann, torch.zeros(1, *ck["input_shape"]))
    thresholds = {k: torch.as_tensor(v) for k, v in meta["thresholds"].items()}
    snn = convert_with_thresholds(gm, thresholds, cfg, ck["input_shape"])
    try:
        snn.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: spiking-network state does not fit its architecture: {e}") from None
    check_binary(snn, repr(str(path)))
    snn.meta = meta
    return snn.eval(), ck
