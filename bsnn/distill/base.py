"""The distiller base class, the method registry and the builder.

A method is an ``nn.Module`` built as ``cls(student, teacher, cfg, **context)`` whose
``forward(x, y, index=None)`` returns ``{'loss': scalar, 'ce': ..., <named parts>..., 'logits': student logits}``.
Parts are detached (for logging); only ``loss`` carries gradients.

Contract shared by every method:

* the teacher(s) are stored outside ``nn.Module`` registration, frozen (``requires_grad=False``), kept in eval
  mode whatever ``distiller.train()`` does, and run under ``torch.no_grad()``;
* ``distiller.parameters()`` / ``state_dict()`` cover the student and method-owned state only (FitNet
  regressors, CRD embeddings and memory banks (buffers), DML peers), so ``fit`` trains and checkpoints them;
* the CE and distillation terms have separate weights: ``loss = ce_weight · CE + kd_weight · distill_term``;
* method-specific settings come from ``cfg.params``; unknown keys raise a :class:`ConfigError` naming the valid ones;
* features come from forward hooks (:mod:`bsnn.distill.hooks`), never from changed model signatures.

``context`` keywords every method accepts: ``example_input`` (a batch ``[B, ...]`` used to size projection heads;
otherwise ``cfg.params['input_shape']`` or a guessed image size) and ``n_data`` (training-set size, used by CRD
when ``cfg.params['n_data']`` is not set). Call :meth:`Distiller.set_epoch` at the start of every epoch
(0-based): DKD's warm-up reads it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn._registry import Registry
from bsnn.config import DistillConfig
from bsnn.distill.hooks import FeatureTap
from bsnn.errors import ConfigError

METHODS: Registry[type] = Registry("distillation method")


def register(name: str):
    """Class decorator: register a :class:`Distiller` subclass under ``name`` and record it as ``method_name``."""

    def deco(cls: type) -> type:
        cls.method_name = name.lower()
        return METHODS.register(name)(cls)

    return deco


def teacher_list(teacher: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    """``None`` -> ``[]``; a module -> ``[module]``; a list / ``nn.ModuleList`` of modules -> a list."""
    if teacher is None:
        return []
    if isinstance(teacher, nn.ModuleList) or isinstance(teacher, (list, tuple)):
        out = list(teacher)
        if not all(isinstance(t, nn.Module) for t in out):
            raise ConfigError("every teacher must be an nn.Module")
        return out
    if isinstance(teacher, nn.Module):
        return [teacher]
    raise ConfigError(f"teacher must be an nn.Module, a list of them or None, got {type(teacher).__name__}")


def freeze_(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (in place)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Distiller(nn.Module):
    """Base class: holds the student, the frozen teacher(s) (may be None) and the config.

    Class attributes a method sets:
        needs_teacher: building without a teacher is an error.
        needs_index: the forward needs the dataset index of every sample (third batch element).
        default_ce_weight / default_kd_weight: the published weights, used where ``cfg.ce_weight`` /
            ``cfg.kd_weight`` is None.
        param_defaults: the method's ``cfg.params`` keys and their defaults.

    Args:
        student: the network being trained.
        teacher: a frozen teacher, a list / ``nn.ModuleList`` of teachers, or None (teacher-free methods).
        cfg: the distillation config.
        example_input: optional example batch ``[B, ...]`` (sizes projection heads; only 2 rows are kept).
        n_data: optional number of training samples (CRD).
    """

    method_name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_index: ClassVar[bool] = False
    default_ce_weight: ClassVar[float] = 1.0
    default_kd_weight: ClassVar[float] = 1.0
    param_defaults: ClassVar[dict] = {}

    def __init__(self, student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, cfg: DistillConfig,
                 *, example_input: torch.Tensor | None = None, n_data: int | None = None) -> None:
        super().__init__()
        teachers = teacher_list(teacher)
        if self.needs_teacher and not teachers:
            raise ConfigError(f"distillation method {self.method_name or type(self).__name__!r} needs a teacher model")
        self.student = student
        # Not registered submodules: never trained, never saved in the distiller's state_dict.
        self.__dict__["teacher"] = teacher
        self.__dict__["teachers"] = teachers
        self.cfg = cfg
        self.hparams = self.check_params(cfg.params)
        self.epoch: int | None = None
        self._example_input = None if example_input is None else example_input.detach()[:2].clone()
        self._n_data = n_data
        for t in teachers:
            freeze_(t)

    # ------------------------------------------------------------------------------------------ configuration

    @classmethod
    def check_params(cls, params: dict | None) -> dict:
        """Merge ``params`` over :attr:`param_defaults`; unknown keys raise a :class:`ConfigError`."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(cls.param_defaults))
        if unknown:
            valid = ", ".join(sorted(cls.param_defaults)) or "(none)"
            raise ConfigError(f"distill.params: unknown key(s) {', '.join(map(repr, unknown))} for method "
                              f"{cls.method_name or cls.__name__!r}; valid keys: {valid}")
        return {**cls.param_defaults, **params}

    @property
    def ce_weight(self) -> float:
        """Weight of the cross-entropy term (``cfg.ce_weight``, or the method default where that is None)."""
        w = getattr(self.cfg, "ce_weight", None)
        return float(self.default_ce_weight if w is None else w)

    @property
    def kd_weight(self) -> float:
        """Weight of the distillation term (``cfg.kd_weight``, or the method default where that is None)."""
        w = getattr(self.cfg, "kd_weight", None)
        return float(self.default_kd_weight if w is None else w)

    @property
    def temperature(self) -> float:
        """``cfg.temperature``."""
        return float(self.cfg.temperature)

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the current epoch (0-based; ``fit`` calls it before each epoch)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------------------------ running

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for t in self.teachers:
            t.eval()  # the teachers stay in eval mode whatever the distiller's mode
        return self

    def student_forward(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, list]:
        """Student logits ``[B, K]`` and the tapped features of ``layers`` (with gradients)."""
        if not layers:
            return self.student(x), []
        with FeatureTap(self.student, layers, "student") as feats:
            z = self.student(x)
        return z, list(feats)

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor, layers: Sequence[str] = (), teacher: nn.Module | None = None
                        ) -> tuple[torch.Tensor, list]:
        """Teacher logits ``[B, K]`` and tapped features (eval mode, no grad); ``teacher`` defaults to the first."""
        t = teacher if teacher is not None else self.teachers[0]
        t.eval()
        if not layers:
            return t(x), []
        with FeatureTap(t, layers, "teacher") as feats:
            z = t(x)
        return z, list(feats)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[B, K]`` (eval mode, no grad)."""
        return self.teacher_forward(x)[0]

    def ce(self, z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on hard labels ``[B]`` (or on probability targets ``[B, K]``)."""
        return F.cross_entropy(z_s, y)

    def combine(self, z_s: torch.Tensor, ce: torch.Tensor, distill: torch.Tensor, **parts: Any) -> dict:
        """``{'loss': ce_weight·ce + kd_weight·distill, 'ce', **parts (detached), 'logits'}``."""
        loss = self.ce_weight * ce + self.kd_weight * distill
        out = {"loss": loss, "ce": ce.detach()}
        out.update({k: (v.detach() if torch.is_tensor(v) else v) for k, v in parts.items()})
        out["logits"] = z_s
        return out


def build_distiller(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, cfg: DistillConfig,
                    **context: Any) -> Distiller:
    """Instantiate the registered method ``cfg.method`` (unknown names list the valid ones).

    Args:
        student: the network to train.
        teacher: frozen teacher, a list of teachers (``ca_mkd``, ``takd``), or None for teacher-free methods.
        cfg: distillation config (``cfg.params`` holds the method's own settings).
        **context: ``example_input`` (a batch, sizes projection heads), ``n_data`` (training-set size, CRD),
            ``peer`` (a given peer network, ``dml`` / ``bd_kd``).
    """
    return METHODS.get(cfg.method)(student, teacher, cfg, **context)


def list_methods() -> list[str]:
    """Names of the registered distillation methods (lower-case)."""
    return METHODS.names()
