"""Tandem fine-tuning: train a conversion-ready ANN through the spiking network it converts to (design-time latency).

A QCFS or clip network converts to IF neurons with threshold λ and initial membrane ``v_init·λ``; at a small T its
spike counts differ from the activations it was trained with (the conversion error the QCFS paper bounds only in
expectation). Tandem fine-tuning closes that gap at the target T directly, in the spirit of tandem learning (Wu,
Chua, Zhang, Yang, Li & Tan, "A tandem learning rule for effective training and rapid inference of deep spiking
neural networks", IEEE TNNLS 2021; "Progressive tandem learning", TPAMI 2021):

* **forward** = the converted SNN itself, time folded into the batch: the input is repeated ``T`` times (direct
  encoding: a constant current), every trained-threshold activation is replaced by ``T`` steps of the reference IF
  neuron (:func:`bsnn.snn.functional.if_multistep`: threshold λ, initial membrane ``v_init·λ``, reset by
  subtraction) whose output is ``λ·spike``, and the logits are averaged over the ``T`` steps — with BN in eval mode
  (it folds into the weights at conversion) the result equals ``bsnn.simulate`` of
  ``bsnn.convert(model, ..., ConvertConfig(snn_calibration="none"))`` at that T (tested);
* **backward** = the ANN's activation evaluated at the spike *rate*: every step's input gradient is the mean of the
  output gradients over the ``T`` steps times the clip derivative at the time-averaged input current ``z̄``
  (``1[0 < z̄ < λ]``), and λ's gradient is ``Σ g·1[z̄ ≥ λ]`` (the clip's) — the rate-coded straight-through rule of
  tandem learning, which back-propagates through the ANN activation at the spike count instead of through spikes.

Differences from the authors' rule (their code is not public): they interlace IF layers with ANN layers and feed the
next layer the spike *count* computed layer by layer, with ReLU (not clip) as the surrogate; here the whole network
runs as the converted SNN with trained thresholds λ, and a distillation target (the full-precision teacher) replaces
their cross-entropy by default. The ANN output itself is trained as well (``ann_weight``), so the network's
large-T limit stays accurate: conversion still converges to the fine-tuned ANN as T grows.

By default only the full-precision parameters learn (BN affine, biases, λ, the full-precision first and last
layers): ``binary_weights="frozen"``. Moving the latent weights of ±1 layers with Adam (``"latent"``) flips signs
indiscriminately — on the zoo's airbench QCFS student even 3 steps at lr 1e-4 flipped 0.2-0.5 % of them and cost
the ANN 10 points — so the sign-aware alternative is ``"bop"``: the ±1 signs are trained by Bop
(:mod:`bsnn.bop`, Helwegen et al. NeurIPS 2019), which flips a sign only where the averaged gradient pushes
against it by more than a threshold, and keeps α.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn.activations import is_trained_threshold
from bsnn.binary import is_binary
from bsnn.bop import Bop
from bsnn.distill.losses import kd_loss
from bsnn.errors import ConfigError
from bsnn.snn.functional import if_multistep
from bsnn.train import TrainConfig, fit


#: ``TandemConfig.binary_weights`` -> whether the ±1 layers' latent weights get Adam's gradient (``latent`` only;
#: ``bop`` trains their signs through :class:`bsnn.bop.Bop` instead)
BINARY_WEIGHT_MODES = {"frozen": False, "latent": True, "bop": False}


@dataclass
class TandemConfig:
    """Tandem fine-tuning settings (the ``tandem`` section of a run's config).

    Attributes:
        enabled: ``bsnn run`` fine-tunes the distilled student this way before converting it (a stage of its own,
            ``student_tandem.pt``); the Python function :func:`tandem_finetune` ignores it.
        timesteps: the T the SNN forward runs for during fine-tuning (the target latency).
        v_init: initial membrane potential as a fraction of λ; must equal the conversion's ``ConvertConfig.v_init``
            (0.5, the θ/2 shift, is QCFS's own) for the trained forward to be the converted SNN.
        temperature: KD temperature when a teacher is given (Hinton et al.'s ``T²·KL``).
        ann_weight: weight of the same loss on the ANN's own output (keeps the large-T limit accurate); 0 = SNN only.
        binary_weights: how the ±1 layers learn (module docstring): ``frozen`` (not at all), ``latent`` (their
            latent weights by Adam with the rest, through the STE) or ``bop`` (their signs by Bop).
        bop_gamma: Bop's adaptivity rate γ (``binary_weights: bop``; the authors' default 1e-4 is for training
            from scratch over many epochs; 0.05 averages over ~20 steps of a short fine-tuning).
        bop_threshold: Bop's flip threshold τ on the averaged gradient ``dL/db`` (authors: 1e-8). On the zoo's
            QCFS student 1e-3 flips a handful of signs in 30 steps and 3e-4 thousands, costing the ANN 5 points
            (``benchmarks/results/tandem_bop_probe_*``): the default is the safe end.
        epochs: fine-tuning epochs.
        lr: Adam's peak learning rate (one-cycle: linear warm-up, then linear decay to 0); 3e-4 came closer to the
            ANN at T = 4 on validation than 1e-3 on the zoo's QCFS student (1.8 vs 2.6 points below it,
            ``benchmarks/results/tandem_finetune_*``).
        warmup_epochs: the one-cycle warm-up, in epochs.
    """

    enabled: bool = False
    timesteps: int = 4
    v_init: float = 0.5
    temperature: float = 4.0
    ann_weight: float = 1.0
    binary_weights: str = "frozen"
    bop_gamma: float = 0.05
    bop_threshold: float = 1e-3
    epochs: int = 1
    lr: float = 3e-4
    warmup_epochs: float = 0.1

    def validate(self) -> None:
        if int(self.timesteps) < 1:
            raise ConfigError(f"tandem.timesteps must be >= 1, got {self.timesteps}")
        if not 0.0 <= float(self.v_init) < 1.0:
            raise ConfigError(f"tandem.v_init is a fraction of the threshold in [0, 1), got {self.v_init}")
        if float(self.temperature) <= 0:
            raise ConfigError(f"tandem.temperature must be > 0, got {self.temperature}")
        if float(self.ann_weight) < 0:
            raise ConfigError(f"tandem.ann_weight must be >= 0, got {self.ann_weight}")
        if self.binary_weights not in BINARY_WEIGHT_MODES:
            raise ConfigError(f"tandem.binary_weights must be one of {sorted(BINARY_WEIGHT_MODES)}, got "
                              f"{self.binary_weights!r}")
        if not 0.0 < float(self.bop_gamma) <= 1.0 or not float(self.bop_threshold) >= 0.0:
            raise ConfigError(f"tandem.bop_gamma must be in (0, 1] and tandem.bop_threshold >= 0, got "
                              f"{self.bop_gamma} and {self.bop_threshold}")
        try:
            self.train_config().validate()
        except ConfigError as e:
            raise ConfigError(f"tandem.{e}") from None

    def train_config(self) -> TrainConfig:
        """The optimisation handed to :func:`bsnn.train.fit`: Adam, one-cycle, no weight decay."""
        return TrainConfig(epochs=int(self.epochs), optimizer="adam", lr=float(self.lr), schedule="onecycle",
                           warmup_epochs=float(self.warmup_epochs))


class _RateIF(torch.autograd.Function):
    """IF neurons over ``T`` steps (exact forward) with the clip-at-the-rate backward of the module docstring."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, clip: torch.Tensor, timesteps: int,  # type: ignore[override]
                v_init: float) -> torch.Tensor:
        theta = clip.detach().to(z.dtype)
        z_seq = z.reshape(timesteps, -1, *z.shape[1:])
        spikes, _ = if_multistep(z_seq, theta, v_init * theta)
        z_mean = z_seq.mean(0)
        ctx.save_for_backward(z_mean, theta)
        ctx.timesteps, ctx.clip_shape, ctx.clip_dtype = timesteps, clip.shape, clip.dtype
        return (spikes * theta).reshape(z.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        z_mean, theta = ctx.saved_tensors
        g_seq = g.reshape(ctx.timesteps, -1, *g.shape[1:])
        grad_z = grad_clip = None
        if ctx.needs_input_grad[0]:
            inside = ((z_mean > 0) & (z_mean < theta)).to(g.dtype)
            grad_z = (g_seq.mean(0) * inside).expand_as(g_seq).reshape(g.shape)
        if ctx.needs_input_grad[1]:
            saturated = (z_mean >= theta).to(g.dtype)
            grad_clip = (g_seq.sum(0) * saturated).sum(dtype=torch.float32).to(ctx.clip_dtype).reshape(ctx.clip_shape)
        return grad_z, grad_clip, None, None


def rate_if(z: torch.Tensor, clip: torch.Tensor, timesteps: int, v_init: float = 0.5) -> torch.Tensor:
    """``T`` IF steps on a time-folded current.

    Args:
        z: input current ``[T·B, ...]`` (time-major: rows ``t·B .. t·B + B - 1`` are step ``t``).
        clip: threshold λ (scalar tensor, trainable).
        timesteps: ``T``.
        v_init: initial membrane as a fraction of λ.

    Returns:
        ``λ·spikes`` ``[T·B, ...]``, differentiable by the rate rule of the module docstring.
    """
    return _RateIF.apply(z, clip, int(timesteps), float(v_init))


class _SpikingActivation(nn.Module):
    """Stands in for a QCFS / clip activation during a tandem forward; shares its λ parameter."""

    def __init__(self, original: nn.Module, timesteps: int, v_init: float) -> None:
        super().__init__()
        self.original, self.timesteps, self.v_init = original, timesteps, v_init

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return rate_if(z, self.original.clip, self.timesteps, self.v_init)


def trained_threshold_activations(model: nn.Module) -> dict[str, nn.Module]:
    """The QCFS / clip activations of ``model`` by qualified name (the layers tandem fine-tuning makes spike)."""
    return {name: m for name, m in model.named_modules() if is_trained_threshold(m)}


def check_tandem_ready(model: nn.Module) -> None:
    """Raise :class:`~bsnn.errors.ConfigError` when ``model`` cannot run as its SNN in a tandem forward."""
    if not trained_threshold_activations(model):
        raise ConfigError("tandem fine-tuning needs trained-threshold activations (QCFS or clip) whose λ becomes "
                          "the IF threshold; train the student with model.activation=qcfs (or clip), or call "
                          "bsnn.activations.replace_activations_(model, 'qcfs') and fine-tune it first")
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    if relus:
        raise ConfigError(f"tandem fine-tuning: {relus[:3]} are plain ReLUs, which have no trained threshold; "
                          "replace them by QCFS / clip activations (bsnn.activations.replace_activations_)")
    pools = [n for n, m in model.named_modules() if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d))]
    if pools:
        raise ConfigError(f"tandem fine-tuning: {pools[:3]} are max-pooling layers, whose spiking form is not the "
                          "time-folded ANN op; use average pooling (bsnn.convert.maxpool.average_pool_like builds the "
                          "replacement of a max-pool)")


