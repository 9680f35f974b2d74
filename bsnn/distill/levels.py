"""The two lower knowledge levels of Tang et al. 2020 as distillation methods: ``universe_ls`` and ``domain_kd``.

Tang, Shivanna, Zhao, Lin, Singh, Chi & Jain, "Understanding and Improving Knowledge Distillation" (arXiv
2002.03532, 2020) split what a teacher's soft labels carry into three nested levels:

* **universe**: a regularisation by label smoothing: the soft label keeps only how confident the teacher is on
  average (``universe_ls``: the true class gets the teacher's mean max-probability ``c``, the other K − 1 classes
  share ``1 − c`` equally);
* **domain**: the class relationships: every sample of class k gets class k's mean teacher distribution as its soft
  label (``domain_kd``), so the student sees which classes the teacher confuses but nothing about the sample;
* **instance**: the full per-sample teacher distribution: plain KD (``kd``).

Both methods keep KD's form and published weights (Hinton 2015, CIFAR: CE 0.1, KD 0.9, T = 4) with the teacher's
distribution replaced by the synthetic soft label ``q``:
``ce_weight · CE(y) + kd_weight · T² · mean_b KL(q_b ‖ softmax(z_s,b / T))`` (:func:`soft_label_kd_loss`). The
statistics are those of the teacher's distribution *at the same temperature* ``softmax(z_t / T)``, so the three
levels replace exactly the same target and compare like with like (with T = 1, ``c`` is the teacher's mean
max-probability of the training set). :mod:`bsnn.distill.analysis` trains the four levels (CE only, universe,
domain, instance) on one student and budget and reports how much of KD's gain each level accounts for.

The statistics are training-set means of the frozen teacher. Given in ``params`` (``confidence``,
``class_targets``: what :func:`bsnn.distill.analysis.teacher_statistics` computes), they are used as they are.
Left at None, the method estimates them itself during the first epoch: every training batch adds its teacher
probabilities to running sums and the soft labels use the mean so far (this batch included); from
``set_epoch(1)`` on (``fit`` calls it before the second epoch) the first epoch's means are frozen (summed over the
ranks under torchrun): the exact training-set statistics of an un-augmented loader. The sums are the distiller's
extra state (in its ``state_dict``), so a resumed run keeps them.

The authors published no code for these ablations; this module follows the definitions above (the paper's §3 and
the analysis this project's issue #17 asks for).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bsnn.distill.base import Distiller, register
from bsnn.distributed import all_reduce_tensor_sum
from bsnn.errors import ConfigError

__all__ = ["DomainKD", "UniverseLS", "domain_soft_labels", "soft_label_kd_loss", "universe_soft_labels"]


# --------------------------------------------------------------------------------------------- pure functions


def universe_soft_labels(y: torch.Tensor, num_classes: int, confidence: float | torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label smoothing at the teacher's confidence: ``q_y = c``, ``q_j = (1 − c) / (K − 1)`` for ``j ≠ y``.

    Args:
        y: labels ``[B]``.
        num_classes: K (>= 2).
        confidence: ``c`` in ``(0, 1]`` (a float or a 0-dim tensor).
        dtype: dtype of the result.

    Returns:
        Soft labels ``[B, K]`` (rows sum to 1).
    """
    k = int(num_classes)
    c = torch.as_tensor(confidence, dtype=dtype, device=y.device)
    onehot = F.one_hot(y, k).to(dtype)
    return onehot * c + (1.0 - onehot) * (1.0 - c) / (k - 1)


def domain_soft_labels(y: torch.Tensor, class_targets: torch.Tensor) -> torch.Tensor:
    """Each sample's class-mean teacher distribution: row ``y_b`` of ``class_targets [K, K]`` -> ``[B, K]``."""
    return class_targets[y]


