"""Feature-based methods: fitnet, at, sp, rkd, pkt, crd, nst, cc, vid.

Features are read through forward hooks on named layers (``cfg.params``: ``student_layer`` / ``teacher_layer``,
each a module name or a list of names paired in order; ``"name:in"`` taps a module's input). By default both
sides use the input of their last ``nn.Linear`` (penultimate features); AT defaults to the output of the last
``nn.Conv2d``. When only ``student_layer`` is given, the teacher uses the same names.

Methods with projection heads (FitNet regressors, CRD embeddings) create them in ``__init__`` from one probe
forward (eval mode, ``no_grad``, zeros input: no BatchNorm statistics or RNG touched), so the heads exist before
``fit`` builds its optimiser. The probe input is ``example_input`` (a keyword of :func:`build_distiller`), else
``cfg.params['input_shape']`` (``[C, H, W]``), else a guessed image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, register
from bsnn.distill.hooks import FeatureTap, as_layer_list, default_layer, model_device, probe_features
from bsnn.errors import ConfigError

_LAYER_PARAMS = {"student_layer": None, "teacher_layer": None, "input_shape": None}


class FeatureDistiller(Distiller):
    """Base for hook-based feature methods: resolves ``student_layers`` / ``teacher_layers``.

    ``loss = ce_weight·CE + kd_weight·Σ_pairs feature_loss(f_s, f_t)``.
    """

    spatial = False  # default layer: last conv output (True) or penultimate features (False)
    param_defaults = dict(_LAYER_PARAMS)

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        s_layers, t_layers = self.resolve_layers(as_layer_list(self.hparams["student_layer"]),
                                                 as_layer_list(self.hparams["teacher_layer"]))
        if len(s_layers) != len(t_layers):
            raise ConfigError(f"distill.params: student_layer has {len(s_layers)} layers but teacher_layer has "
                              f"{len(t_layers)}; they are paired in order")
        FeatureTap(student, s_layers, "student")  # validates the names now
        FeatureTap(self.teachers[0], t_layers, "teacher")
        self.student_layers, self.teacher_layers = s_layers, t_layers

    def resolve_layers(self, s_layers: list | None, t_layers: list | None) -> tuple[list, list]:
        """The paired (student, teacher) layer names from ``distill.params`` (None = not given): the default is the
        last conv output (``spatial``) or the penultimate features; a missing teacher list pairs the student's."""
        if s_layers is None:
            s_layers = [default_layer(self.student, "student", self.spatial)]
            if t_layers is None:
                t_layers = [default_layer(self.teachers[0], "teacher", self.spatial)]
        return s_layers, (list(s_layers) if t_layers is None else t_layers)

    def probe(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Feature tensors of one probe forward through student and teacher (see module docstring)."""
        shape = self.hparams.get("input_shape")
        f_s = probe_features(self.student, self.student_layers, "student", self._example_input, shape)
        f_t = probe_features(self.teachers[0], self.teacher_layers, "teacher", self._example_input, shape)
        return f_s, f_t

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """``(student logits, student features, teacher features)`` for one batch."""
        _, f_t = self.teacher_forward(x, self.teacher_layers)
        z_s, f_s = self.student_forward(x, self.student_layers)
        return z_s, f_s, f_t

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, f_s, f_t = self.features(x)
        term = sum(self.pair_loss(i, a, b) for i, (a, b) in enumerate(zip(f_s, f_t)))
        return self.combine(z_s, self.ce(z_s, y), term, **{self.method_name: term})


def _regressor(f_s: torch.Tensor, f_t: torch.Tensor) -> nn.Module:
    if f_s.dim() == 4 and f_t.dim() == 4:
        return nn.Conv2d(f_s.shape[1], f_t.shape[1], kernel_size=1)
    return nn.Linear(f_s[0].numel(), f_t[0].numel())


@register("fitnet")
class FitNet(FeatureDistiller):
    """FitNet hints (Romero 2015): ``MSE(regressor(f_s), f_t)`` per layer pair.

    The regressor is a 1x1 conv for ``[B, C, H, W]`` pairs (then the larger map is average-pooled to the smaller
    size) and a linear layer on flattened features otherwise; regressors are trained with the student.
    Params: ``student_layer``, ``teacher_layer``, ``input_shape``. Published weights: CE 1, hint 100.
    Loss and weight as HobbitLong/RepDistiller ``distiller_zoo/FitNet.py`` ``HintLoss`` (its regressor: ``ConvReg``).
    """

    default_kd_weight = 100.0

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        f_s, f_t = self.probe()
        device, dtype = model_device(student)
        self.regressors = nn.ModuleList([_regressor(a, b) for a, b in zip(f_s, f_t)]).to(device, dtype)

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        reg = self.regressors[i]
        if isinstance(reg, nn.Conv2d):
            f_s, f_t = L.pool_to_common(reg(f_s), f_t)
            return L.fitnet_loss(f_s, f_t)
        return L.fitnet_loss(reg(f_s.flatten(1)), f_t.flatten(1))


@register("at")
class AT(FeatureDistiller):
    """Attention transfer (Zagoruyko 2017): ``Σ_pairs mean((q_s − q_t)²)``, ``q = normalize(mean_c |f|^p)``.

    Needs ``[B, C, H, W]`` features (default: output of the last ``nn.Conv2d``; naming the block's activation,
    e.g. ``relu3``, is closer to the paper). Params: ``p`` (2), ``student_layer``, ``teacher_layer``.
    Published weights: CE 1, AT 1000. Code followed: HobbitLong/RepDistiller ``distiller_zoo/AT.py``.
    """

    spatial = True
    default_kd_weight = 1000.0
    param_defaults = {**_LAYER_PARAMS, "p": 2.0}

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if f_s.dim() != 4 or f_t.dim() != 4:
            raise ConfigError(f"at: layers {self.student_layers[i]!r} / {self.teacher_layers[i]!r} must give "
                              f"[B, C, H, W] maps, got {tuple(f_s.shape)} / {tuple(f_t.shape)}")
        return L.at_loss(f_s, f_t, self.hparams["p"])


@register("sp")
class SP(FeatureDistiller):
    """Similarity-preserving KD (Tung & Mori 2019): ``Σ_pairs ‖G_t − G_s‖²_F / B²``.

    Params: ``student_layer``, ``teacher_layer``. Published weights: CE 1, SP 3000.
    Code followed: HobbitLong/RepDistiller ``distiller_zoo/SP.py``.
    """

    default_kd_weight = 3000.0

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return L.sp_loss(f_s, f_t)


@register("rkd")
class RKD(FeatureDistiller):
    """Relational KD (Park 2019): ``distance_weight·distance + angle_weight·angle`` per layer pair.

    Params: ``distance_weight`` (25), ``angle_weight`` (50), ``student_layer``, ``teacher_layer``.
    Published weights: CE 1, RKD 1. Code followed: HobbitLong/RepDistiller ``distiller_zoo/RKD.py`` ``RKDLoss``.
    """

    param_defaults = {**_LAYER_PARAMS, "distance_weight": 25.0, "angle_weight": 50.0}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, f_s, f_t = self.features(x)
        dist = sum(L.rkd_distance_loss(a, b) for a, b in zip(f_s, f_t))
        angle = sum(L.rkd_angle_loss(a, b) for a, b in zip(f_s, f_t))
        term = self.hparams["distance_weight"] * dist + self.hparams["angle_weight"] * angle
        return self.combine(z_s, self.ce(z_s, y), term, rkd_distance=dist, rkd_angle=angle)


@register("pkt")
class PKT(FeatureDistiller):
    """Probabilistic knowledge transfer (Passalis 2018): KL between cosine-similarity distributions.

    Params: ``student_layer``, ``teacher_layer``. Published weights: CE 1, PKT 30000.
    Code followed: HobbitLong/RepDistiller ``distiller_zoo/PKT.py``.
    """

    default_kd_weight = 30000.0

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return L.pkt_loss(f_s, f_t)


class Embed(nn.Module):
    """CRD embedding: ``normalize(Linear(flatten(f)))``: ``[B, ...]`` -> ``[B, feat_dim]``."""

    def __init__(self, in_dim: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, feat_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(f.flatten(1)), dim=1)


@register("crd")
class CRD(FeatureDistiller):
    """Contrastive representation distillation (Tian 2020), memory bank + NCE in both directions.

    Student and teacher features (one layer pair, default penultimate) are embedded to ``feat_dim`` and
    L2-normalised. Two memory banks ``[n_data, feat_dim]`` (buffers: checkpointed with the distiller) hold
    momentum averages of past embeddings; each sample is contrasted against its own bank row (positive, found
    by the dataset ``index``) and ``nce_k`` uniformly drawn rows (negatives):
    ``crd = NCE(student emb vs teacher bank) + NCE(teacher emb vs student bank)`` with scores
    ``exp(⟨·,·⟩/nce_t)/Z`` (Z fixed from the first batch). The teacher embedding head is trained, the teacher not.
    Banks are updated in training mode only.

    Needs the dataset index of every sample: the loader must yield ``(x, y, index)``
    (see :class:`bsnn.distill.IndexedDataset`). ``n_data`` comes from ``cfg.params['n_data']`` or the
    ``n_data`` keyword of :func:`build_distiller`.

    Params: ``n_data``, ``feat_dim`` (128), ``nce_k`` (16384, capped at n_data − 1), ``nce_t`` (0.07),
    ``nce_momentum`` (0.5), ``student_layer``, ``teacher_layer``, ``input_shape``.
    Published weights: CE 1, CRD 0.8. Authors' code: HobbitLong/RepDistiller ``crd/criterion.py``.
    """

    needs_index = True
    default_kd_weight = 0.8
    param_defaults = {**_LAYER_PARAMS, "n_data": None, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                      "nce_momentum": 0.5}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) != 1:
            raise ConfigError("crd: give exactly one student_layer / teacher_layer pair")
        n_data = self.hparams["n_data"] if self.hparams["n_data"] is not None else self._n_data
        if n_data is None or int(n_data) < 2:
            raise ConfigError("crd needs the training-set size: set distill.params.n_data=<number of training "
                              f"samples> (>= 2), got {n_data!r}")
        self.n_data = int(n_data)
        self.nce_k = max(1, min(int(self.hparams["nce_k"]), self.n_data - 1))
        dim = int(self.hparams["feat_dim"])
        (f_s,), (f_t,) = self.probe()
        device, dtype = model_device(student)
        self.embed_s = Embed(f_s[0].numel(), dim).to(device, dtype)
        self.embed_t = Embed(f_t[0].numel(), dim).to(device, dtype)
        stdv = 1.0 / math.sqrt(dim / 3.0)
        self.register_buffer("memory_s", (torch.rand(self.n_data, dim, device=device, dtype=dtype) * 2 - 1) * stdv)
        self.register_buffer("memory_t", (torch.rand(self.n_data, dim, device=device, dtype=dtype) * 2 - 1) * stdv)
        self.register_buffer("z_norm", torch.full((2,), -1.0, device=device))

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        if index is None:
            raise ConfigError("crd needs the dataset index of every sample: the training loader must yield "
                              "(x, y, index) batches (wrap the dataset in bsnn.distill.IndexedDataset)")
        z_s, (f_s,), (f_t,) = self.features(x)
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        index = index.to(self.memory_s.device).long().view(-1)
        b = index.shape[0]
        idx = torch.randint(0, self.n_data, (b, self.nce_k + 1), device=index.device)
        idx[:, 0] = index
        t = float(self.hparams["nce_t"])
        out_s = L.bank_contrast_scores(v_s, self.memory_t.detach(), idx, t)  # student emb vs teacher bank
        out_t = L.bank_contrast_scores(v_t, self.memory_s.detach(), idx, t)  # teacher emb vs student bank
        if bool((self.z_norm < 0).any()):
            with torch.no_grad():
                self.z_norm.copy_(torch.stack([out_s.mean(), out_t.mean()]) * self.n_data)
        out_s, out_t = out_s / self.z_norm[0], out_t / self.z_norm[1]
        crd_s, crd_t = L.nce_loss(out_s, self.n_data), L.nce_loss(out_t, self.n_data)
        if self.training:
            self._update_memory(index, v_s.detach(), v_t.detach())
        crd = crd_s + crd_t
        return self.combine(z_s, self.ce(z_s, y), crd, crd=crd, crd_student=crd_s, crd_teacher=crd_t)

    @torch.no_grad()
    def _update_memory(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        m = float(self.hparams["nce_momentum"])
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = F.normalize(bank[index] * m + v.to(bank.dtype) * (1.0 - m), dim=1)
            bank.index_copy_(0, index, rows)


@register("nst")
class NST(FeatureDistiller):
    """Neuron selectivity transfer (Huang & Wang 2017): ``Σ_pairs MMD²_poly2(f_s, f_t)`` over the channels' spatial
    maps (:func:`bsnn.distill.losses.nst_loss`, HobbitLong/RepDistiller's ``NSTLoss``).

    Needs ``[B, C, H, W]`` maps (default: output of the last ``nn.Conv2d``; RepDistiller pairs every intermediate
    block output: give them as lists). Params: ``student_layer``, ``teacher_layer``. Published weights
    (RepDistiller): CE 1, NST 50.
    """

    spatial = True
    default_kd_weight = 50.0

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if f_s.dim() != 4 or f_t.dim() != 4:
            raise ConfigError(f"nst: layers {self.student_layers[i]!r} / {self.teacher_layers[i]!r} must give "
                              f"[B, C, H, W] maps, got {tuple(f_s.shape)} / {tuple(f_t.shape)}")
        return L.nst_loss(f_s, f_t)


class LinearEmbed(nn.Module):
    """RepDistiller's ``LinearEmbed``: ``Linear(flatten(f))`` (not normalised), ``[B, ...]`` -> ``[B, feat_dim]``."""

    def __init__(self, in_dim: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, feat_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f.flatten(1))


@register("cc")
class CC(FeatureDistiller):
    """Correlation congruence (Peng et al. 2019), as HobbitLong/RepDistiller runs it: penultimate features of both
    networks embedded by trainable linear heads (``feat_dim``, both trained with the student), then
    :func:`bsnn.distill.losses.cc_loss` on the pair.

    Params: ``feat_dim`` (128), ``student_layer``, ``teacher_layer``, ``input_shape``. Published weights
    (RepDistiller): CE 1, CC 0.02.
    """

    default_kd_weight = 0.02
    param_defaults = {**_LAYER_PARAMS, "feat_dim": 128}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) != 1:
            raise ConfigError("cc: give exactly one student_layer / teacher_layer pair")
        (f_s,), (f_t,) = self.probe()
        device, dtype = model_device(student)
        dim = int(self.hparams["feat_dim"])
        self.embed_s = LinearEmbed(f_s[0].numel(), dim).to(device, dtype)
        self.embed_t = LinearEmbed(f_t[0].numel(), dim).to(device, dtype)

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return L.cc_loss(self.embed_s(f_s), self.embed_t(f_t))


class VIDHead(nn.Module):
    """VID's regressor (three 1x1 convs, no bias, ReLU between; mid channels = the teacher's, as RepDistiller's
    ``VIDLoss(s, t, t)``) and per-channel ``log_scale`` initialised so that the variance starts at
    ``init_pred_var`` (5)."""

    def __init__(self, c_s: int, c_t: int, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.ReLU(), nn.Conv2d(c_t, c_t, 1, bias=False),
                                       nn.ReLU(), nn.Conv2d(c_t, c_t, 1, bias=False))
        self.log_scale = nn.Parameter(math.log(math.exp(init_pred_var - eps) - 1.0) * torch.ones(c_t))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = L.pool_to_square(f_s, f_t)
        return L.vid_loss(self.regressor(f_s), f_t, self.log_scale, self.eps)


@register("vid")
class VID(FeatureDistiller):
    """Variational information distillation (Ahn et al. 2019), as HobbitLong/RepDistiller runs it:
    ``Σ_pairs NLL_Gauss(f_t | regressor(f_s), σ²)`` with trainable regressors and variances (:class:`VIDHead`,
    :func:`bsnn.distill.losses.vid_loss`).

    Needs ``[B, C, H, W]`` maps (default: the last ``nn.Conv2d`` output; RepDistiller pairs every intermediate block
    output). Params: ``init_pred_var`` (5), ``student_layer``, ``teacher_layer``, ``input_shape``. Published weights
    (RepDistiller): CE 1, VID 1.
    """

    spatial = True
    param_defaults = {**_LAYER_PARAMS, "init_pred_var": 5.0}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        f_s, f_t = self.probe()
        for i, (a, b) in enumerate(zip(f_s, f_t)):
            if a.dim() != 4 or b.dim() != 4:
                raise ConfigError(f"vid: layers {self.student_layers[i]!r} / {self.teacher_layers[i]!r} must give "
                                  f"[B, C, H, W] maps, got {tuple(a.shape)} / {tuple(b.shape)}")
        device, dtype = model_device(student)
        self.heads = nn.ModuleList([VIDHead(a.shape[1], b.shape[1], float(self.hparams["init_pred_var"]))
                                    for a, b in zip(f_s, f_t)]).to(device, dtype)

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.heads[i](f_s, f_t)