@contextmanager
def spiking_forward(model: nn.Module, timesteps: int, v_init: float = 0.5) -> Iterator[nn.Module]:
    """Within the block, ``model``'s QCFS / clip activations are :func:`rate_if` neurons (restored on exit).

    Feed the model a time-folded input ``[T·B, ...]``; :func:`tandem_logits` does that for you."""
    check_tandem_ready(model)
    swapped = []
    try:
        for name, m in trained_threshold_activations(model).items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, _SpikingActivation(m, timesteps, v_init))
            swapped.append((owner, child, m))
        yield model
    finally:
        for owner, child, m in swapped:
            setattr(owner, child, m)


def tandem_logits(model: nn.Module, x: torch.Tensor, timesteps: int, v_init: float = 0.5) -> torch.Tensor:
    """The converted SNN's time-averaged logits after ``timesteps`` steps of direct input.

    Args:
        model: a QCFS / clip network (BN in eval mode for the forward to be the converted SNN).
        x: input ``[B, ...]``.
        timesteps: ``T``.
        v_init: initial membrane as a fraction of λ.

    Returns:
        ``[B, K]``: ``mean_t`` of the SNN's output at steps ``1..T`` (differentiable).
    """
    folded = x.unsqueeze(0).expand(timesteps, *x.shape).reshape(timesteps * x.shape[0], *x.shape[1:])
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        folded = folded.contiguous(memory_format=torch.channels_last)
    with spiking_forward(model, timesteps, v_init):
        out = model(folded)
    return out.reshape(timesteps, x.shape[0], *out.shape[1:]).mean(0)


