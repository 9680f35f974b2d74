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
  a weight or temperature left at None in the config is the method's published one (``default_*`` attributes);
* method-specific settings come from ``cfg.params``; unknown keys raise a :class:`ConfigError` naming the valid ones;
* features come from forward hooks (:mod:`bsnn.distill.hooks`), never from changed model signatures.

Exceptions, declared by class attributes: methods that train their teacher online (``trains_teacher``: BD-KD)
own it as a submodule; multi-teacher methods (``min_teachers`` > 1: CA-MKD, TAKD) refuse fewer teachers.

``context`` keywords every method accepts: ``example_input`` (a batch ``[B, ...]`` used to size projection heads;
otherwise ``cfg.params['input_shape']`` or a guessed image size), ``n_data`` (training-set size, used by CRD
when ``cfg.params['n_data']`` is not set) and ``epochs`` (the run's number of epochs: epoch-based schedules left
at None in ``cfg.params`` scale to it, see :attr:`Distiller.schedule_defaults`). Call :meth:`Distiller.set_epoch`
at the start of every epoch (0-based): DKD's warm-up reads it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn._registry import Registry
from bsnn.distill.hooks import FeatureTap
from bsnn.errors import ConfigError

if TYPE_CHECKING:  # annotations only: DistillConfig validates against this module's registry
    from bsnn.distill.config import DistillConfig

METHODS: Registry[type] = Registry("distillation method")


class DistillWarning(UserWarning):
    """A distillation setting that probably does not do what the user expects (e.g. a warm-up longer than the run)."""


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