def soft_label_kd_loss(z_s: torch.Tensor, q: torch.Tensor, temperature: float, reduction: str = "mean"
                       ) -> torch.Tensor:
    """``T² · KL(q ‖ softmax(z_s / T))`` per sample, ``Σ_k q_k (log q_k − log softmax(z_s/T)_k)`` with
    ``0 · log 0 = 0``: KD's term with a given target distribution in place of the teacher's.

    Args:
        z_s: student logits ``[B, K]``.
        q: target distributions ``[B, K]`` (no gradient flows into them).
        temperature: T > 0.
        reduction: ``"mean"`` (scalar batch mean) or ``"none"`` (``[B]``).
    """
    t = float(temperature)
    q = q.detach().to(z_s.dtype)
    log_p = F.log_softmax(z_s / t, dim=1)
    per = (t * t) * (torch.xlogy(q, q) - q * log_p).sum(dim=1)
    return per.mean() if reduction == "mean" else per


# --------------------------------------------------------------------------------------------------- methods


class _TeacherStatistic(Distiller):
    """KD towards a soft label built from a training-set statistic of the teacher (given, or estimated in the first
    epoch: see the module docstring). Subclasses set :attr:`given_key`, :meth:`batch_statistic` (sums and counts
    of one batch) and :meth:`soft_labels` (the statistic -> ``[B, K]``)."""

    default_ce_weight = 0.1
    default_kd_weight = 0.9
    default_temperature = 4.0
    given_key = ""

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        self.given = self.check_given(self.hparams[self.given_key])
        # Running sums: the module's extra state (checkpointed), not buffers, which DDP would overwrite with rank 0's
        # before every forward; each rank sums its own shard and the ranks' sums are added when frozen.
        self.stat_sum = torch.zeros(0, dtype=torch.float64)
        self.stat_count = torch.zeros(0, dtype=torch.float64)
        self.stat_frozen = False

    def get_extra_state(self) -> dict:
        return {"stat_sum": self.stat_sum, "stat_count": self.stat_count, "stat_frozen": self.stat_frozen}

    def set_extra_state(self, state: dict) -> None:
        self.stat_sum, self.stat_count = state["stat_sum"], state["stat_count"]
        self.stat_frozen = bool(state["stat_frozen"])

    def check_given(self, value):  # pragma: no cover - overridden
        raise NotImplementedError

    def batch_statistic(self, p_t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def statistic(self, z_t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(sums, counts)`` of the statistic the soft labels use (mean = sums / counts): the given one (counts
        None), the frozen first-epoch one, or the running one (in training mode this batch is added to the running
        sums; in eval mode it is counted without being stored)."""
        if self.given is not None:
            return self.given, None
        if self.stat_frozen:
            return self.stat_sum, self.stat_count
        s, n = self.batch_statistic(F.softmax(z_t.double() / self.temperature, dim=1), y)
        if self.stat_sum.numel() == 0:
            self.stat_sum, self.stat_count = torch.zeros_like(s), torch.zeros_like(n)
        self.stat_sum, self.stat_count = self.stat_sum.to(s.device), self.stat_count.to(s.device)
        if self.training:
            self.stat_sum += s
            self.stat_count += n
            return self.stat_sum, self.stat_count
        return self.stat_sum + s, self.stat_count + n

    def set_epoch(self, epoch: int) -> None:
        """Freeze the first epoch's statistic when the second epoch starts (summed over the ranks)."""
        super().set_epoch(epoch)
        if self.given is None and int(epoch) >= 1 and not self.stat_frozen and self.stat_sum.numel():
            self.stat_sum = all_reduce_tensor_sum(self.stat_sum)
            self.stat_count = all_reduce_tensor_sum(self.stat_count)
            self.stat_frozen = True

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        sums, counts = self.statistic(z_t, y)
        q = self.soft_labels(sums, counts, y, z_s.shape[1]).to(z_s.dtype)
        term = soft_label_kd_loss(z_s, q, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), term, **{self.method_name: term})


@register("universe_ls")
class UniverseLS(_TeacherStatistic):
    """Universe-level knowledge (Tang et al. 2020): KD towards label smoothing at the teacher's mean confidence.

    ``q_y = c``, ``q_j = (1 − c) / (K − 1)`` (:func:`universe_soft_labels`); ``c`` = the teacher's mean
    max-probability ``mean_i max_k softmax(z_t,i / T)_k`` over the training set (params ``confidence``; None:
    estimated in the first epoch). Loss ``ce_weight · CE + kd_weight · T² · KL(q ‖ softmax(z_s / T))``.

    Published: KD's (CE 0.1, KD 0.9, T = 4), the weights the levels are compared at. Params: ``confidence`` (None).
    """

    param_defaults = {"confidence": None}
    given_key = "confidence"

    def check_given(self, value):
        if value is None:
            return None
        c = float(value)
        if not (math.isfinite(c) and 0.0 < c <= 1.0):
            raise ConfigError(f"universe_ls: distill.params.confidence must be in (0, 1] (the teacher's mean "
                              f"max-probability), got {value!r}; null estimates it from the training set")
        return torch.tensor(c, dtype=torch.float64)

    def batch_statistic(self, p_t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return p_t.max(dim=1).values.sum().reshape(1), torch.full((1,), float(p_t.shape[0]), dtype=p_t.dtype,
                                                                    device=p_t.device)

    def soft_labels(self, sums: torch.Tensor, counts: torch.Tensor | None, y: torch.Tensor, k: int) -> torch.Tensor:
        if k < 2:
            raise ConfigError("universe_ls needs at least 2 classes")
        c = sums if counts is None else sums / counts.clamp_min(1.0)
        return universe_soft_labels(y, k, c.reshape(()).to(y.device), dtype=torch.float64)

    def confidence(self) -> float | None:
        """The confidence ``c`` in use (given or estimated so far), None before any batch."""
        if self.given is not None:
            return float(self.given)
        return float(self.stat_sum[0] / self.stat_count[0]) if self.stat_sum.numel() and self.stat_count[0] else None


@register("domain_kd")
class DomainKD(_TeacherStatistic):
    """Domain-level knowledge (Tang et al. 2020): KD towards each class's mean teacher distribution.

    ``q(y) = mean_{i: y_i = y} softmax(z_t,i / T)`` over the training set (:func:`domain_soft_labels`): the class
    relationships of the teacher without anything specific to the sample. Params ``class_targets`` (a K × K list of
    rows summing to 1, row k for class k; None: estimated in the first epoch; a class never seen falls back to its
    one-hot label). Loss ``ce_weight · CE + kd_weight · T² · KL(q(y) ‖ softmax(z_s / T))``.

    Published: KD's (CE 0.1, KD 0.9, T = 4). Params: ``class_targets`` (None).
    """

    param_defaults = {"class_targets": None}
    given_key = "class_targets"

    def check_given(self, value):
        if value is None:
            return None
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            t = None
        square = t is not None and t.dim() == 2 and t.shape[0] == t.shape[1] >= 2
        if not square or not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or \
                not torch.allclose(t.sum(1), torch.ones(t.shape[0], dtype=t.dtype), atol=1e-4):
            raise ConfigError("domain_kd: distill.params.class_targets must be a K x K list of probability rows "
                              "(row k: class k's mean teacher distribution, each row summing to 1); null estimates "
                              "it from the training set")
        return t / t.sum(1, keepdim=True)

    def batch_statistic(self, p_t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = p_t.shape[1]
        sums = torch.zeros(k, k, dtype=p_t.dtype, device=p_t.device).index_add_(0, y, p_t)
        counts = torch.bincount(y, minlength=k).to(p_t.dtype).unsqueeze(1)
        return sums, counts

    def soft_labels(self, sums: torch.Tensor, counts: torch.Tensor | None, y: torch.Tensor, k: int) -> torch.Tensor:
        if sums.shape != (k, k):
            raise ConfigError(f"domain_kd: distill.params.class_targets is {tuple(sums.shape)} but the student has "
                              f"{k} classes; give a {k} x {k} table (or null to estimate it)")
        table = sums.to(y.device)
        if counts is not None:  # estimated: class means, and a class without samples so far keeps its one-hot label
            counts = counts.to(y.device)
            table = torch.where(counts == 0, torch.eye(k, dtype=table.dtype, device=y.device),
                                table / counts.clamp_min(1.0))
        return domain_soft_labels(y, table)

    def class_targets(self) -> torch.Tensor | None:
        """The ``[K, K]`` table in use (given or estimated so far), None before any batch."""
        if self.given is not None:
            return self.given.clone()
        return None if not self.stat_sum.numel() else self.stat_sum / self.stat_count.clamp_min(1.0)
