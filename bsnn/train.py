"""Training loops for the full-precision teacher and the binary-weight student.

One loop (:func:`fit`) serves both: it optimises an *objective* module whose forward ``(x, y, index)``
returns ``{'loss', 'logits', parts...}`` (a :class:`bsnn.distill.Distiller`). It is

* seeded and deterministic on CPU (shuffling through a seeded sampler re-seeded every epoch, RNG state
  stored in checkpoints),
* resumable: an atomic checkpoint after every ``checkpoint_every`` epochs; ``resume=True`` continues a
  killed run from it and ends with the same weights as an uninterrupted run,
* torch.distributed-aware: under ``torchrun`` the objective is wrapped in DDP, each rank sees its shard of
  every global batch, and training metrics are summed across ranks.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bsnn._registry import Registry
from bsnn._validate import _check, _finite
from bsnn.binary import clamp_latent_
from bsnn.data import ArrayDataset, unpack_batch
from bsnn.distill import METHODS, IndexedDataset, build_distiller
from bsnn.distill.base import teacher_list
from bsnn.distill.config import DistillConfig
from bsnn.distributed import all_reduce_sum, barrier, current_env, resolve_device  # noqa: F401 (re-export)
from bsnn.errors import CheckpointError, ConfigError, DataError, TrainingError
from bsnn.io import load_checkpoint, save_checkpoint
from bsnn.models import data_init_
from bsnn.models.airbench import data_init_modules


@dataclass
class TrainConfig:
    """Optimisation settings for one training stage (teacher or student).

    Attributes:
        epochs: number of epochs.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: weight decay on conv/linear weights (never on BN, biases or scales).
        bias_lr_scale: learning-rate multiplier of the parameters without weight decay (BN and other biases,
            scales, clip levels); airbench trains its BN biases 64x faster than its weights (its unit BN weights are
            frozen); 1 = one learning rate.
        decay_biases: also decay the parameters of the no-decay group (BN and other biases, scales), by the same
            amount per step as the weights (their coefficient divided by ``bias_lr_scale``): airbench's decoupled
            weight decay covers its BN biases. Off: they are never decayed.
        schedule: a registered schedule (:data:`SCHEDULES`): ``"cosine"``, ``"step"``, ``"constant"`` (stepped once
            per epoch) or ``"onecycle"`` (linear warm-up over ``warmup_epochs`` from ``lr_start_factor * lr`` to
            ``lr``, then linear decay to ``lr_end_factor * lr``, stepped every batch: the fast-training recipe).
        step_epochs: for ``step``: decay every this many epochs.
        gamma: for ``step``: multiplicative decay.
        warmup_epochs: for ``onecycle``: epochs (fractions allowed) of linear warm-up to ``lr``.
        lr_start_factor: for ``onecycle``: the warm-up's first multiplier of ``lr`` (airbench: 0.2).
        lr_end_factor: for ``onecycle``: the multiplier of ``lr`` the decay ends at (airbench: 0.07).
        nesterov: Nesterov momentum (SGD).
        label_smoothing: cross-entropy label smoothing.
        ema_decay: keep an exponential moving average of the weights (and BN statistics) with this decay per step
            (warmed up: :func:`ema_decay_at`), used for validation and returned as the trained model; 0 = off.
        lookahead_every: > 0: :class:`Lookahead` weights, synchronised every this many steps (airbench: 5), the
            slow copy returned as the trained model; 0 = off. Exclusive with ``ema_decay``.
        lookahead_decay: :class:`Lookahead`'s per-step decay base (airbench: 0.95).
        freeze_data_init_epochs: > 0: the trainable parameters of data-initialised modules (the whitening stem's
            bias) learn during the first this many epochs only (airbench: 3); 0 = for the whole run.
        autocast: ``"none"`` or ``"bf16"`` (bfloat16 autocast of the forward pass: CPUs with AVX512-BF16 / AMX and
            GPUs; master weights stay fp32).
        channels_last: train in channels-last memory format (faster convolutions on CPU and GPU).
        checkpoint_every: save a resumable checkpoint every this many epochs.
        keep_epochs: teacher (``train``) section: also keep the model after these epochs as candidates for teacher
            selection (``checkpoints/teacher_epoch<k>.pt`` in a run; with ``ema_decay`` the raw weights).
        select_epochs: student section: > 0 chooses the teacher checkpoint that distils best: a student is
            distilled for this many epochs from each candidate and the best on validation wins
            (:func:`bsnn.distill.analysis.select_teacher`); 0 = off.
    """

    epochs: int = 5
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    bias_lr_scale: float = 1.0
    decay_biases: bool = False
    schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    lr_start_factor: float = 0.0
    lr_end_factor: float = 0.0
    nesterov: bool = False
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    lookahead_every: int = 0
    lookahead_decay: float = 0.95
    freeze_data_init_epochs: int = 0
    autocast: str = "none"
    channels_last: bool = False
    checkpoint_every: int = 1
    keep_epochs: list = field(default_factory=list)
    select_epochs: int = 0

    def validate(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        for key in ("lr", "momentum", "weight_decay", "gamma", "label_smoothing", "bias_lr_scale"):
            v = getattr(self, key)
            _check(_finite(v), f"{key} must be a finite number, got {v!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.bias_lr_scale > 0, f"bias_lr_scale must be > 0 (1 = the weights' learning rate), got "
               f"{self.bias_lr_scale}")
        _check(self.gamma > 0, f"gamma must be > 0, got {self.gamma}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES.names()}, got {self.schedule!r}")
        _check(_finite(self.warmup_epochs) and 0.0 <= self.warmup_epochs <= self.epochs,
               f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs!r}")
        _check(_finite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0,
               f"ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay!r}")
        for key in ("lr_start_factor", "lr_end_factor"):
            v = getattr(self, key)
            _check(_finite(v) and 0.0 <= v <= 1.0, f"{key} must be in [0, 1] (a multiplier of lr), got {v!r}")
        _check(isinstance(self.lookahead_every, int) and self.lookahead_every >= 0,
               f"lookahead_every must be an int >= 0 (0 = no Lookahead), got {self.lookahead_every!r}")
        _check(not (self.lookahead_every and self.ema_decay),
               f"choose one weight average: ema_decay={self.ema_decay} and lookahead_every={self.lookahead_every} "
               "are both set; set one of them to 0")
        _check(_finite(self.lookahead_decay) and 0.0 < self.lookahead_decay <= 1.0,
               f"lookahead_decay must be in (0, 1], got {self.lookahead_decay!r}")
        _check(isinstance(self.freeze_data_init_epochs, int) and self.freeze_data_init_epochs >= 0,
               f"freeze_data_init_epochs must be an int >= 0 (0 = never freeze), got "
               f"{self.freeze_data_init_epochs!r}")
        _check(self.autocast in ("none", "bf16"), f"autocast must be 'none' or 'bf16', got {self.autocast!r}")
        _check(self.step_epochs >= 1, f"step_epochs must be >= 1, got {self.step_epochs}")
        _check(len(self.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas),
               f"betas must be two numbers in [0, 1) (Adam's (beta1, beta2), e.g. [0.9, 0.999]), got {self.betas!r}")
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(all(isinstance(k, int) and 1 <= k <= self.epochs for k in self.keep_epochs),
               f"keep_epochs must list epochs in 1..epochs ({self.epochs}), got {self.keep_epochs!r}")
        _check(self.select_epochs >= 0, f"select_epochs must be >= 0 (0 = no teacher selection), got "
               f"{self.select_epochs}")

log = logging.getLogger("bsnn")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 bias_lr_scale: float = 1.0, decay_biases: bool = False) -> list[dict]:
    """Two groups: conv/linear weights (tensors with ndim > 1, and the parameters a module names in its
    ``weight_like_parameters``: airbench's whitening bias) with ``weight_decay``; BN, biases and scales with
    ``lr * bias_lr_scale`` when ``lr`` is given and no decay — or, with ``decay_biases``, the weights' decay per step
    (``weight_decay / bias_lr_scale``). Parameters a distiller steps with its own optimiser
    (``separately_optimized()``: MetaDistil's teacher) are left out."""
    own = {id(p) for p in getattr(model, "separately_optimized", lambda: [])()}
    weight_like = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "weight_like_parameters", ())}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in own:
            (decay if p.ndim > 1 or id(p) in weight_like else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": weight_decay / bias_lr_scale if decay_biases else 0.0}]
    if lr is not None and bias_lr_scale != 1.0:
        groups[1]["lr"] = lr * bias_lr_scale
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or Adam over :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.bias_lr_scale, cfg.decay_biases)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class Schedule:
    """A learning-rate schedule: ``build(opt, cfg, steps_per_epoch)`` and whether it is stepped every batch."""

    def __init__(self, build: Callable, per_step: bool) -> None:
        self.build, self.per_step = build, per_step


