"""Registered distillation methods.

A method is an ``nn.Module`` built as ``cls(student, teacher, cfg)`` whose ``forward(x, y, index=None)``
returns ``{'loss': scalar, 'logits': student logits [B, K], <named parts>...}``. The teacher is always in
eval mode and run under ``torch.no_grad()``; only the student (and any method-owned parameters) get
gradients. Feature-based methods read features through forward hooks, never by changing model signatures.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn._registry import Registry
from bsnn.config import DistillConfig
from bsnn.distill.losses import kd_loss

METHODS: Registry[type] = Registry("distillation method")


class Distiller(nn.Module):
    """Base class: holds the student, a frozen teacher (may be None) and the config.

    The teacher is stored outside ``nn.Module`` registration so that ``distiller.parameters()`` and
    ``state_dict()`` only cover what is trained (student + method-owned parameters).
    """

    needs_teacher: bool = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"distillation method {type(self).__name__} needs a teacher model")
        self.student = student
        self.__dict__["teacher"] = teacher  # not a registered submodule: never trained, never saved here
        self.cfg = cfg
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode whatever the distiller's mode
        return self

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[B, K]`` (eval mode, no grad)."""
        self.teacher.eval()
        return self.teacher(x)

    def ce(self, z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on hard labels."""
        return F.cross_entropy(z_s, y)


@METHODS.register("ce")
class CrossEntropyOnly(Distiller):
    """No distillation: ``ce_weight · CE`` (the baseline every method is compared against)."""

    needs_teacher = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s = self.student(x)
        ce = self.ce(z_s, y)
        return {"loss": self.cfg.ce_weight * ce if self.cfg.ce_weight > 0 else ce, "ce": ce.detach(), "logits": z_s}


@METHODS.register("kd")
class KD(Distiller):
    """Vanilla knowledge distillation (Hinton 2015): ``ce_weight·CE + kd_weight·T²·KL(p_t ‖ p_s)``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        ce = self.ce(z_s, y)
        kd = kd_loss(z_s, z_t, self.cfg.temperature)
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "logits": z_s}


def build_distiller(student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig) -> Distiller:
    """Instantiate the registered method ``cfg.method`` (unknown names list the valid ones)."""
    return METHODS.get(cfg.method)(student, teacher, cfg)


def list_methods() -> list[str]:
    """Names of the registered distillation methods (lower-case)."""
    return METHODS.names()
