"""torch.distributed helpers: the same training loop runs alone or under ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bsnn.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``, ...).

    Uses NCCL on CUDA and gloo on CPU. Returns a single-process :class:`DistEnv` when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    return env


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group cleanly at the end of a command: with ``wait``, a barrier first, so no rank exits
    while another still talks to it (leave it off after an error: the other ranks may be inside another
    collective), then ``destroy_process_group``. Without it the backend's threads are torn down at interpreter exit,
    and gloo can abort a rank ("terminate called without an active exception"). A no-op when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def current_env() -> DistEnv:
    """The :class:`DistEnv` of an already-initialised process group (or single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def collective_device() -> torch.device:
    """Where tensors of a collective must live: this rank's CUDA device under NCCL, else the CPU (gloo, or not
    distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Synchronise ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(name)``, checked to exist.

    Raises:
        ConfigError: an unknown device name, CUDA requested without a CUDA device, or ``cuda:N`` beyond the
            devices present.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"run.device {name!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {name!r} but no CUDA device is available; use run.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"run.device is {name!r} but this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1}); "
                          "use one of those, cuda or auto")
    return dev


def all_reduce_tensor_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks (a new tensor on ``t``'s device; ``t`` itself when not distributed). The sum
    runs on :func:`collective_device` (NCCL reduces CUDA tensors only)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.to(collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, sent through the process group, never read from disk), in rank order;
    ``[obj]`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def map_shards(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``torch.cat([fn(c) for c in x.split(chunk)])``, the chunks dealt to the ranks of a torchrun job (chunk i to
    rank i mod N) and the results gathered in chunk order on every rank.

    Every chunk is computed exactly as in a single process (same samples, same batch size), so the result is
    bit-identical to the single process's whatever the number of ranks. ``fn``'s outputs travel through the
    process group on the CPU and come back on ``x``'s device.

    Args:
        fn: ``[b, ...] -> [b, ...]`` per-sample results of a chunk (no cross-sample reduction inside).
        x: the samples ``[N, ...]``.
        chunk: samples per chunk (fixes the computation, hence the bits: keep it the same for every world size).
    """
    env = current_env()
    chunks = x.split(chunk)
    mine = [(i, fn(c).cpu()) for i, c in enumerate(chunks) if i % env.world_size == env.rank]
    if env.world_size > 1:
        mine = sorted((item for part in all_gather_objects(mine) for item in part), key=lambda it: it[0])
    return torch.cat([t for _, t in mine]).to(x.device)
