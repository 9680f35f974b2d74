"""Logit-based methods: ce, kd, dkd, dist, nkd, tf_nkd, zipf_ls, bake, mixup_kd.

Every method returns ``{'loss': ce_weight·CE + kd_weight·<distill term>, 'ce', <parts>, 'logits'}``;
the ``default_*`` class attributes record the published weights and temperature (REFERENCE.md §3), used where the
config leaves them unset (None). Where the authors publish CIFAR settings next to ImageNet ones, the CIFAR ones are
the defaults (bsnn's data are CIFAR / MNIST sized).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, DistillWarning, register
from bsnn.distill.hooks import (FeatureTap, as_layer_list, default_layer, global_pool_head, last_module_name,
                                model_device, probe_features, stage_input_layer)
from bsnn.errors import ConfigError


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

    Published weights: CE 0.1, KD 0.9, T = 4 (CIFAR). Code followed: HobbitLong/RepDistiller ``distiller_zoo/KD.py``
    ``DistillKL`` (Hinton et al. released none).
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
    given to :meth:`set_epoch` (0-based; epoch 0 -> 1/warmup, the authors' ``min(epoch / warmup, 1)`` with 1-based
    epochs); before any ``set_epoch`` call it is 1.

    The authors warm up for 20 of 240 epochs (CIFAR-100; 1 of 100 on ImageNet). ``warmup`` None (default) keeps
    that fraction: ``20 · epochs / 240`` for a run of ``epochs`` epochs (10 epochs -> 0.83, i.e. full strength from
    the first epoch); a number is taken as epochs (a warning says so when it exceeds the run).

    Params: ``alpha`` (1), ``beta`` (8; 2 for ResNet56/110 pairs, 6 for WRN/VGG), ``warmup`` (None).
    Published: CE 1, distillation 1, T = 4. Authors' code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py``.
    """

    param_defaults = {"alpha": 1.0, "beta": 8.0, "warmup": None}
    schedule_defaults = {"warmup": (20, 240)}

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
    """DIST (Huang 2022): ``ce_weight·CE + kd_weight·(β·inter + γ·intra)`` with τ the temperature.

    Params: ``beta`` (1), ``gamma`` (1). Published: CE 1, distillation 2; τ = 4 (CIFAR; 1 on ImageNet).
    Authors' code: hunto/DIST_KD (classification: hunto/image_classification_sota ``lib/models/losses/dist_kd.py``).
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

    The non-target term uses the temperature (:func:`bsnn.distill.losses.nkd_parts`). Params: ``gamma``.
    Published (the authors' CIFAR-100 config): CE 1, NKD 1, T = 3, γ = 3.5 (ImageNet: T = 1, γ = 1.5).
    Authors' code: yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py`` ``NKDLoss``.
    """

    default_temperature = 3.0
    param_defaults = {"gamma": 3.5}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        target, non = L.nkd_parts(z_s, z_t, y, self.temperature, self.hparams["gamma"])
        return self.combine(z_s, self.ce(z_s, y), target + non, nkd_target=target, nkd_non_target=non)