#: Registered learning-rate schedules (``train.schedule``).
SCHEDULES: Registry[Schedule] = Registry("lr schedule (train.schedule)")
SCHEDULES.register("cosine")(Schedule(
    lambda opt, cfg, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs), per_step=False))
SCHEDULES.register("step")(Schedule(
    lambda opt, cfg, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs, gamma=cfg.gamma),
    per_step=False))
SCHEDULES.register("constant")(Schedule(
    lambda opt, cfg, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=10**9, gamma=1.0), per_step=False))


def onecycle_factor(step: int, total: int, warmup: int, start: float = 0.0, end: float = 0.0) -> float:
    """The ``onecycle`` multiplier of ``lr`` after ``step`` batches of ``total``: linear from ``start`` to 1 over
    ``warmup`` steps (``start + (1 - start)(step + 1) / warmup``), then linear from 1 to ``end`` at ``total``."""
    if warmup and step < warmup:
        return start + (1.0 - start) * (step + 1) / warmup
    return end + (1.0 - end) * max(0.0, (total - step) / max(1, total - warmup))


SCHEDULES.register("onecycle")(Schedule(
    lambda opt, cfg, steps: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: onecycle_factor(i, cfg.epochs * steps, round(cfg.warmup_epochs * steps), cfg.lr_start_factor,
                                       cfg.lr_end_factor)), per_step=True))


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA decay after ``updates`` averaging steps: ``min(decay, (1 + n) / (10 + n))``, so the random
    initialisation leaves the average within the first few hundred steps instead of lingering as ``decay^n``
    (with decay 0.999 it would still weigh 12 % after 2,000 steps)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_average(decay: float) -> Callable:
    """``AveragedModel``'s ``avg_fn`` for an EMA with the warm-up of :func:`ema_decay_at`."""
    def avg(averaged: torch.Tensor, current: torch.Tensor, updates) -> torch.Tensor:
        d = ema_decay_at(decay, int(updates))
        return averaged * d + current * (1.0 - d)

    return avg


