"""Multi-model methods: takd, ca_mkd (several frozen teachers), dml and bd_kd (networks trained together).

The pipeline (:mod:`bsnn.pipeline`) supplies the extra models: ``model.teachers`` for ``ca_mkd``,
``model.assistants`` for ``takd`` (the whole chain: :func:`bsnn.pipeline.takd_chain`), a freshly initialised
``model.teacher`` trained online for ``bd_kd``.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn.binary import clamp_latent_
from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, register, teacher_list, unfreeze_
from bsnn.distill.hooks import global_pool_head, last_module_name, model_device, probe_features
from bsnn.errors import ConfigError
from bsnn.models import create_model


@register("takd")
class TAKD(Distiller):
    """Teacher-assistant KD (Mirzadeh 2020), one step of the chain teacher -> assistant(s) -> student.

    ``teacher`` is the chain ``[teacher, assistant_1, ..., assistant_n]`` (already trained; a single model is
    one step of the chain); the student learns from the last one with the authors' loss
    ``ce_weight·CE + kd_weight·T²·nn.KLDivLoss()(log p_s, p_t)`` — the element-wise mean, i.e. the KD term
    divided by the number of classes (:func:`bsnn.distill.losses.takd_loss`). The authors tune λ (weights
    1 − λ, λ) and T per setting by search; the defaults here are KD's 0.1 / 0.9 and T = 4. The pipeline trains the
    whole chain (``model.assistants``, :func:`bsnn.pipeline.takd_chain`) and refuses ``takd`` without assistants.
    Authors' code: imirzadeh/Teacher-Assistant-Knowledge-Distillation ``train.py``.
    """

    default_ce_weight = 0.1
    default_kd_weight = 0.9
    uses_assistants = True

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t, _ = self.teacher_forward(x, teacher=self.teachers[-1])
        z_s = self.student(x)
        kd = L.takd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), kd, kd=kd)


def _resize_to(f: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """CA-MKD's spatial matching: average-pool down or bilinearly upsample ``f`` to ``ref``'s ``H × W``."""
    if f.shape[-2:] == ref.shape[-2:]:
        return f
    if f.shape[-2] >= ref.shape[-2]:
        return F.adaptive_avg_pool2d(f, ref.shape[-2:])
    return F.interpolate(f, size=ref.shape[-2:], mode="bilinear")


def _embed(f_s: torch.Tensor, f_t: torch.Tensor) -> nn.Module:
    """CA-MKD's Embed: 1x1 conv + BN + ReLU for maps; its vector analogue (Linear + BN1d + ReLU) otherwise."""
    if f_s.dim() == 4:
        return nn.Sequential(nn.Conv2d(f_s.shape[1], f_t.shape[1], 1), nn.BatchNorm2d(f_t.shape[1]), nn.ReLU())
    return nn.Sequential(nn.Linear(f_s.shape[1], f_t.shape[1]), nn.BatchNorm1d(f_t.shape[1]), nn.ReLU())