class TandemObjective(nn.Module):
    """The training objective of :func:`tandem_finetune` (a :func:`bsnn.train.fit` objective).

    ``loss = L(snn_logits) + ann_weight · L(ann_logits)`` with ``L`` = KD against ``teacher`` (``T²·KL`` at
    ``temperature``) or cross-entropy on the labels when there is no teacher. The student and the teacher stay in
    eval mode whatever ``train()`` asks (BN folds into the SNN's weights: its statistics must not move)."""

    def __init__(self, model: nn.Module, cfg: TandemConfig, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
        #: the sign optimiser of ``binary_weights: bop`` (its averages are part of this objective's state)
        self.bop = Bop(model, cfg.bop_gamma, cfg.bop_threshold) if cfg.binary_weights == "bop" else None

    def after_step(self) -> None:
        """After the optimiser's step (:func:`bsnn.train.fit`): Bop's sign update, when configured."""
        if self.bop is not None:
            self.bop.step()

    def train(self, mode: bool = True) -> "TandemObjective":
        super().train(mode)
        self.model.eval()
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _loss(self, z: torch.Tensor, y: torch.Tensor, z_t: torch.Tensor | None) -> torch.Tensor:
        if z_t is None:
            return F.cross_entropy(z, y)
        return kd_loss(z.float(), z_t.float(), self.cfg.temperature)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = None
        if self.teacher is not None:
            with torch.no_grad():
                z_t = self.teacher(x)
        z_snn = tandem_logits(self.model, x, self.cfg.timesteps, self.cfg.v_init)
        snn_loss = self._loss(z_snn, y, z_t)
        out = {"logits": z_snn, "snn_loss": snn_loss.detach()}
        loss = snn_loss
        if self.cfg.ann_weight > 0:
            ann_loss = self._loss(self.model(x), y, z_t)
            loss = loss + self.cfg.ann_weight * ann_loss
            out["ann_loss"] = ann_loss.detach()
        out["loss"] = loss
        return out


def _freeze_binary(model: nn.Module) -> list[nn.Parameter]:
    frozen = []
    for m in model.modules():
        if is_binary(m) and m.weight.requires_grad:
            m.weight.requires_grad_(False)
            frozen.append(m.weight)
    return frozen


def tandem_finetune(model: nn.Module, train_loader, cfg: TandemConfig | None = None, *,
                    teacher: nn.Module | None = None, val_loader=None, device: torch.device | str = "cpu",
                    quiet: bool = False, checkpoint_path=None, resume: bool = False) -> list[dict]:
    """Fine-tune a QCFS / clip network (in place) through its converted SNN at ``cfg.timesteps``.

    Args:
        model: trained QCFS / clip network (binary or not); average pooling only.
        train_loader: yields ``(x [B, ...], y [B])`` (augmented training data).
        cfg: :class:`TandemConfig` (default: T = 4, one epoch of Adam at lr 3e-4, one-cycle; ``enabled`` is not
            read here).
        teacher: full-precision teacher for KD (``None``: cross-entropy on the labels); frozen here
            (``requires_grad`` off).
        val_loader: evaluated after each epoch (the ANN's accuracy; a QCFS network's SNN converges to the clip
            network of the same λ, not to it).
        device: where to train.
        quiet: no progress bar.
        checkpoint_path, resume: as :func:`bsnn.train.fit`.

    Returns:
        :func:`bsnn.train.fit`'s per-epoch metrics (``train_acc`` is the SNN's at ``cfg.timesteps``).
    """
    cfg = cfg or TandemConfig()
    cfg.validate()
    check_tandem_ready(model)
    frozen = [] if BINARY_WEIGHT_MODES[cfg.binary_weights] else _freeze_binary(model)
    try:
        objective = TandemObjective(model, cfg, teacher)
        with objective.bop.recording() if objective.bop is not None else nullcontext():
            return fit(objective, model, train_loader, cfg.train_config(), val_loader=val_loader, device=device,
                       quiet=quiet, desc=f"tandem T={cfg.timesteps}", checkpoint_path=checkpoint_path,
                       resume=resume)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
