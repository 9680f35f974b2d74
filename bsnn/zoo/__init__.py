"""Released models: trained weights stored in the repository as safetensors, each with a model card.

Each entry ``<name>`` is two files in this folder: ``<name>.safetensors`` (the state dict; safetensors holds only
tensors, so loading can never run code) and ``<name>.json`` (the card: the architecture record bsnn rebuilds the
model from, the weights' SHA-256, the data, accuracies, SNN accuracy vs T, T@1, firing rates, cost at the
operating point, training command, time and machine), plus ``<name>.md``, the card for people.

Example:
    >>> import bsnn
    >>> bsnn.zoo.list()                                  # doctest: +SKIP
    >>> model, card = bsnn.zoo.load("cifar10_maxpool_vgg")  # doctest: +SKIP

Wherever the CLI takes a model file it also takes ``zoo:<name>`` (``bsnn convert --model zoo:<name>``,
``bsnn distill --teacher zoo:<name>``, ``bsnn simulate --ann zoo:<name>``, ``bsnn evaluate zoo:<name>``), and
``model.teacher=zoo:<name>`` makes ``bsnn run`` use the released teacher instead of training one.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bsnn.errors import CheckpointError, ConfigError
from bsnn.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from bsnn.modelfile import build_model, load_model

ZOO_DIR = Path(__file__).resolve().parent
PREFIX = "zoo:"


def names() -> builtins.list[str]:
    """The released models (sorted)."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.json") if (ZOO_DIR / f"{p.stem}.safetensors").is_file())


list = names  # noqa: A001 - the zoo's public name: bsnn.zoo.list()


def card(name: str) -> dict:
    """The model card of ``name``.

    Raises:
        ConfigError: unknown name (the message lists the released ones).
    """
    path = ZOO_DIR / f"{name}.json"
    if name not in names():
        raise ConfigError(f"unknown zoo model {name!r}; released: {', '.join(names()) or '(none)'} "
                          "(bsnn zoo list)")
    return json.loads(path.read_text())


def load(name: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The released model ``name`` (eval mode) and its card. The weights' SHA-256 is checked against the card
    and the state dict must fit the card's architecture exactly.

    Raises:
        ConfigError: unknown name.
        CheckpointError: the weights file does not match its card (damaged or edited).
    """
    info = card(name)
    path = ZOO_DIR / f"{name}.safetensors"
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.get("sha256"):
        raise CheckpointError(f"zoo model {name!r}: {path} has SHA-256 {digest[:12]}…, its card says "
                              f"{str(info.get('sha256'))[:12]}…; the file is damaged or was edited: restore it "
                              "from the repository (git checkout -- bsnn/zoo)")
    model = build_model(info["arch"])
    try:
        model.load_state_dict(load_safetensors(data))
    except RuntimeError as e:
        raise CheckpointError(f"zoo model {name!r}: weights do not fit {info['arch']['name']!r}: {e}") from None
    return model.to(device).eval(), info


def is_zoo(ref: str | Path | None) -> bool:
    """``ref`` names a released model (``zoo:<name>``)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def load_any(ref: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A model from ``zoo:<name>`` or a bsnn model file; returns ``(model, record)`` where the record carries
    ``arch`` (and, for a zoo model, its ``card``)."""
    if is_zoo(ref):
        model, info = load(str(ref)[len(PREFIX):], device)
        return model, {"arch": info["arch"], "card": info}
    return load_model(Path(ref), device)


def release(name: str, model: nn.Module, arch: dict, info: dict, card_markdown: str) -> Path:
    """Write ``model`` as zoo entry ``name``: weights (atomically), then its card with their SHA-256.

    Args:
        arch: the architecture record (:func:`bsnn.modelfile.build_model` must rebuild ``model`` from it).
        info: card fields (data, accuracies, SNN results, cost, training).
        card_markdown: the card for people (``<name>.md``).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"bsnn_arch": json.dumps(arch, sort_keys=True)})
    build_model(arch).load_state_dict(load_safetensors(data))  # the record really rebuilds this model
    path = ZOO_DIR / f"{name}.safetensors"
    atomic_write_bytes(path, data)
    atomic_write_json(ZOO_DIR / f"{name}.json", {"name": name, "arch": arch,
                                                  "sha256": hashlib.sha256(data).hexdigest(), **info})
    atomic_write_text(ZOO_DIR / f"{name}.md", card_markdown)
    return path