@register("ca_mkd")
class CAMKD(Distiller):
    """Confidence-aware multi-teacher KD (Zhang 2022, the authors' ``loops.py`` with ``--distill inter``).

    ``ce_weight·CE + kd_weight·(kd + feature_weight·feature)`` with M >= 2 frozen teachers:

    * ``kd = Σ_k Σ_b w_kb · T²·KL(p_t^k ‖ p_s)_b / (B·M)``, ``w_k = (1 − softmax_k(CE(z_t^k, y))) / (M − 1)``
      (:func:`bsnn.distill.losses.ca_mkd_loss`);
    * ``feature``: the student's last features, transformed for each teacher by a trained Embed (1x1 conv + BN +
      ReLU), are matched to that teacher's by MSE, weighted as above but with the CE of the teacher's own head
      applied to the transformed features (with gradients, as in the authors' code;
      :func:`bsnn.distill.losses.ca_mkd_feature_loss`). Features: the map before the global average pool when
      the student and every teacher end ``global-average-pool -> Linear`` (the authors' ``feat[-2]``, head =
      pool + fc), else the inputs of the last ``nn.Linear`` (head = that Linear; Embed = Linear + BN1d + ReLU).
      A student map larger than the teacher's is average-pooled, a smaller one bilinearly upsampled (the authors
      resize the student map in place teacher after teacher; here each teacher resizes the original).

    The authors leave the feature term out in the first of 240 epochs; ``feature_delay`` None keeps that fraction
    (``epochs / 240`` epochs without it, so none in runs shorter than 240 epochs).

    Params: ``feature_weight`` (50; 0 = the logit-only CA-MKD), ``feature_delay`` (None), ``input_shape``.
    Published: CE 1, KD 1, β = 50, T = 4.
    Authors' code: Rorozhl/CA-MKD ``helper/loops.py`` and ``distiller_zoo/CAMKD.py``.
    """

    min_teachers = 2
    teacher_hint = "; list the others in model.teachers (ca_mkd distils from [model.teacher, *model.teachers])"
    param_defaults = {"feature_weight": 50.0, "feature_delay": None, "input_shape": None}
    schedule_defaults = {"feature_delay": (1, 240)}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        self.embeds = nn.ModuleList()
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self.__dict__["heads"] = []
        if float(self.hparams["feature_weight"]) == 0:
            return
        shape = self.hparams["input_shape"]
        models = [student, *self.teachers]
        roles = ["student"] + [f"teacher {i}" for i in range(len(self.teachers))]
        pooled = [global_pool_head(m, r, self._example_input, shape) for m, r in zip(models, roles)]
        maps = all(head is not None for head in pooled)  # else the inputs of the last nn.Linear
        specs, fcs = [], []
        for m, role, head in zip(models, roles, pooled):
            fc = head[1] if maps else last_module_name(m, nn.Linear)
            if fc is None:
                raise ConfigError(f"ca_mkd: the {role} has no nn.Linear classifier; set "
                                  "distill.params.feature_weight=0 for the logit-only CA-MKD")
            specs.append(head[0] + ":in" if maps else fc + ":in")
            fcs.append(fc)
        self.student_layers, self.teacher_layers = specs[:1], specs[1:]
        self.__dict__["heads"] = [dict(t.named_modules())[fc] for t, fc in zip(self.teachers, fcs[1:])]
        (f_s,) = probe_features(student, self.student_layers, "student", self._example_input, shape)
        device, dtype = model_device(student)
        for t, spec, role in zip(self.teachers, self.teacher_layers, roles[1:]):
            (f_t,) = probe_features(t, [spec], role, self._example_input, shape)
            self.embeds.append(_embed(f_s, f_t).to(device, dtype))

    def feature_active(self) -> bool:
        """False during the first ``feature_delay`` epochs (and when ``feature_weight`` is 0)."""
        if not self.embeds:
            return False
        return self.progress is None or self.progress >= float(self.hparams["feature_delay"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        tap = self.feature_active()
        outs = [self.teacher_forward(x, [self.teacher_layers[i]] if tap else [], teacher=t)
                for i, t in enumerate(self.teachers)]
        z_ts = [o[0] for o in outs]
        z_s, f_s = self.student_forward(x, self.student_layers if tap else [])
        kd = L.ca_mkd_loss(z_s, z_ts, y, self.temperature)
        w = L.ca_mkd_weights(z_ts, y)
        parts = {"kd": kd, "teacher_weights": w.mean(dim=1)}
        term = kd
        if tap:
            trans, f_ts, heads = [], [], []
            for embed, head, (_, (f_t,)) in zip(self.embeds, self.heads, outs):
                t = embed(_resize_to(f_s[0], f_t) if f_t.dim() == 4 else f_s[0])
                trans.append(t)
                f_ts.append(f_t)
                heads.append(F.linear(t.mean(dim=(2, 3)) if t.dim() == 4 else t, head.weight, head.bias))
            feature = L.ca_mkd_feature_loss(trans, f_ts, heads, y)
            term = kd + float(self.hparams["feature_weight"]) * feature
            parts["feature"] = feature
        return self.combine(z_s, self.ce(z_s, y), term, **parts)


def _reset_parameters_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(model, "reset_parameters"):
        model.reset_parameters()
    return model


def _peer_from_name(student: nn.Module, name: str, kwargs: dict | None) -> nn.Module:
    """A registered model ``name`` with the student's ``num_classes`` (last Linear) and ``in_channels``."""
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
    ({}), ``reinit`` (True). Published: CE 1, KL 1, T = 1 (the paper's plain softmax).
    Authors' code: YingZhangDUT/Deep-Mutual-Learning ``train_models.py`` (TensorFlow; it sums the KL over the
    peers, the same with one peer, and steps the networks one after another).
    """

    needs_teacher = False
    default_temperature = 1.0
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
            unfreeze_(p.train(student.training))
        self.peers = nn.ModuleList(peers).to(device)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        if self.training:
            clamp_latent_(self.peers)
        zs = [self.student(x)] + [p(x) for p in self.peers]
        ces, kls = [], []
        for i, z_i in enumerate(zs):
            ces.append(self.ce(z_i, y))
            kls.append(sum(L.kd_loss(z_i, z_j.detach(), self.temperature) for j, z_j in enumerate(zs) if j != i)
                       / (len(zs) - 1))
        loss = sum(self.ce_weight * c + self.kd_weight * k for c, k in zip(ces, kls))
        return {"loss": loss, "ce": ces[0].detach(), "kl": kls[0].detach(),
                "peer_ce": torch.stack(ces[1:]).mean().detach(), "peer_kl": torch.stack(kls[1:]).mean().detach(),
                "logits": zs[0]}


@register("bd_kd")
class BDKD(Distiller):
    """BD-KD (Amara 2022): online KD, the (larger) teacher trained together with the student.

    * student: ``ce_weight·CE(z_s, y) + kd_weight·mean_b [w_fwd·T²KL(p_t ‖ p_s) + w_rev·T²KL(p_s ‖ p_t)]`` with
      sample-wise weights from the teacher–student entropy gap (:func:`bsnn.distill.losses.balanced_kl_weights`;
      teacher detached);
    * teacher: ``ce_weight·CE(z_t, y) + teacher_kd_weight·T²KL(p_s ‖ p_t)`` (the paper's reverse KL as the teacher's
      regulariser; student detached).

    The loss is their sum, so one optimiser step trains both: the teacher is a submodule (``parameters()``,
    ``state_dict()``), in train mode with the distiller. ``teacher`` must be exactly one network; the pipeline
    gives a freshly initialised ``model.teacher`` (the paper trains both from scratch). No authors' code is
    public: the weighting follows bsnn's reading of the paper (see :func:`~bsnn.distill.losses.balanced_kl_weights`).
    Params: ``teacher_kd_weight`` (1). Defaults: CE 1, KD 1, T = 4.
    """

    trains_teacher = True
    param_defaults = {"teacher_kd_weight": 1.0}

    def __init__(self, student, teacher, cfg, **context) -> None:
        online = teacher_list(teacher)
        if len(online) != 1:
            raise ConfigError(f"bd_kd trains one teacher online with the student; give exactly one teacher network "
                              f"(model.teacher), got {len(online)}")
        super().__init__(student, teacher, cfg, **context)
        self.online_teacher = online[0]
        device = next(iter(student.parameters()), torch.empty(0)).device
        unfreeze_(self.online_teacher.to(device).train(student.training))

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        t = self.temperature
        z_s = self.student(x)
        z_t = self.online_teacher(x)
        kd_s = L.balanced_kd_loss(z_s, z_t.detach(), t)
        kd_t = L.reverse_kd_loss(z_s.detach(), z_t, t)
        ce_s, ce_t = self.ce(z_s, y), self.ce(z_t, y)
        loss = (self.ce_weight * ce_s + self.kd_weight * kd_s
                + self.ce_weight * ce_t + float(self.hparams["teacher_kd_weight"]) * kd_t)
        return {"loss": loss, "ce": ce_s.detach(), "kd": kd_s.detach(), "teacher_ce": ce_t.detach(),
                "teacher_kd": kd_t.detach(), "logits": z_s}
