"""Logit-based methods: ce, kd, dkd, dist, nkd, tf_nkd, zipf_ls, bake, mixup_kd.

Every method returns ``{'loss': ce_weight·CE + kd_weight·<distill term>, 'ce', <parts>, 'logits'}``;
the ``default_*_weight`` class attributes record the published weights (REFERENCE.md §3), used where the config
leaves a weight unset (None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, register
from bsnn.distill.hooks import FeatureTap, as_layer_list, default_layer


@register("ce")
class CrossEntropyOnly(Distiller):
    """No distillation: ``ce_weight · CE`` (the baseline every method is compared against; no teacher needed)."""

    needs_teacher = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s = self.student(x)
        ce = self.ce(z_s, y)
        w = self.ce_weight
        return {"loss": w * ce if w > 0 else ce, "ce": ce.detach(), "logits": z_s}


@register("kd")
class KD(Distiller):
    """Vanilla knowledge distillation (Hinton 2015): ``ce_weight·CE + kd_weight·T²·KL(p_t ‖ p_s)``.

    Published weights: CE 0.1, KD 0.9, T = 4 (CIFAR).
    """

    default_ce_weight = 0.1
    default_kd_weight = 0.9

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        kd = L.kd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), kd, kd=kd)


@register("dkd")
class DKD(Distiller):
    """Decoupled KD (Zhao 2022): ``ce_weight·CE + kd_weight·min((epoch+1)/warmup, 1)·(α·TCKD + β·NCKD)``.

    TCKD / NCKD include ``T²`` (:func:`bsnn.distill.losses.dkd_parts`). The warm-up factor reads the epoch
    given to :meth:`set_epoch` (0-based; epoch 0 -> 1/warmup); before any ``set_epoch`` call it is 1.

    Params: ``alpha`` (1), ``beta`` (8; 2 for ResNet56/110 pairs, 6 for WRN/VGG), ``warmup`` epochs (20).
    Published weights: CE 1, distillation 1, T = 4.
    """

    param_defaults = {"alpha": 1.0, "beta": 8.0, "warmup": 20}

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)``; 1 when no epoch was set or warmup <= 0."""
        warm = float(self.hparams["warmup"])
        if self.epoch is None or warm <= 0:
            return 1.0
        return min((self.epoch + 1) / warm, 1.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        tckd, nckd = L.dkd_parts(z_s, z_t, y, self.temperature)
        factor = self.warmup_factor()
        term = factor * (self.hparams["alpha"] * tckd + self.hparams["beta"] * nckd)
        return self.combine(z_s, self.ce(z_s, y), term, tckd=tckd, nckd=nckd, dkd=term,
                            warmup=torch.tensor(factor))


@register("dist")
class DIST(Distiller):
    """DIST (Huang 2022): ``ce_weight·CE + kd_weight·(β·inter + γ·intra)`` with τ = ``cfg.temperature``.

    Params: ``beta`` (1), ``gamma`` (1). Published weights: CE 1, distillation 2; τ = 4 CIFAR, 1 ImageNet.
    """

    default_kd_weight = 2.0
    param_defaults = {"beta": 1.0, "gamma": 1.0}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        inter, intra = L.dist_parts(z_s, z_t, self.temperature)
        term = self.hparams["beta"] * inter + self.hparams["gamma"] * intra
        return self.combine(z_s, self.ce(z_s, y), term, inter=inter, intra=intra)


@register("nkd")
class NKD(Distiller):
    """Normalized KD (Yang 2023): ``ce_weight·CE + kd_weight·(target + non_target)``.

    The non-target term uses ``cfg.temperature`` (the paper: 1 on ImageNet). Params: ``gamma`` (1.5).
    Published weights: CE 1, NKD 1.
    """

    param_defaults = {"gamma": 1.5}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        target, non = L.nkd_parts(z_s, z_t, y, self.temperature, self.hparams["gamma"])
        return self.combine(z_s, self.ce(z_s, y), target + non, nkd_target=target, nkd_non_target=non)


@register("tf_nkd")
class TfNKD(Distiller):
    """Teacher-free NKD (Yang 2023, USKD form): soft labels from the student's own detached predictions.

    ``ce_weight·CE + kd_weight·(target_weight·target + non_target_weight·non_target)``
    (:func:`bsnn.distill.losses.tf_nkd_parts`; the USKD auxiliary "weak" head is not included).
    Params: ``target_weight`` (1), ``non_target_weight`` (0.1), ``power`` (Zipf exponent, 1). A teacher, if given,
    is ignored.
    """

    needs_teacher = False
    param_defaults = {"target_weight": 1.0, "non_target_weight": 0.1, "power": 1.0}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s = self.student(x)
        target, non = L.tf_nkd_parts(z_s, y, self.hparams["power"])
        term = self.hparams["target_weight"] * target + self.hparams["non_target_weight"] * non
        return self.combine(z_s, self.ce(z_s, y), term, tf_nkd_target=target, tf_nkd_non_target=non)


@register("zipf_ls")
class ZipfLS(Distiller):
    """Zipf label smoothing (Liang 2022): ``ce_weight·CE + kd_weight·KL(q ‖ softmax(z_s))``.

    ``q = (1 − α)·onehot + α·Zipf`` over the non-target classes ranked by the student's own (detached) logits.
    Params: ``alpha`` (0.1), ``power`` (1). Teacher-free (a given teacher is ignored).
    """

    needs_teacher = False
    param_defaults = {"alpha": 0.1, "power": 1.0}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s = self.student(x)
        q = L.zipf_targets(z_s, y, self.hparams["alpha"], self.hparams["power"])
        log_q = torch.log(q.clamp_min(1e-30))
        zipf = L.kl_from_log(log_q, F.log_softmax(z_s, dim=1)).mean()
        return self.combine(z_s, self.ce(z_s, y), zipf, zipf=zipf)


@register("bake")
class BAKE(Distiller):
    """Batch knowledge ensembling (Ge 2021): self-distillation towards ``W · softmax(z_s / T)``.

    ``W = (1 − ω)(I − ωA)⁻¹`` from the affinities of the student's own features in the batch
    (:func:`bsnn.distill.losses.propagation_matrix`); the term is ``T²·KL(target ‖ softmax(z_s/T))``.
    Batches of one sample give a zero term. The paper samples several images per class in each batch.

    Params: ``omega`` (0.5), ``affinity_temperature`` (1), ``student_layer`` (default: input of the last
    ``nn.Linear``). Teacher-free (a given teacher is ignored).
    """

    needs_teacher = False
    param_defaults = {"omega": 0.5, "affinity_temperature": 1.0, "student_layer": None}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        layers = as_layer_list(self.hparams["student_layer"]) or [default_layer(student, "student")]
        self.student_layers = layers[:1]
        FeatureTap(student, self.student_layers, "student")  # validates the name now

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, (f_s,) = self.student_forward(x, self.student_layers)
        t = self.temperature
        if z_s.shape[0] < 2:
            bake = z_s.sum() * 0.0
        else:
            target = L.bake_targets(z_s, f_s, self.hparams["omega"], t, self.hparams["affinity_temperature"])
            log_target = torch.log(target.clamp_min(1e-30))
            bake = (t * t) * L.kl_from_log(log_target, F.log_softmax(z_s / t, dim=1)).mean()
        return self.combine(z_s, self.ce(z_s, y), bake, bake=bake)


@register("mixup_kd")
class MixupKD(Distiller):
    """KD under mixup: the teacher sees the same mixed input as the student.

    In training mode with hard labels the batch is mixed here: ``λ ~ Beta(a, a)``, ``x̃ = λx + (1−λ)x[perm]``,
    ``CE = λ·CE(z, y) + (1−λ)·CE(z, y[perm])``, ``KD = T²·KL(p_t(x̃) ‖ p_s(x̃))`` (torch's global RNG, so seeded runs
    repeat). With probability labels ``[B, K]`` (mixing done by the data pipeline) or in eval mode, the batch is
    used as given. Params: ``mixup_alpha`` (a, 1.0). Published weights: as KD (0.1 / 0.9).
    """

    default_ce_weight = 0.1
    default_kd_weight = 0.9
    param_defaults = {"mixup_alpha": 1.0}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        a = float(self.hparams["mixup_alpha"])
        lam = 1.0
        if self.training and a > 0 and y.dim() == 1 and x.shape[0] > 1:
            lam = float(torch.distributions.Beta(a, a).sample())
            perm = torch.randperm(x.shape[0], device=x.device)
            x = lam * x + (1.0 - lam) * x[perm]
            y_b = y[perm]
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        ce = self.ce(z_s, y)
        if lam != 1.0:
            ce = lam * ce + (1.0 - lam) * self.ce(z_s, y_b)
        kd = L.kd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, ce, kd, kd=kd, lam=torch.tensor(lam))