def unfreeze_(model: nn.Module) -> nn.Module:
    """``requires_grad=True`` on every parameter (in place) except those its modules keep frozen by design: the
    names a module lists in ``frozen_parameters`` (airbench's whitening filters and unit BN weights). For models a
    method trains itself (online teachers, peers, MetaDistil's teacher copy)."""
    for m in model.modules():
        frozen = set(getattr(m, "frozen_parameters", ()))
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(name not in frozen)
    return model


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
        min_teachers: the fewest teachers the method works with (2: multi-teacher methods refuse a single one).
        uses_assistants: the teachers are a chain teacher -> assistants (TAKD; the pipeline's ``model.assistants``).
        trains_teacher: the teacher is trained online with the student (the subclass registers it as a submodule;
            it is not frozen and not in :attr:`teachers`).
        needs_index: the forward needs the dataset index of every sample (third batch element).
        same_architecture: the student must have its teacher's architecture (born-again networks); the pipeline
            refuses another ``model.student`` before anything is trained (unless ``params['strict']`` is False).
        default_ce_weight / default_kd_weight / default_temperature: the published values, used where
            ``cfg.ce_weight`` / ``cfg.kd_weight`` / ``cfg.temperature`` is None.
        param_defaults: the method's ``cfg.params`` keys and their defaults.
        schedule_defaults: epoch-based ``params`` keys -> ``(published epochs, epochs of the published run)``; a
            key left at None becomes ``published · epochs / published_run`` for a run of ``epochs`` epochs (the
            same fraction of training as in the paper).

    Args:
        student: the network being trained.
        teacher: a frozen teacher, a list / ``nn.ModuleList`` of teachers, or None (teacher-free methods).
        cfg: the distillation config.
        example_input: optional example batch ``[B, ...]`` (sizes projection heads; only 2 rows are kept).
        n_data: optional number of training samples (CRD).
        epochs: optional number of training epochs of the run (scales epoch-based schedules).
    """

    method_name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    min_teachers: ClassVar[int] = 1
    uses_assistants: ClassVar[bool] = False
    trains_teacher: ClassVar[bool] = False
    needs_index: ClassVar[bool] = False
    default_ce_weight: ClassVar[float] = 1.0
    default_kd_weight: ClassVar[float] = 1.0
    default_temperature: ClassVar[float] = 4.0
    param_defaults: ClassVar[dict] = {}
    schedule_defaults: ClassVar[dict] = {}
    teacher_hint: ClassVar[str] = ""  # appended to the "needs at least N teachers" error
    same_architecture: ClassVar[bool] = False  # the student must have the teacher's architecture (born-again)

    def __init__(self, student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, cfg: DistillConfig,
                 *, example_input: torch.Tensor | None = None, n_data: int | None = None,
                 epochs: int | None = None) -> None:
        super().__init__()
        teachers = teacher_list(teacher)
        name = self.method_name or type(self).__name__
        if self.needs_teacher and not teachers:
            raise ConfigError(f"distillation method {name!r} needs a teacher model")
        if teachers and len(teachers) < self.min_teachers:
            raise ConfigError(f"distillation method {name!r} needs at least {self.min_teachers} teachers, got "
                              f"{len(teachers)}{self.teacher_hint}")
        if self.trains_teacher:  # the subclass registers it as a trained submodule
            teacher, teachers = None, []
        self.student = student
        # Not registered submodules: never trained, never saved in the distiller's state_dict.
        self.__dict__["teacher"] = teacher
        self.__dict__["teachers"] = teachers
        self.cfg = cfg
        self.run_epochs = None if epochs is None else int(epochs)
        self.hparams = self.resolve_schedule(self.check_params(cfg.params), self.run_epochs)
        self.epoch: int | None = None
        self.progress: float | None = None  # epochs passed, fractions included (set_progress)
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

    @classmethod
    def student_kwargs(cls, teacher, cfg) -> dict:
        """Constructor arguments the method sets on the student from the (trained) teacher before the student is
        built (``prune_distill``: the widths of the pruned teacher); ``{}`` for the other methods. The pipeline
        merges them over the configured student's ``kwargs``."""
        return {}

    @classmethod
    def resolve_schedule(cls, params: dict, epochs: int | None) -> dict:
        """``params`` with every epoch-based schedule (:attr:`schedule_defaults`) fitted to a run of ``epochs``.

        A key left at None becomes ``published · epochs / published_run`` (the published fraction of training);
        with ``epochs`` unknown it keeps the published number of epochs and a :class:`DistillWarning` says so.
        An explicit value longer than the run also warns.
        """
        out = dict(params)
        for key, (published, run) in cls.schedule_defaults.items():
            value = out.get(key)
            if value is None:
                if epochs is None:
                    warnings.warn(f"{cls.method_name}: the run's epoch count is unknown, so params.{key} keeps the "
                                  f"published {published:g} epochs (of {run:g}); pass epochs= to build_distiller or "
                                  f"set distill.params.{key}", DistillWarning, stacklevel=3)
                    out[key] = float(published)
                else:
                    out[key] = float(published) * epochs / float(run)
            elif epochs is not None and float(value) > epochs:
                warnings.warn(f"{cls.method_name}: params.{key}={value:g} epochs is longer than the run ({epochs} "
                              f"epochs); null scales it to the run ({published:g} of {run:g} epochs published)",
                              DistillWarning, stacklevel=3)
        return out

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
        """``cfg.temperature``, or the method's published temperature where that is None."""
        t = getattr(self.cfg, "temperature", None)
        return float(self.default_temperature if t is None else t)

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the current epoch (0-based; ``fit`` calls it before each epoch); :attr:`progress`
        becomes ``epoch``."""
        self.epoch = int(epoch)
        self.progress = float(epoch)

    def set_progress(self, progress: float) -> None:
        """Tell the method how many epochs have passed, fractions included (``fit`` calls it before every batch:
        ``epoch + batch / batches``); :attr:`epoch` is its whole part.

        Phase switches (an initialisation stage, a delayed or decayed term) compare :attr:`progress` with their
        fitted length, so a phase scaled to a fraction of an epoch (30 of 190 published epochs in a one-epoch run)
        lasts that fraction — not the whole first epoch — while whole-epoch lengths switch exactly where the
        epoch counter did. Per-epoch formulas (DKD's warm-up ramp) keep using :attr:`epoch`.
        """
        self.progress = float(progress)
        self.epoch = int(progress)

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
        teacher: frozen teacher, a list of teachers (``ca_mkd``, ``takd``), the online teacher (``bd_kd``), or None
            for teacher-free methods.
        cfg: distillation config (``cfg.params`` holds the method's own settings).
        **context: ``example_input`` (a batch, sizes projection heads), ``n_data`` (training-set size, CRD),
            ``epochs`` (the run's epochs: scales epoch-based schedules such as DKD's warm-up), ``peer`` (given
            peer networks, ``dml``).
    """
    return METHODS.get(cfg.method)(student, teacher, cfg, **context)


def list_methods() -> list[str]:
    """Names of the registered distillation methods (lower-case)."""
    return METHODS.names()
