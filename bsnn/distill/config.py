"""The ``distill`` section: :class:`DistillConfig`, validated against the method registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from bsnn._validate import _check
from bsnn.distill.methods import METHODS


@dataclass
class DistillConfig:
    """Distillation of the binary student from a frozen teacher.

    The cross-entropy and distillation terms have separate, explicit weights. Every setting left at None takes
    the method's published value (``bsnn.distill.METHODS.get(method)``: ``default_ce_weight``,
    ``default_kd_weight``, ``default_temperature``, ``param_defaults``), so switching ``method`` gives that
    method as its authors run it; KD's are CE 0.1, KD 0.9, T = 4.

    Attributes:
        method: registered method name (see :func:`bsnn.distill.list_methods`).
        temperature: softmax temperature of logit-based methods (None: the method's published temperature).
        ce_weight: weight of the cross-entropy on the labels (None: the method's published weight).
        kd_weight: weight of the distillation term (None: the method's published weight).
        params: method-specific keyword arguments (e.g. ``{"alpha": 1, "beta": 8}`` for DKD); epoch-based
            schedules left at None (DKD's ``warmup``) scale with the run's epochs.
    """

    method: str = "kd"
    temperature: Union[float, None] = None
    ce_weight: Union[float, None] = None
    kd_weight: Union[float, None] = None
    params: dict = field(default_factory=dict)

    def validate(self) -> None:
        METHODS.get(self.method).check_params(self.params)
        _check(self.temperature is None or self.temperature > 0,
               f"distill.temperature must be > 0 (or null for the method default), got {self.temperature}")
        for key in ("ce_weight", "kd_weight"):
            w = getattr(self, key)
            _check(w is None or w >= 0, f"distill.{key} must be >= 0 (or null for the method default), got {w}")