class Lookahead:
    """Lookahead weights (Zhang et al. 2019) on airbench's schedule (Jordan 2024): a slow copy of the model's
    floating-point state (weights and BN statistics); every ``every`` steps it moves toward the trained (fast) state,
    ``slow <- slow + (1 - a)(fast - slow)``, and the fast state restarts from it, with ``a = decay^every (step /
    total)^3`` (no averaging early, ``a -> decay^every`` at the end). :meth:`finish` leaves the slow state in the
    model.

    Args:
        model: the network (its ``state_dict`` is averaged in place).
        decay: per-step decay base (airbench: 0.95).
        every: steps between synchronisations (airbench: 5).
    """

    def __init__(self, model: nn.Module, decay: float = 0.95, every: int = 5) -> None:
        self.model, self.decay, self.every = model, float(decay), int(every)
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def alpha(self, step: int, total: int) -> float:
        """The slow state's weight at ``step`` of ``total`` (``decay^every (step / total)^3``)."""
        return self.decay ** self.every * (step / max(1, total)) ** 3

    @torch.no_grad()
    def _sync(self, alpha: float) -> None:
        state = self.model.state_dict()
        for k, slow in self.slow.items():
            slow.lerp_(state[k].to(slow.dtype), 1.0 - alpha)
            state[k].copy_(slow)

    def step(self, step: int, total: int) -> None:
        """After optimiser step ``step`` (from 1) of ``total``: synchronise when ``step`` is a multiple of
        ``every``."""
        if step % self.every == 0:
            self._sync(self.alpha(step, total))

    def finish(self) -> None:
        """Leave the slow state in the model (the trained result)."""
        self._sync(1.0)

    def state_dict(self) -> dict:
        return dict(self.slow)

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.slow):
            raise KeyError(f"Lookahead state holds {sorted(set(state) ^ set(self.slow))[:3]}... not in the model")
        for k, v in state.items():
            self.slow[k].copy_(v)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``cfg.schedule`` scheduler (per-step schedules need ``steps_per_epoch``)."""
    return SCHEDULES.get(cfg.schedule).build(opt, cfg, steps_per_epoch)


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding NaN or infinite values."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _check_labels_fit(y: torch.Tensor, z: torch.Tensor, at: str) -> None:
    """Labels ``y [B]`` must index the ``z.shape[1]`` outputs of ``z [B, K]``."""
    if z.dim() != 2 or z.shape[0] != y.shape[0]:
        raise ConfigError(f"{at}: the model returned {tuple(z.shape)}, expected logits [B, K] for {y.shape[0]} inputs")
    if y.numel() and int(y.max()) >= z.shape[1]:
        raise DataError(f"{at}: label {int(y.max())} is out of range for a model with {z.shape[1]} outputs "
                        f"(classes 0..{z.shape[1] - 1}); check the labels or build the model with more classes")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    Returns:
        ``{"accuracy": float, "loss": float, "samples": int}``.

    Raises:
        ConfigError: the loader yields no samples or malformed batches.
        DataError: NaN/inf inputs, labels the model has no output for.
        TrainingError: the model's outputs are NaN/inf (its non-finite parameters are named when that is why).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    try:
        for step, batch in enumerate(loader):
            x, y, _ = unpack_batch(batch, "evaluate", step)
            x, y = x.to(device), y.to(device)
            z = model(x)
            _check_labels_fit(y, z, f"evaluate: batch {step + 1}")
            loss_sum += F.cross_entropy(z, y, reduction="sum").item()
            correct += (z.argmax(1) == y).sum().item()
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("evaluate: the loader yielded no samples; evaluate on a non-empty split")
    if not math.isfinite(loss_sum):
        bad = non_finite_tensors(model)
        cause = (f"parameter(s) {', '.join(bad[:5])} hold NaN/inf values; retrain the model or load an earlier "
                 "checkpoint") if bad else "its outputs overflow (NaN/inf logits); check the model's weights"
        raise TrainingError(f"evaluate: the model's loss is not finite: {cause}")
    return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n, "samples": n}


@torch.no_grad()
def fidelity(student: nn.Module, teacher: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """How closely ``student`` follows ``teacher`` ("Does knowledge distillation really work?", Stanton et al.
    2021): top-1 agreement (%) and the mean predictive ``KL(p_teacher ‖ p_student)`` (nats, T = 1) over
    ``loader``.

    Returns:
        ``{"agreement": float, "kl": float, "samples": int}``.
    """
    device = torch.device(device)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    agree, kl, n = 0, 0.0, 0
    try:
        for step, batch in enumerate(loader):
            x, _, _ = unpack_batch(batch, "fidelity", step)
            x = x.to(device)
            z_s, z_t = student(x), teacher(x)
            agree += (z_s.argmax(1) == z_t.argmax(1)).sum().item()
            log_t, log_s = F.log_softmax(z_t, 1), F.log_softmax(z_s, 1)
            kl += (log_t.exp() * (log_t - log_s)).sum().item()
            n += x.shape[0]
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if n == 0:
        raise ConfigError("fidelity: the loader yielded no samples")
    return {"agreement": 100.0 * agree / n, "kl": kl / n, "samples": n}


class _Supervised(nn.Module):
    """Plain supervised objective for the teacher: CE with optional label smoothing."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.student = model
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z = self.student(x)
        ce = F.cross_entropy(z, y, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce.detach(), "logits": z}


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and current_env().is_main