@register("tf_nkd")
class TfNKD(Distiller):
    """Teacher-free NKD (Yang 2023, the authors' USKD loss): soft labels from the student's own predictions.

    ``ce_weight·CE + kd_weight·(target_weight·target + non_target_weight·non_target + mu·weak)``
    (:func:`bsnn.distill.losses.tf_nkd_parts`). The weak head is a linear classifier on the globally pooled
    mid-level features (``weak_layer``; default: the input of the last channel-changing ``nn.Conv2d``, where the
    last stage starts — the authors use the stage before the last); it is trained with the student, its
    label-smoothed cross-entropy is the weak term and its predictions join the non-target ranking. ``mu`` 0 (or a
    student without such a conv) leaves the head out.

    Params: ``target_weight`` (α), ``non_target_weight`` (β), ``mu``, ``weak_layer``, ``input_shape``.
    Published (the authors' CIFAR-100 config): α = 0.1, β = 0.1, μ = 0.1, CE 1 (ImageNet: α = 1, β = 0.1,
    μ = 0.005). A teacher, if given, is ignored. Authors' code: yzd-v/cls_KD ``mmcls/models/dis_losses/uskd.py``.
    """

    needs_teacher = False
    param_defaults = {"target_weight": 0.1, "non_target_weight": 0.1, "mu": 0.1, "weak_layer": None,
                      "input_shape": None}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        self.weak_layers: list[str] = []
        self.weak_head: nn.Module | None = None
        if float(self.hparams["mu"]) == 0:
            return
        layer = self.hparams["weak_layer"] or stage_input_layer(student)
        fc = last_module_name(student, nn.Linear)
        if layer is None or fc is None:
            warnings.warn("tf_nkd: the student has no channel-changing nn.Conv2d after its first (or no nn.Linear "
                          "classifier), so the weak head is left out; name its input layer with "
                          "distill.params.weak_layer", DistillWarning, stacklevel=3)
            return
        self.weak_layers = [layer]
        (f,) = probe_features(student, self.weak_layers, "student", self._example_input, self.hparams["input_shape"])
        k = dict(student.named_modules())[fc].out_features
        self.weak_head = nn.Linear(self._pooled(f).shape[1], k).to(*model_device(student))

    @staticmethod
    def _pooled(f: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(f, 1).flatten(1) if f.dim() == 4 else f.flatten(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, feats = self.student_forward(x, self.weak_layers)
        weak_logits = self.weak_head(self._pooled(feats[0])) if self.weak_head is not None else None
        target, non, weak = L.tf_nkd_parts(z_s, y, weak_logits)
        h = self.hparams
        term = h["target_weight"] * target + h["non_target_weight"] * non + float(h["mu"]) * weak
        return self.combine(z_s, self.ce(z_s, y), term, tf_nkd_target=target, tf_nkd_non_target=non,
                            tf_nkd_weak=weak)


@register("zipf_ls")
class ZipfLS(Distiller):
    """Zipf's label smoothing (Liang 2022, the authors' training path): ``ce_weight·CE + kd_weight·KL(zipf ‖ q)``.

    ``q`` is the softmax over the K−1 non-target logits; ``zipf`` ranks all K classes (ties share the lowest rank),
    gives rank r the mass ``r^−power`` and drops the target (:func:`bsnn.distill.losses.zipf_ls_loss`). The ranks
    come from dense per-location votes where the student ends ``global-average-pool -> Linear`` (the classifier
    applied at every location of the last map, bilinearly upsampled ×2 with ``upsample``, as the authors' CIFAR
    runs), otherwise from the student's own logits. ``dense``: None = votes where available, False = logits,
    True = votes or an error.

    Params: ``power`` (1), ``dense`` (None), ``upsample`` (True), ``input_shape``. Published: CE 1, λ = 0.1
    (CIFAR-100 and ImageNet; 1.0 for TinyImageNet / iNat). Teacher-free (a given teacher is ignored).
    Authors' code: megvii-research/zipfls ``pytorch_zipfls/losses.py`` (``gen_pdf``, ``kl_loss``).
    """

    needs_teacher = False
    default_kd_weight = 0.1
    param_defaults = {"power": 1.0, "dense": None, "upsample": True, "input_shape": None}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        dense = self.hparams["dense"]
        head = None
        if dense is None or dense:
            head = global_pool_head(student, "student", self._example_input, self.hparams["input_shape"])
            if head is None and dense:
                raise ConfigError("zipf_ls: dense=true needs a student ending global-average-pool -> nn.Linear "
                                  "(nn.AdaptiveAvgPool2d(1)); use dense=false to rank by the logits")
        self.dense_layers = [] if head is None else [head[0] + ":in"]
        self.__dict__["_fc"] = None if head is None else dict(student.named_modules())[head[1]]

    def ranking_scores(self, z_s: torch.Tensor, feats: list) -> torch.Tensor:
        """Dense votes ``[B, K]`` from the tapped map, or the detached logits."""
        if not self.dense_layers:
            return z_s.detach()
        with torch.no_grad():
            fmap = feats[0].detach()
            if self.hparams["upsample"]:
                fmap = F.interpolate(fmap, scale_factor=2.0, mode="bilinear", align_corners=False)
            b, c = fmap.shape[:2]
            loc = F.linear(fmap.permute(0, 2, 3, 1).reshape(b, -1, c), self._fc.weight, self._fc.bias)
            return L.dense_votes(loc)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, feats = self.student_forward(x, self.dense_layers)
        zipf = L.zipf_ls_loss(z_s, y, self.ranking_scores(z_s, feats), self.hparams["power"])
        return self.combine(z_s, self.ce(z_s, y), zipf, zipf=zipf)


@register("bake")
class BAKE(Distiller):
    """Batch knowledge ensembling (Ge 2021): self-distillation towards ``W · softmax(z_s / T)``.

    ``W = (1 − ω)(I − ωA)⁻¹`` from the affinities of the student's own features in the batch
    (:func:`bsnn.distill.losses.propagation_matrix`); the term is ``T²·KL(target ‖ softmax(z_s/T))``.
    Batches of one sample give a zero term. The paper samples several images per class in each batch.

    Params: ``omega`` (0.5), ``affinity_temperature`` (1), ``student_layer`` (default: input of the last
    ``nn.Linear``). Published: CE 1, BAKE 1, T = 4. Teacher-free (a given teacher is ignored).
    Code followed: megvii-research/zipfls ``pytorch_zipfls/losses.py`` ``knowledge_ensemble`` (BAKE's own: yxgeee/BAKE).
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


def partial_mixup(x: torch.Tensor, unmixed: float = 0.9, beta_a: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MIX-KD's partial mixup (PMU) of a batch: ``x̃_i = a_i x_i + (1 − a_i) x_perm(i)``.

    ``a_i ~ Beta(beta_a, beta_a)``; then ``int(B · unmixed)`` indices drawn with replacement get ``a = 1`` (not
    mixed; 0.9 leaves about 60 % of the batch unmixed), as in the authors' ``PMU``; ``unmixed = 0`` is full mixup.
    The authors also permute the first operand; that only reorders the batch, so here row i stays sample i.
    Uses torch's global RNG.

    Args:
        x: inputs ``[B, ...]``.
        unmixed: the PMU fraction (``partmixup``).
        beta_a: Beta parameter.

    Returns:
        ``(x̃ [B, ...], a [B], perm [B])``; :func:`mixed_targets` mixes the labels alike.
    """
    b = x.shape[0]
    a = torch.distributions.Beta(float(beta_a), float(beta_a)).sample((b,)).to(x.device, x.dtype)
    a[torch.randint(0, b, (int(b * unmixed),), device=x.device)] = 1.0
    perm = torch.randperm(b, device=x.device)
    shape = (b,) + (1,) * (x.dim() - 1)
    return a.view(shape) * x + (1.0 - a.view(shape)) * x[perm], a, perm


def mixed_targets(y: torch.Tensor, num_classes: int, a: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``a · onehot(y) + (1 − a) · onehot(y[perm])``: ``[B]`` labels -> ``[B, K]`` (see :func:`partial_mixup`)."""
    onehot = F.one_hot(y, num_classes).to(a.dtype)
    return a.view(-1, 1) * onehot + (1.0 - a.view(-1, 1)) * onehot[perm]


@register("mixup_kd")
class MixupKD(Distiller):
    """MIX-KD (Choi 2023, the authors' ``mixstd``): KD on partially mixed batches with std-scaled logits.

    In training mode with hard labels the batch is mixed (:func:`partial_mixup`) and the teacher sees the same
    mixed input; the loss is ``ce_weight·CE + kd_weight·KD`` with both terms on logits divided by their own row
    standard deviation instead of a temperature (:func:`bsnn.distill.losses.std_kd_parts`; ``cfg.temperature``
    is not used). In eval mode, or with probability labels ``[B, K]`` (mixing done by the data pipeline), the
    batch is used as given. Params: ``partmixup`` (0.9), ``beta_a`` (1). Published: CE 0.1, KD 0.9.
    Authors' code: hchoi71/MIX-KD ``distiller_zoo/MIXSTD.py`` ``MIXSTDLoss``.
    """

    default_ce_weight = 0.1
    default_kd_weight = 0.9
    param_defaults = {"partmixup": 0.9, "beta_a": 1.0}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        mix = None
        if self.training and y.dim() == 1 and x.shape[0] > 1:
            x, a, perm = partial_mixup(x, float(self.hparams["partmixup"]), float(self.hparams["beta_a"]))
            mix = (a, perm)
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        k = z_s.shape[1]
        if y.dim() != 1:
            target = y.to(z_s.dtype)
        elif mix is not None:
            target = mixed_targets(y, k, *mix).to(z_s.dtype)
        else:
            target = F.one_hot(y, k).to(z_s.dtype)
        ce, kd = L.std_kd_parts(z_s, z_t, target)
        out = self.combine(z_s, ce, kd, kd=kd)
        out["mixed"] = torch.tensor(float(mix is not None))
        return out


@register("ls_kd")
class LogitStandardKD(Distiller):
    """KD with logit standardisation (Sun et al., CVPR 2024; the authors' ``mdistiller`` KD with
    ``--logit-stand``): ``ce_weight·CE + kd_weight·T²·KL(softmax(ẑ_t/T) ‖ softmax(ẑ_s/T))`` with
    ``ẑ = (z − mean) / (1e-7 + std)`` per sample (:func:`bsnn.distill.losses.ls_kd_loss`).

    Published (the authors' README, CIFAR-100): ``--base-temp 2 --kd-weight 9``, CE weight 0.1 (mdistiller's
    default). Authors' code: sunshangquan/logit-standardization-KD ``mdistiller/distillers/KD.py``.
    """

    default_ce_weight = 0.1
    default_kd_weight = 9.0
    default_temperature = 2.0

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        kd = L.ls_kd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), kd, ls_kd=kd)


@register("logit_mse")
class LogitMSE(Distiller):
    """Logit matching (Ba & Caruana 2014): ``ce_weight·CE + kd_weight·mean_b ½‖z_s − z_t‖²``, the infinite-
    temperature limit of KD (Hinton 2015 §2.1; :func:`bsnn.distill.losses.logit_mse_loss`).

    Published: regression on the teacher's logits alone (CE weight 0, weight 1). No authors' code is followed.
    """

    default_ce_weight = 0.0
    default_kd_weight = 1.0

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        mse = L.logit_mse_loss(z_s, z_t)
        return self.combine(z_s, self.ce(z_s, y), mse, logit_mse=mse)
