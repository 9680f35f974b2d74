"""Atomic file writes, content hashes and code-free, integrity-checked checkpoint loading.

Checkpoints written by :func:`save_checkpoint` carry ``bsnn_sha256``, a SHA-256 over their whole content
(tensor bytes, dtypes, shapes and the plain data around them; see :func:`digest`). :func:`load_checkpoint`
loads with ``weights_only=True`` (a file can never run code) and refuses a file whose content does not match its
stored hash (a bit flip that keeps the file size, which the zip container does not catch). Files without a
stored hash (written by bsnn before hashes, or by other tools) still load, with a :class:`CheckpointWarning`.

Atomically written files get the mode a plain ``open()`` would give them: ``0o666`` minus the user's umask.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bsnn.errors import BsnnError, CheckpointError

#: key under which :func:`save_checkpoint` stores the content hash
INTEGRITY_KEY = "bsnn_sha256"


class OutputError(BsnnError, OSError):
    """A file could not be written (read-only folder, full disk, a file where a folder should be, ...)."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but something about it could not be verified (e.g. it has no stored hash)."""


# ----------------------------------------------------------------------------------------- writing
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(path: str | os.PathLike, e: OSError) -> OutputError:
    """An :class:`OutputError` naming ``path`` and the system's reason, with what to do about it."""
    reason = e.strerror or str(e)
    hint = {28: "free some disk space or choose another --out", 13: "choose a writable --out",
            30: "choose a folder on a writable file system for --out", 20: "a path component is a file; "
            "choose another --out", 17: "a file is in the way; choose another --out"}.get(e.errno or 0,
                                                                                         "check the path")
    return OutputError(e.errno or 0, f"cannot write {str(path)!r}: {reason}; {hint}")


def output_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if needed; :class:`OutputError` naming it when that fails."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(out, e) from None
    return out


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + ``os.replace``.

    A crash mid-write leaves the previous file intact; readers never see a partial file. The file ends up with
    mode ``0o666 & ~umask``, like a file created by ``open()``.

    Raises:
        OutputError: the folder cannot be created or written (read-only, full disk, ...); nothing is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OutputError):
            raise
        raise write_failure(path, e) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write a binary file (see :func:`atomic_write_text`)."""
    _atomic_write_bytes(path, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------------------- hashing
def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:  # dtypes, devices, ...: plain values weights_only accepts
        h.update(f"{type(obj).__name__}:{obj!s};".encode())


def digest(obj: Any) -> str:
    """SHA-256 (hex) of nested dicts / lists / tensors / plain values: tensor bytes, dtypes and shapes, key names
    (in sorted order) and values. Equal content gives an equal hash on any device and after a save/load."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """:func:`digest` of ``model.state_dict()``: which weights a derived file was made from."""
    return digest(model.state_dict())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: str | os.PathLike) -> str:
    """Atomically save a checkpoint dict of tensors / plain Python values with ``torch.save``, plus its content
    hash (``bsnn_sha256``, checked by :func:`load_checkpoint`). Returns the hash.

    Only objects that ``torch.load(weights_only=True)`` accepts should be stored (tensors, numbers,
    strings, lists, dicts), so that loading never executes code.
    """
    if INTEGRITY_KEY in obj:
        raise CheckpointError(f"save_checkpoint: {INTEGRITY_KEY!r} is reserved for the content hash")
    sha = digest(obj)
    buf = io.BytesIO()
    torch.save({**obj, INTEGRITY_KEY: sha}, buf)
    _atomic_write_bytes(path, buf.getvalue())
    return sha


_TORCH_HINTS = ("weights_only", "Weights only load failed", "Check the documentation", "file an issue",
                "trusted source", "arbitrary code")


def _reason(e: BaseException) -> str:
    """torch's message without its advice to load with ``weights_only=False`` (which would run code)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not any(s in ln for s in _TORCH_HINTS)]
    text = " ".join(keep) if keep else type(e).__name__
    first = text.split(". ")[0].rstrip(".")
    return first[:300]


def _is_program_archive(path: Path) -> bool:
    """``path`` is a zip archive holding TorchScript code (``code/``, ``constants.pkl``) or a ``torch.export``
    program (``archive_format`` / ``models/*.json``), not a plain pickled state."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith(("constants.pkl", "/archive_format", "serialized_exported_program.json"))
               for n in names)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (it can never run code) and verify its stored hash.

    Raises:
        CheckpointError: the file is missing, damaged (unreadable, or its content does not match the hash stored
            when it was written), or carries anything but tensors and plain data (for instance a pickled
            callable), in which case nothing from it is executed.

    Warns:
        CheckpointWarning: the file has no stored hash (older bsnn, other tools): it loads unverified.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; train first or pass an existing .pt file")
    if _is_program_archive(path):  # torch.load would hand these to torch.jit.load, which runs their code
        raise CheckpointError(f"refused to load {str(path)!r}: it is a TorchScript / torch.export archive (it carries "
                              "a program, and loading it runs that program); bsnn loads only state dicts: save "
                              "torch.save(model.state_dict(), path) and pass that file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is a damaged or foreign file
        reason = _reason(e)
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"refused to load {str(path)!r}: it holds objects other than tensors and plain data ({reason}); "
                "bsnn never runs code from a file: re-save the model as a state_dict of tensors"
            ) from None
        raise CheckpointError(
            f"refused to load {str(path)!r}: the file is damaged or not a PyTorch checkpoint ({reason}); "
            "restore it from a copy or re-create it by rerunning the stage that wrote it"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    stored = obj.pop(INTEGRITY_KEY, None)
    if stored is None:
        warnings.warn(f"{str(path)!r} has no stored content hash (written by an older bsnn or another tool), so its "
                      "integrity cannot be checked; re-save it with bsnn (e.g. rerun the stage) to add one",
                      CheckpointWarning, stacklevel=2)
    elif digest(obj) != stored:
        raise CheckpointError(
            f"refused to load {str(path)!r}: the file is corrupt (its tensors and data do not match the SHA-256 "
            "stored when it was written: damaged on disk, in a copy, or edited); restore it from a copy or "
            "re-create it by rerunning the stage that wrote it"
        )
    return obj