def fit(
    objective: nn.Module,
    model: nn.Module,
    train_loader,
    cfg: TrainConfig,
    *,
    val_loader=None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Optimise ``objective`` (which owns ``model``) for ``cfg.epochs`` epochs.

    Args:
        objective: module returning ``{'loss', 'logits', ...}`` from ``(x, y, index)``.
        model: the network being trained (evaluated on ``val_loader``; its binary layers are clamped).
        train_loader: yields ``(x [B, C, H, W], y [B])`` or ``(x, y, index)``.
        cfg: optimisation settings.
        val_loader: optional validation loader evaluated after every epoch.
        checkpoint_path: resumable checkpoint written atomically (rank 0) every ``cfg.checkpoint_every`` epochs.
        resume: continue from ``checkpoint_path`` if it exists.
        device: where to train.
        quiet: no progress bar.
        desc: label for the progress bar and log lines.
        on_epoch_end: called as ``fn(epoch, metrics)`` after the epoch's checkpoint is written.

    Returns:
        Per-epoch metrics (``epoch, lr, train_loss, train_acc, val_acc, val_loss, time_s``).
    """
    cfg.validate()
    device = torch.device(device)
    env = current_env()
    objective.to(device)
    if cfg.channels_last:
        objective.to(memory_format=torch.channels_last)
    opt = build_optimizer(objective, cfg)
    per_step = SCHEDULES.get(cfg.schedule).per_step
    sched = build_scheduler(opt, cfg, len(train_loader) if per_step else 1)
    ema = AveragedModel(model, avg_fn=ema_average(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None
    lookahead = Lookahead(model, cfg.lookahead_decay, cfg.lookahead_every) if cfg.lookahead_every else None
    try:
        batches = len(train_loader)
    except TypeError:  # an iterable without a length: phases switch at epoch boundaries only
        batches = 0
    if lookahead is not None and not batches:
        raise ConfigError(f"{desc}: lookahead_every needs a training loader with a length (its schedule runs over "
                          "the total number of steps); use a DataLoader or set lookahead_every=0")
    history: list[dict] = []
    start_epoch = 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        ck = load_checkpoint(checkpoint_path, map_location=device)
        try:
            objective.load_state_dict(ck["objective"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if ema is not None:
                ema.load_state_dict(ck["ema"])
            if lookahead is not None:
                lookahead.load_state_dict(ck["lookahead"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"cannot resume from {str(checkpoint_path)!r}: it does not match this model/optimiser ({e}); "
                "delete it or start a new run folder"
            ) from None
        torch.set_rng_state(ck["rng"])
        history, start_epoch = list(ck["history"]), int(ck["epoch"])
        log.info("%s: resumed from %s at epoch %d", desc, checkpoint_path, start_epoch)
    runner: nn.Module = objective
    if env.distributed:
        # Phased methods (AB/FSP/FT's initialisation, MetaDistil's frozen-teacher epochs, SwitOKD's expert mode)
        # leave some parameters without a gradient on some steps: DDP must look for them.
        runner = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=True)

    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, initial=start_epoch, total=cfg.epochs,
               disable=not _show_progress(quiet), unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(getattr(train_loader, "dataset", None), "set_epoch"):
            train_loader.dataset.set_epoch(epoch)  # an epoch-dependent augmentation (airbench's alternating flip)
        if hasattr(objective, "set_epoch"):
            objective.set_epoch(epoch)  # e.g. DKD's warm-up
        if cfg.freeze_data_init_epochs:
            _train_data_init_(model, epoch < cfg.freeze_data_init_epochs)
        runner.train()
        loss_sum, correct, n = 0.0, 0, 0
        for step, batch in enumerate(train_loader):
            if batches and hasattr(objective, "set_progress"):
                objective.set_progress(epoch + step / batches)  # phases scaled to fractions of an epoch
            x, y, index = unpack_batch(batch, desc, step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            index = index.to(device) if index is not None else None
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
                    out = runner(x, y, index)
            except IndexError as e:  # cross-entropy on a label the model has no output for
                if "out of bounds" not in str(e):
                    raise
                raise DataError(f"{desc}: epoch {epoch + 1}, batch {step + 1}: label {int(y.max())} is out of range "
                                f"for the model's outputs ({str(e).splitlines()[0]}); check the labels or build the "
                                "model with more classes") from None
            _check_labels_fit(y, out["logits"], f"{desc}: epoch {epoch + 1}, batch {step + 1}")
            loss = out["loss"].float()
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; "
                                    f"lower the lr (now {cfg.lr:g}) or check the inputs for NaN/inf values")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(objective, "after_step"):
                objective.after_step()  # a distiller's own optimiser (MetaDistil's teacher)
            clamp_latent_(objective)  # the student and any trained peers
            if per_step:
                sched.step()
            if ema is not None:
                ema.update_parameters(model)
            if lookahead is not None:
                lookahead.step(epoch * batches + step + 1, cfg.epochs * batches)
            loss_sum += loss.item() * y.numel()
            correct += (out["logits"].detach().argmax(1) == y).sum().item()
            n += y.numel()
        if not per_step:
            sched.step()
        loss_sum, correct, n = all_reduce_sum([loss_sum, float(correct), float(n)], device)
        if n == 0:
            raise ConfigError(f"{desc}: the training loader yielded no batch in epoch {epoch + 1}; train on a "
                              "non-empty dataset (check data.limit_train and the batch size)")
        metrics = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(n, 1),
                   "train_acc": 100.0 * correct / max(n, 1)}
        if val_loader is not None:
            ev = evaluate(ema.module if ema is not None else model, val_loader, device)
            metrics.update(val_acc=ev["accuracy"], val_loss=ev["loss"])
        metrics["time_s"] = time.perf_counter() - t0
        history.append(metrics)
        bar.set_postfix({k: round(v, 3) for k, v in metrics.items() if k in ("train_loss", "train_acc", "val_acc")})
        log.info("%s epoch %d/%d %s", desc, epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        last = epoch + 1 == cfg.epochs
        if checkpoint_path is not None and env.is_main and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            save_checkpoint({"epoch": epoch + 1, "objective": objective.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                             "history": history, **({"ema": ema.state_dict()} if ema is not None else {}),
                             **({"lookahead": lookahead.state_dict()} if lookahead is not None else {})},
                            checkpoint_path)
        barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    if ema is not None:  # the averaged weights are the trained model
        with torch.no_grad():
            model.load_state_dict(ema.module.state_dict())
    if lookahead is not None:
        lookahead.finish()
    if cfg.channels_last:
        objective.to(memory_format=torch.contiguous_format)
    return history


def _train_data_init_(model: nn.Module, trainable: bool) -> None:
    """Let the parameters of ``model``'s data-initialised modules that are not frozen for good
    (``frozen_parameters``) learn, or not."""
    for m in data_init_modules(model):
        frozen = set(getattr(m, "frozen_parameters", ()))
        for name, p in m.named_parameters(recurse=False):
            if name not in frozen:
                p.requires_grad_(trainable)


#: Training images given to data-dependent initialisations (:func:`bsnn.models.data_init_`; airbench uses 5,000).
DATA_INIT_SAMPLES = 5000


def data_init_from_loader(model: nn.Module, train_loader, n: int = DATA_INIT_SAMPLES) -> bool:
    """Data-dependent initialisation of ``model`` (:func:`bsnn.models.data_init_`, e.g. a whitening stem) from the
    first ``n`` items of the loader's dataset (bsnn's in-memory datasets without their augmentation, as airbench
    does) — the same images on every rank, the RNG left as it was. A model without such layers is not touched (and
    no data is read). Returns whether any layer was initialised."""
    if not data_init_modules(model):
        return False
    dataset = getattr(train_loader, "dataset", None)
    if isinstance(dataset, ArrayDataset):
        dataset = dataset.subset(range(min(n, len(dataset))), augment="none")
    with torch.random.fork_rng(devices=[]):
        if dataset is not None:
            images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
        else:
            batches, seen = [], 0
            for batch in train_loader:
                batches.append(unpack_batch(batch, "data initialisation", 0)[0])
                seen += len(batches[-1])
                if seen >= n:
                    break
            images = torch.cat(batches)[:n]
    param = next(model.parameters())
    return data_init_(model, images.to(param.device))


def train_teacher(model: nn.Module, train_loader, cfg: TrainConfig | None = None, **kwargs) -> list[dict]:
    """Train a full-precision model with cross-entropy (after :func:`data_init_from_loader`). Keyword arguments as
    :func:`fit`."""
    cfg = cfg or TrainConfig()
    data_init_from_loader(model, train_loader)
    return fit(_Supervised(model, cfg.label_smoothing), model, train_loader, cfg, desc=kwargs.pop("desc", "teacher"),
               **kwargs)


def train_student(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader,
    distill: DistillConfig | None = None,
    cfg: TrainConfig | None = None,
    data_init: bool = True,
    **kwargs,
) -> list[dict]:
    """Train ``student`` by the registered distillation method ``distill.method`` from a frozen ``teacher``.

    The teacher is put in eval mode, its parameters frozen and moved to the training device. ``data_init``: give
    the student its data-dependent initialisation first (:func:`data_init_from_loader`; False for a student that
    starts from trained weights). Keyword arguments as :func:`fit`.
    """
    distill = distill or DistillConfig()
    distill.validate()
    cfg = cfg or TrainConfig()
    device = torch.device(kwargs.get("device", "cpu"))
    for t in teacher_list(teacher):
        t.to(device)
    dataset = getattr(train_loader, "dataset", None)
    if METHODS.get(distill.method).needs_index:
        if dataset is None:
            raise ConfigError(f"distill.method={distill.method!r} needs each sample's index: give train_student a "
                              "torch DataLoader over a map-style dataset (it reads loader.dataset)")
        train_loader = _with_index(train_loader)
        dataset = train_loader.dataset
    if data_init:
        data_init_from_loader(student, train_loader)
    if METHODS.get(distill.method).trains_teacher:  # a fresh teacher trained online starts like a trained one would
        for t in teacher_list(teacher):
            data_init_from_loader(t, train_loader)
    with torch.random.fork_rng(devices=[]):  # probing the data must not move the RNG (determinism)
        example = _example_input(train_loader, dataset)
    objective = build_distiller(student, teacher, distill, example_input=example.to(device),
                                n_data=len(dataset) if dataset is not None else None, epochs=cfg.epochs)
    return fit(objective, student, train_loader, cfg, desc=kwargs.pop("desc", f"student[{distill.method}]"), **kwargs)


def _first_batch(loader):
    """The first batch of ``loader`` (any iterable of ``(x, y, ...)`` batches), checked by :func:`unpack_batch`."""
    for batch in loader:
        unpack_batch(batch, "train_student", 0)
        return batch
    raise ConfigError("train_student: the training loader yielded no batch; check the dataset and batch size")


def _example_input(loader, dataset) -> torch.Tensor:
    """One input ``[1, C, H, W]``: the dataset's first item, else the loader's first batch."""
    if dataset is None:
        return _first_batch(loader)[0][:1]
    try:
        n = len(dataset)
    except TypeError:
        n = None
    if n == 0:
        raise ConfigError("train_student: the training dataset is empty; train on a non-empty dataset")
    try:
        item = dataset[0]
    except (IndexError, KeyError, TypeError, NotImplementedError):
        return _first_batch(loader)[0][:1]  # e.g. an iterable-style dataset
    x = item[0] if isinstance(item, (tuple, list)) and item else None
    if not isinstance(x, torch.Tensor):
        got = f"a dict with keys {sorted(map(str, item))}" if isinstance(item, dict) else f"a {type(item).__name__}"
        raise ConfigError(f"train_student: dataset items must be (input tensor [C, H, W], label) pairs, got {got}")
    return x.unsqueeze(0)


def _with_index(loader: DataLoader) -> DataLoader:
    """The same loader (sampler, batch size, workers) over ``IndexedDataset``: batches ``(x, y, index)``."""
    return DataLoader(IndexedDataset(loader.dataset), batch_size=loader.batch_size, sampler=loader.sampler,
                      num_workers=loader.num_workers, drop_last=loader.drop_last)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Closed-form learning rate at the start of ``epoch`` (0-based) — documentation aid and test oracle."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (epoch // cfg.step_epochs)
    return cfg.lr
