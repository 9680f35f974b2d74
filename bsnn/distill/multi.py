"""Multi-model methods: takd (+ :func:`takd_chain`), ca_mkd, dml, bd_kd."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from bsnn.config import DistillConfig, TrainConfig
from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, register, teacher_list
from bsnn.distill.hooks import last_module_name
from bsnn.errors import ConfigError


@register("takd")
class TAKD(Distiller):
    """Teacher-assistant KD (Mirzadeh 2020), one step of the chain: vanilla KD from the last model given.

    ``teacher`` may be one model or the chain ``[teacher, assistant_1, ..., assistant_n]`` (already trained);
    the student learns from ``assistant_n`` by ``ce_weight·CE + kd_weight·T²·KL``. To train the whole chain
    teacher → assistants → student in order use :func:`takd_chain`. Published weights: as KD (0.1 / 0.9).
    """

    default_ce_weight = 0.1
    default_kd_weight = 0.9

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t, _ = self.teacher_forward(x, teacher=self.teachers[-1])
        z_s = self.student(x)
        kd = L.kd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), kd, kd=kd)


def takd_chain(teacher: nn.Module, assistants: Sequence[nn.Module], student: nn.Module, train_loader,
               distill: DistillConfig | None = None, cfg: TrainConfig | Sequence[TrainConfig] | None = None,
               *, checkpoint_path: str | Path | None = None, **fit_kwargs) -> list[list[dict]]:
    """Train teacher → assistant_1 → ... → assistant_n → student, each step by :func:`bsnn.train.train_student`.

    Every step distils the next model from the previous (trained, then frozen) one with ``distill``
    (vanilla KD when its method is ``"takd"`` or unset: TAKD's recipe). The teacher must already be trained.

    Args:
        teacher: trained full-precision teacher.
        assistants: intermediate models, largest first (each trained here, then frozen as the next teacher).
        student: the final student.
        train_loader: training loader for every step.
        distill: distillation config of every step (default: ``DistillConfig(method="kd")``).
        cfg: one :class:`TrainConfig` for all steps or one per step (``len(assistants) + 1``).
        checkpoint_path: if given, step ``i`` checkpoints to ``<stem>_step<i><suffix>`` (resumable per step).
        **fit_kwargs: passed to :func:`bsnn.train.train_student` (``val_loader``, ``device``, ``quiet``, ...).

    Returns:
        The per-epoch history of every step, in chain order.
    """
    from bsnn.train import train_student

    distill = distill or DistillConfig(method="kd")
    if distill.method == "takd":
        distill = dataclasses.replace(distill, method="kd", params={})
    models = [teacher, *assistants, student]
    steps = len(models) - 1
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg or TrainConfig()] * steps
    if len(cfgs) != steps:
        raise ConfigError(f"takd_chain: {steps} steps need {steps} train configs, got {len(cfgs)}")
    histories = []
    for i in range(steps):
        kwargs = dict(fit_kwargs)
        if checkpoint_path is not None:
            p = Path(checkpoint_path)
            kwargs["checkpoint_path"] = p.with_name(f"{p.stem}_step{i + 1}{p.suffix}")
        kwargs.setdefault("desc", f"takd[{i + 1}/{steps}]")
        histories.append(train_student(models[i + 1], models[i], train_loader, distill, cfgs[i], **kwargs))
    return histories


@register("ca_mkd")
class CAMKD(Distiller):
    """Confidence-aware multi-teacher KD (Zhang 2022), logit part.

    ``teacher`` is a list / ``nn.ModuleList`` of M teachers; per sample ``w_k = (1 − softmax_k(CE_k)) / (M − 1)``
    (confident teachers weigh more, Σ_k w_k = 1) and the term is ``mean_b Σ_k w_k · T²·KL(p_t^k ‖ p_s)``.
    The paper's intermediate-feature term is not included. Published weights: CE 1, KD 1.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_ts = [self.teacher_forward(x, teacher=t)[0] for t in self.teachers]
        z_s = self.student(x)
        w = L.ca_mkd_weights(z_ts, y)
        kls = torch.stack([L.kd_loss(z_s, z_t, self.temperature, reduction="none") for z_t in z_ts])
        kd = (w * kls).sum(dim=0).mean()
        return self.combine(z_s, self.ce(z_s, y), kd, kd=kd, teacher_weights=w.mean(dim=1))


def _reset_parameters_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(model, "reset_parameters"):
        model.reset_parameters()
    return model


def _peer_from_name(student: nn.Module, name: str, kwargs: dict | None) -> nn.Module:
    """A registered model ``name`` with the student's ``num_classes`` (last Linear) and ``in_channels``."""
    from bsnn.models import create_model

    fc = last_module_name(student, nn.Linear)
    if fc is None:
        raise ConfigError(f"cannot infer num_classes for the peer {name!r} (the student has no nn.Linear); "
                          "pass peer=<module> to build_distiller")
    extra = {"num_classes": dict(student.named_modules())[fc].out_features}
    first_conv = next((m for m in student.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        extra["in_channels"] = first_conv.in_channels
    return create_model(name, **{**extra, **dict(kwargs or {})})


@register("dml")
class DML(Distiller):
    """Deep mutual learning (Zhang 2018): the student and its peers train together, no teacher.

    Each network i minimises ``ce_weight·CE_i + kd_weight·mean_{j≠i} D(z_i, z_j.detach())`` with
    ``D = T²·KL(p_j ‖ p_i)``; the loss is the sum over networks, so one optimiser step updates all (peers are
    submodules: ``parameters()`` and ``state_dict()`` include them). ``logits`` are the student's.

    Peers, in order of preference: the ``peer`` keyword of :func:`build_distiller` (a module or a list),
    ``params['peer']`` (a registered model name, built with the student's ``num_classes`` / ``in_channels`` and
    ``params['peer_kwargs']``), else ``num_peers`` deep copies of the student with re-initialised parameters
    (``reinit``; identical copies would never diverge). Binary peers' latent weights are clamped before each
    training forward. A given teacher is ignored. Params: ``num_peers`` (1), ``peer`` (None), ``peer_kwargs``
    ({}), ``reinit`` (True). Published weights: CE 1, KL 1 (the paper uses T = 1).
    """

    needs_teacher = False
    param_defaults = {"num_peers": 1, "peer": None, "peer_kwargs": None, "reinit": True}

    def __init__(self, student, teacher, cfg, *, peer: nn.Module | Sequence[nn.Module] | None = None,
                 **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        peers = teacher_list(peer)
        if not peers and self.hparams["peer"] is not None:
            peers = [_peer_from_name(student, str(self.hparams["peer"]), self.hparams["peer_kwargs"])
                     for _ in range(int(self.hparams["num_peers"]))]
        if not peers:
            n = int(self.hparams["num_peers"])
            if n < 1:
                raise ConfigError(f"{self.method_name}: num_peers must be >= 1, got {n}")
            peers = [copy.deepcopy(student) for _ in range(n)]
            if self.hparams["reinit"]:
                for p in peers:
                    _reset_parameters_(p)
        device = next(iter(student.parameters()), torch.empty(0)).device
        for p in peers:
            p.train(student.training)
            for q in p.parameters():
                q.requires_grad_(True)
        self.peers = nn.ModuleList(peers).to(device)

    def divergence(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        """Distillation term of network i towards network j (``z_j`` detached)."""
        return L.kd_loss(z_i, z_j, self.temperature)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        if self.training:
            from bsnn.binary import clamp_latent_

            clamp_latent_(self.peers)
        zs = [self.student(x)] + [p(x) for p in self.peers]
        ces, kls = [], []
        for i, z_i in enumerate(zs):
            ces.append(self.ce(z_i, y))
            kls.append(sum(self.divergence(z_i, z_j.detach()) for j, z_j in enumerate(zs) if j != i) / (len(zs) - 1))
        loss = sum(self.ce_weight * c + self.kd_weight * k for c, k in zip(ces, kls))
        return {"loss": loss, "ce": ces[0].detach(), "kl": kls[0].detach(),
                "peer_ce": torch.stack(ces[1:]).mean().detach(), "peer_kl": torch.stack(kls[1:]).mean().detach(),
                "logits": zs[0]}


@register("bd_kd")
class BDKD(DML):
    """Online KD with balanced forward / reverse KL (after BD-KD, Amara 2022).

    As :class:`DML`, but each network's term is
    ``mean_b [w_fwd · T²·KL(p_j ‖ p_i) + w_rev · T²·KL(p_i ‖ p_j)]`` with sample-wise weights from the entropy gap
    (:func:`bsnn.distill.losses.balanced_kl_weights`: ``w_rev = H_i / (H_i + H_j)``). This is a simplified,
    symmetric reading of BD-KD's entropy-guided weighting, not a line-by-line port. Params as :class:`DML`.
    """

    def divergence(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        return L.balanced_kd_loss(z_i, z_j, self.temperature)
