"""bsnn model files: ``teacher.pt`` / ``student.pt`` (architecture record + state_dict) and ``snn.pt`` (the
converted network), saved atomically with a content hash and loaded without executing code.

Loading checks, in order: the content hash (:func:`bsnn.io.load_checkpoint`), the architecture record (a dict
naming ``name``, ``num_classes``, ``in_channels``), that the weights fit that architecture — checked on PyTorch's
``meta`` device first, so a record asking for a huge model is refused before anything is allocated — and, for a
spiking network, that every binary layer holds exactly ±1.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from bsnn.activations import replace_activations_
from bsnn.binary import BinaryConfig, binarize_
from bsnn._validate import from_dict
from bsnn.convert import capture, convert_with_thresholds
from bsnn.convert.config import ConvertConfig
from bsnn.errors import BsnnError, CheckpointError
from bsnn.io import CheckpointWarning, load_checkpoint, save_checkpoint
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


#: keys under which training scripts commonly nest a model's state dict
_NESTED_STATE = ("state_dict", "model_state_dict", "model", "net", "module")


def load_state_dict_file(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a user's PyTorch checkpoint of ``model``'s weights (a state dict, as ``torch.save(model.state_dict())``
    writes) into ``model``, without executing anything from the file (``weights_only=True``).

    Accepted layouts: a bare state dict, or one nested under ``state_dict`` / ``model_state_dict`` / ``model`` /
    ``net`` / ``module`` (training-script checkpoints); ``module.`` prefixes of DataParallel / DDP are dropped.
    TorchScript and ``torch.export`` archives are refused: they carry a program, and bsnn rebuilds the
    architecture from its name instead.

    Raises:
        CheckpointError: the file is missing or damaged, holds objects other than tensors and plain data, or its
            weights do not fit ``model`` (missing / unexpected keys, shapes; the message names them).
    """
    with warnings.catch_warnings():  # a user's file carries no bsnn hash: that is expected, not a warning
        warnings.simplefilter("ignore", CheckpointWarning)
        obj = load_checkpoint(path)  # refuses TorchScript / torch.export archives before torch.load sees them
    state = obj
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in _NESTED_STATE if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{str(path)!r} holds no state dict of tensors (top-level keys: {keys}); save "
                              "torch.save(model.state_dict(), path)")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    want, have = _shapes(model.state_dict()), _shapes(state)
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [f"{k}: {have[k]} in the file, {want[k]} in the model" for k in sorted(set(want) & set(have))
             if want[k] != have[k]]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                 f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                 f"shapes differ ({'; '.join(wrong[:3])})" if wrong else ""]
        raise CheckpointError(f"{str(path)!r} does not fit {type(model).__name__}: "
                              f"{', '.join(p for p in parts if p)}; check --arch and --num-classes (the number of "
                              "classes the weights were trained for)")
    model.load_state_dict(state)
    return model


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
    # a network saved before convert.late_threshold existed has one threshold: absent means none, not the default
    cfg = from_dict({"late_threshold": None, **meta["convert"]}, ConvertConfig)
    gm = capture(ann, torch.zeros(1, *ck["input_shape"]), cfg.maxpool)
    thresholds = {k: torch.as_tensor(v) for k, v in meta["thresholds"].items()}
    snn = convert_with_thresholds(gm, thresholds, cfg, ck["input_shape"], meta.get("late_gains"))
    try:
        snn.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: spiking-network state does not fit its architecture: {e}") from None
    check_binary(snn, repr(str(path)))
    snn.meta = meta
    return snn.eval(), ck
