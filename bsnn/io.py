"""Atomic file writes and code-free checkpoint loading."""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from bsnn.errors import CheckpointError


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + ``os.replace``.

    A crash mid-write leaves the previous file intact; readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Atomically save a checkpoint dict of tensors / plain Python values with ``torch.save``.

    Only objects that ``torch.load(weights_only=True)`` accepts should be stored (tensors, numbers,
    strings, lists, dicts), so that loading never executes code.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: a checkpoint can never run code.

    Raises:
        CheckpointError: the file is missing, corrupt, or carries anything but tensors and plain data
            (for instance a pickled callable), in which case nothing from it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; train first or pass an existing .pt file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"refused to load {str(path)!r}: it is not a plain-weights checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). bsnn only loads tensors and plain data; "
            "re-save it as a state_dict."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj
