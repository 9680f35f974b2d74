"""Classic feature methods with method-owned heads or an initialisation phase: ab, ft, fsp, irg, reviewkd.

Each method restates its authors' code (repository and file in its docstring) as pure loss functions here plus a
registered :class:`~bsnn.distill.base.Distiller`; the heads they train (AB connectors, FT paraphraser and
translator, ReviewKD's ABF fusion) are submodules of the distiller, so ``fit`` trains and checkpoints them and
the exported student stays a plain network.

**Initialisation phase** (ab, fsp, ft). The authors train these methods in two stages: an initialisation stage
on the distillation loss alone (RepDistiller's ``helper/pretrain.py:init``, ``--init_epochs 30``), then the
ordinary classification training. Here both stages are one run: while ``progress < init_epochs`` (epochs passed,
fractions included, :meth:`Distiller.set_progress`; ``init_epochs`` as fitted to the run, so 30 of 270 epochs in a
one-epoch run is its first 11 %) the loss is the initialisation loss only; afterwards it is the second stage's
loss. ``init_epochs`` left at None is the published 30 epochs of the
authors' 30 + 240 (the same fraction of the run). A distiller never told its epoch (no ``set_epoch``) is past the
initialisation, as DKD's warm-up is. Differences from the authors: one optimiser and learning-rate schedule
covers both stages (the authors start a fresh SGD for each), and the initialisation epochs are part of the run.

**Default layers.** Where the authors tap the end of every stage, the defaults are the *stage ends* found by one
probe forward: the last ``nn.ReLU`` at each spatial resolution (its output; ``:in``, its input, for the
pre-activation maps AB and ReviewKD's teacher use). Name layers in ``distill.params`` (``student_layer`` /
``teacher_layer``, lists paired in order) to choose others.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn.distill import losses as L
from bsnn.distill.base import register
from bsnn.distill.feature import FeatureDistiller
from bsnn.distill.hooks import FeatureTap, default_layer, global_pool_head, model_device, probe_features
from bsnn.errors import ConfigError

_LAYER_PARAMS = {"student_layer": None, "teacher_layer": None, "input_shape": None}
_INIT_SCHEDULE = {"init_epochs": (30, 270)}  # RepDistiller: 30 init epochs, then 240 epochs of training


# ----------------------------------------------------------------------------------------------- pure losses


def as_map(f: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` unchanged; ``[B, C]`` -> ``[B, C, 1, 1]`` (a pooled vector as a 1x1 map)."""
    if f.dim() == 2:
        return f[:, :, None, None]
    if f.dim() != 4:
        raise ConfigError(f"expected a [B, C, H, W] map or a [B, C] vector, got shape {tuple(f.shape)}")
    return f


def ab_alternative_l2(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """AB's alternative loss (Heo et al. 2019, bhheo/AB_distillation ``criterion_alternative_L2``), summed:
    ``Σ (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0]`` over every element of the student's connected
    pre-activation ``source`` and the teacher's ``target`` (same shape)."""
    off = ((source > -margin) & (target <= 0)).to(source.dtype)
    on = ((source <= margin) & (target > 0)).to(source.dtype)
    return ((source + margin) ** 2 * off + (source - margin) ** 2 * on).sum()


def ab_loss(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """AB initialisation loss over ``n`` layer pairs (shallow to deep): layer ``i`` weighted ``2^(i − n + 1)`` (the
    deepest 1, halving towards the input), each divided by the batch size, all times ``3 / 1000`` (the authors'
    CIFAR script; RepDistiller's ``ABLoss``)."""
    n, b = len(sources), sources[0].shape[0]
    return sum(2.0 ** (i - n + 1) * ab_alternative_l2(s, t, margin) / b * 3.0 / 1000.0
               for i, (s, t) in enumerate(zip(sources, targets)))


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """FSP (Yim et al. 2017) Gram matrix between two maps of one network, RepDistiller's ``FSP.compute_fsp``:
    the larger map is average-pooled to the other's ``(H, H)``, then ``G[b, j, i] = mean_hw top_j · bottom_i``.

    Args:
        bottom: ``[B, C1, H1, W1]`` (the earlier layer).
        top: ``[B, C2, H2, W2]`` (the later layer).

    Returns:
        ``[B, C2, C1]``.
    """
    bottom, top = L.pool_to_square(bottom, top)
    return torch.einsum("bin,bjn->bji", bottom.flatten(2), top.flatten(2)) / bottom[0, 0].numel()


def fsp_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_i mean((G_s,i − G_t,i)²)`` over the FSP matrices of consecutive layers ``(g[i], g[i+1])``
    (RepDistiller's ``FSP`` loss group, summed as its ``init`` does)."""
    return sum(((fsp_matrix(g_s[i], g_s[i + 1]) - fsp_matrix(g_t[i], g_t[i + 1])) ** 2).mean()
               for i in range(len(g_s) - 1))


def ft_factor(f: torch.Tensor, p1: float = 2.0) -> torch.Tensor:
    """FT's factor map: ``normalize(mean_c f^p1)``, ``[B, C, H, W]`` -> ``[B, H·W]`` (RepDistiller ``FT.factor``)."""
    return F.normalize(f.pow(p1).mean(1).flatten(1))


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p1: float = 2.0, p2: float = 1.0) -> torch.Tensor:
    """Factor transfer (Kim et al. 2018), RepDistiller's ``FactorTransfer.factor_loss``: the larger map pooled to
    the other's size, then ``mean |φ_s − φ_t|`` (``p2 = 1``) or ``mean (φ_s − φ_t)^p2`` of the factor maps
    (:func:`ft_factor`) of the translator's ``factor_s`` and the paraphraser's ``factor_t`` (``[B, C, H, W]``)."""
    factor_s, factor_t = L.pool_to_square(factor_s, factor_t)
    diff = ft_factor(factor_s, p1) - ft_factor(factor_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def caffe_euclidean_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Caffe's ``EuclideanLoss``: ``Σ (a − b)² / (2·N)``, ``N`` the size of dim 0 of the blobs."""
    return ((a - b) ** 2).sum() / (2.0 * a.shape[0])


def irg_edge_map(f: torch.Tensor) -> torch.Tensor:
    """IRG edges (Liu et al. 2019) as the authors' Caffe ``BatchEuclideanMap`` layer (yufanLIU/IRG
    ``batch_euclidean_map_layer.cpp``): squared distances ``‖f_i − f_j‖²`` divided by their maximum, ``[B, D]`` ->
    ``[B, B]``.

    The gradient is the layer's hand-written backward: the maximum is a constant and each distance back-propagates
    only into its row sample ``f_i``, i.e. half of the exact gradient for the symmetric loss IRG puts on the map
    (``0.5·D + 0.5·D.detach()`` has the layer's value and gradient).
    """
    sq = f.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * f @ f.t()).clamp(min=0.0)
    d = d * (1.0 - torch.eye(len(f), dtype=f.dtype, device=f.device))
    d = d / d.detach().max()
    return 0.5 * d + 0.5 * d.detach()


def irg_transform_vector(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """IRG transformation as the authors' Caffe ``BatchEuclideanVector``: ``‖f1_n − f2_n‖²`` per sample divided
    by their maximum (a constant in the backward), ``[B, D]`` x ``[B, D]`` -> ``[B]``."""
    d = (f1 - f2).pow(2).sum(1)
    return d / d.detach().max()


def irg_loss(e_s: torch.Tensor, e_t: torch.Tensor, pairs_s: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
             pairs_t: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
    """IRG edge loss on pooled vectors ``e_s`` ``[B, D_s]`` / ``e_t`` ``[B, D_t]`` plus one transformation loss per
    ``(earlier, later)`` pair of pooled vectors of each network, each a Caffe ``EuclideanLoss`` (unweighted: the
    authors weight every term 0.005, the method's ``kd_weight``)."""
    loss = caffe_euclidean_loss(irg_edge_map(e_t), irg_edge_map(e_s))
    for (a_s, b_s), (a_t, b_t) in zip(pairs_s, pairs_t):
        v_s, v_t = irg_transform_vector(b_s, a_s), irg_transform_vector(b_t, a_t)
        loss = loss + caffe_euclidean_loss(v_t[None], v_s[None])  # the Caffe blob is [1, 1, 1, B]: N = 1
    return loss


def hcl_loss(f_s: Sequence[torch.Tensor], f_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al. 2021, dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``
    ``hcl``): per level ``[B, C, H, W]``, ``MSE`` at full size plus ``MSE`` of both maps average-pooled to 4, 2
    and 1 (each size below ``H`` only), weighted 1, 1/2, 1/4, 1/8 and divided by the weights' sum."""
    total = 0.0
    for fs, ft in zip(f_s, f_t):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


# ------------------------------------------------------------------------------------------- default layers


def stage_ends(model: nn.Module, role: str = "model", pre_activation: bool = False, with_stem: bool = False,
               example_input: torch.Tensor | None = None, input_shape: Sequence[int] | None = None) -> list[str]:
    """Layer specs of the *stage ends*: the last ``nn.ReLU`` (registration order) at each spatial resolution of a
    probe forward, among ReLUs with ``[B, C, H, W]`` outputs; ``pre_activation`` taps their inputs (``name:in``),
    ``with_stem`` adds the first such ReLU (the stem, RepDistiller's ``feat[0]``) when it is not a stage end."""
    relus = [name for name, m in model.named_modules() if name and isinstance(m, nn.ReLU)]
    if relus:
        feats = probe_features(model, relus, role, example_input, input_shape)
        relus = [(name, tuple(f.shape[2:])) for name, f in zip(relus, feats) if f.dim() == 4]
    if not relus:
        raise ConfigError(f"{role} has no nn.ReLU with a [B, C, H, W] output to find its stage ends; name the layers "
                          "in distill.params (student_layer / teacher_layer)")
    ends = [name for i, (name, size) in enumerate(relus) if i + 1 == len(relus) or relus[i + 1][1] != size]
    if with_stem and relus[0][0] not in ends:
        ends.insert(0, relus[0][0])
    return [name + ":in" if pre_activation else name for name in ends]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode inside the block; every submodule's train/eval flag is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class ClassicFeatureDistiller(FeatureDistiller):
    """Base: layers from ``cfg.params`` or the method's :meth:`default_layers`; optional initialisation phase.

    ``init_phase`` methods declare ``init_epochs`` in :attr:`schedule_defaults`; :meth:`in_init` says whether the
    current epoch is in it.
    """

    def resolve_layers(self, s_layers: list | None, t_layers: list | None) -> tuple[list, list]:
        """The method's :meth:`default_layers` when no layers are given; a missing teacher list pairs the
        student's; teacher layers without student layers are refused."""
        if s_layers is None and t_layers is None:
            return self.default_layers()
        if s_layers is None:
            raise ConfigError(f"{self.method_name}: distill.params.teacher_layer is set but student_layer is not; "
                              "give student_layer too (paired in order)")
        return s_layers, (list(s_layers) if t_layers is None else t_layers)

    def _stage_ends(self, pre_s: bool, pre_t: bool, with_stem: bool = False) -> tuple[list[str], list[str]]:
        shape = self.hparams.get("input_shape")
        s = stage_ends(self.student, "student", pre_s, with_stem, self._example_input, shape)
        t = stage_ends(self.teachers[0], "teacher", pre_t, with_stem, self._example_input, shape)
        if len(s) != len(t):
            raise ConfigError(f"{self.method_name}: the student has {len(s)} stage ends ({', '.join(s)}) but the "
                              f"teacher {len(t)} ({', '.join(t)}); name the paired layers in distill.params "
                              "(student_layer / teacher_layer)")
        return s, t

    def default_layers(self) -> tuple[list[str], list[str]]:
        return [default_layer(self.student, "student")], [default_layer(self.teachers[0], "teacher")]

    @property
    def init_epochs(self) -> float:
        """Epochs of the initialisation phase (``params.init_epochs`` as fitted to the run, fractions kept)."""
        return float(self.hparams.get("init_epochs") or 0.0)

    def in_init(self) -> bool:
        """True while the run (:attr:`progress`, set by ``fit`` before every batch) is in the initialisation
        phase."""
        return self.progress is not None and self.progress < self.init_epochs

    def staged_forward(self, x: torch.Tensor, y: torch.Tensor, init_term) -> dict:
        """AB / FSP: in the initialisation phase ``loss = kd_weight · init_term(f_s, f_t)`` alone (CE logged, not
        trained); afterwards ``loss = ce_weight · CE`` (the authors' second stage, ``loss_kd = 0``)."""
        if not self.in_init():
            z_s = self.student(x)
            return self.combine(z_s, self.ce(z_s, y), z_s.new_zeros(()), init_phase=0.0)
        z_s, f_s, f_t = self.features(x)
        term = init_term(f_s, f_t)
        return {"loss": self.kd_weight * term, "ce": self.ce(z_s, y).detach(), self.method_name: term.detach(),
                "init_phase": 1.0, "logits": z_s}

    def _check_maps(self, feats: Sequence[torch.Tensor], role: str, layers: Sequence[str]) -> None:
        for name, f in zip(layers, feats):
            if f.dim() != 4:
                raise ConfigError(f"{self.method_name}: {role} layer {name!r} must give a [B, C, H, W] map, got "
                                  f"{tuple(f.shape)}")


# ------------------------------------------------------------------------------------------------------ AB


def _connector(c_s: int, c_t: int) -> nn.Module:
    """AB connector (bhheo/AB_distillation ``models/distillation_module.py``): identity for equal channel counts,
    else a bias-free 1x1 conv (He-normal, fan-out) and BatchNorm (weight 1, bias 0)."""
    if c_s == c_t:
        return nn.Identity()
    conv, bn = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_t))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@register("ab")
class AB(ClassicFeatureDistiller):
    """Activation-boundary distillation (Heo et al., AAAI 2019) as its authors run it: an initialisation phase
    that trains the student and the connectors on :func:`ab_loss` alone, then cross-entropy training.

    Authors' code: bhheo/AB_distillation ``cifar10_AB_distillation.py`` (``criterion_alternative_L2``, layer
    weights 1/4, 1/2, 1, ``/ batch / 1000 · 3``) and ``models/distillation_module.py`` (connectors, pre-ReLU
    features); RepDistiller ``distiller_zoo/AB.py`` (``ABLoss``), ``train_student.py`` / ``helper/pretrain.py`` (30
    init epochs, then ``loss_kd = 0``: CE only). Init-phase loss ``kd_weight · ab`` (no CE); afterwards
    ``ce_weight · CE``.

    Layers: pre-activation maps paired in order (default: the inputs of every stage's last ReLU, RepDistiller's
    ``feat[1:-1]`` with ``preact=True``); the student's map is connected to the teacher's channel count, the
    spatial sizes must match (RepDistiller's connector, a ``ConvReg``, also adapts sizes). Differences: the
    teacher stays in eval mode (the authors' CIFAR script runs it in train mode; RepDistiller in eval), the
    authors' second stage on CIFAR-10 optionally trains with KD (here CE, as RepDistiller), and see the module
    docstring on the initialisation phase.

    Params: ``margin`` (1.0), ``init_epochs`` (None: 30 of 270 epochs), ``student_layer``, ``teacher_layer``,
    ``input_shape``. Published weights: CE 1 (second stage), AB 1 (initialisation).
    """

    param_defaults = {**_LAYER_PARAMS, "margin": 1.0, "init_epochs": None}
    schedule_defaults = dict(_INIT_SCHEDULE)

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        f_s, f_t = self.probe()
        self._check_maps(f_s, "student", self.student_layers)
        self._check_maps(f_t, "teacher", self.teacher_layers)
        for a, b, ns, nt in zip(f_s, f_t, self.student_layers, self.teacher_layers):
            if a.shape[2:] != b.shape[2:]:
                raise ConfigError(f"ab: student layer {ns!r} {tuple(a.shape[2:])} and teacher layer {nt!r} "
                                  f"{tuple(b.shape[2:])} differ in spatial size; pair layers of equal size")
        device, dtype = model_device(student)
        self.connectors = nn.ModuleList([_connector(a.shape[1], b.shape[1]) for a, b in zip(f_s, f_t)]
                                        ).to(device, dtype)

    def default_layers(self) -> tuple[list[str], list[str]]:
        return self._stage_ends(pre_s=True, pre_t=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        margin = float(self.hparams["margin"])
        return self.staged_forward(x, y, lambda f_s, f_t: ab_loss([c(f) for c, f in zip(self.connectors, f_s)], f_t,
                                                                  margin))


# ----------------------------------------------------------------------------------------------------- FSP


@register("fsp")
class FSP(ClassicFeatureDistiller):
    """Flow of solution procedure (Yim et al., CVPR 2017) as HobbitLong/RepDistiller runs it (``distiller_zoo/FSP.py``,
    ``train_student.py``, ``helper/pretrain.py``): an initialisation phase training the student on
    :func:`fsp_loss` alone, then cross-entropy training (RepDistiller's second stage has ``loss_kd = 0``).

    Layers: two or more maps per network, consecutive ones forming FSP matrices; each student layer must have its
    teacher layer's channel count (RepDistiller raises otherwise). Default: the stem and the end of every stage
    (post-activation; RepDistiller's ``feat[:-1]``). ``[B, C]`` vectors count as 1x1 maps. Init-phase loss
    ``kd_weight · fsp``; afterwards ``ce_weight · CE``. See the module docstring on the initialisation phase.

    Params: ``init_epochs`` (None: 30 of 270 epochs), ``student_layer``, ``teacher_layer``, ``input_shape``.
    Published weights: CE 1 (second stage), FSP 1 (initialisation; RepDistiller's ``-b 50`` multiplies the second
    stage's zero term).
    """

    param_defaults = {**_LAYER_PARAMS, "init_epochs": None}
    schedule_defaults = dict(_INIT_SCHEDULE)

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) < 2:
            raise ConfigError("fsp needs at least 2 layers per network (FSP matrices join consecutive layers); "
                              "give student_layer / teacher_layer as lists")
        f_s, f_t = self.probe()
        for a, b, ns, nt in zip(f_s, f_t, self.student_layers, self.teacher_layers):
            if as_map(a).shape[1] != as_map(b).shape[1]:
                raise ConfigError(f"fsp: student layer {ns!r} has {a.shape[1]} channels but teacher layer {nt!r} "
                                  f"{b.shape[1]}; FSP matrices need equal channel counts (pair other layers)")

    def default_layers(self) -> tuple[list[str], list[str]]:
        return self._stage_ends(pre_s=False, pre_t=False, with_stem=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        return self.staged_forward(x, y, lambda f_s, f_t: fsp_loss([as_map(f) for f in f_s], [as_map(f) for f in f_t]))


# ------------------------------------------------------------------------------------------------------ FT


class Paraphraser(nn.Module):
    """FT paraphraser (RepDistiller ``models/util.py``, ``use_bn=False``): an encoder of three 3x3 convs (``C`` ->
    ``C`` -> ``k·C`` -> ``k·C``) and a decoder of three 3x3 transposed convs back to ``C``, LeakyReLU(0.1) after
    each; ``[B, C, H, W]`` -> factor ``[B, k·C, H, W]`` (and reconstruction ``[B, C, H, W]``)."""

    def __init__(self, c: int, k: float = 0.5) -> None:
        super().__init__()
        m = int(c * k)
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.encoder = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), act(), nn.Conv2d(c, m, 3, 1, 1), act(),
                                     nn.Conv2d(m, m, 3, 1, 1), act())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(m, m, 3, 1, 1), act(), nn.ConvTranspose2d(m, c, 3, 1, 1), act(),
                                     nn.ConvTranspose2d(c, c, 3, 1, 1), act())

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT translator (RepDistiller ``models/util.py``, ``use_bn=True``): three 3x3 convs ``C_s`` -> ``C_s`` ->
    ``k·C_t`` -> ``k·C_t``, each followed by BatchNorm and LeakyReLU(0.1)."""

    def __init__(self, c_s: int, c_t: int, k: float = 0.5) -> None:
        super().__init__()
        m = int(c_t * k)
        layers = []
        for a, b in ((c_s, c_s), (c_s, m), (m, m)):
            layers += [nn.Conv2d(a, b, 3, 1, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]
        self.encoder = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.encoder(f)


@register("ft")
class FT(ClassicFeatureDistiller):
    """Factor transfer (Kim et al., NeurIPS 2018) as HobbitLong/RepDistiller runs it (``distiller_zoo/FT.py``,
    ``models/util.py`` ``Paraphraser`` / ``Translator``, ``train_student.py``, ``helper/pretrain.py``).

    Initialisation phase: only the paraphraser trains, on ``MSE(reconstruction, f_t)`` of the teacher's map (the
    student runs in eval mode without gradients, as RepDistiller's ``model_s.eval()``). Afterwards the paraphraser
    is fixed (no gradients) and ``loss = ce_weight · CE + kd_weight · ft_loss(translator(f_s), paraphraser(f_t))``
    (:func:`ft_loss`), the translator trained with the student.

    Layers: one map per network (default: the last stage end, post-activation; RepDistiller's ``feat[-2]``).
    Differences: RepDistiller trains the paraphraser with its own SGD (lr 0.01 for ResNet/WRN students); here the
    run's optimiser does, see the module docstring on the initialisation phase.

    Params: ``rate`` (0.5, the paraphrase rate k), ``p1`` (2), ``p2`` (1), ``init_epochs`` (None: 30 of 270 epochs),
    ``student_layer``, ``teacher_layer``, ``input_shape``. Published weights: CE 1, FT 200.
    """

    default_kd_weight = 200.0
    param_defaults = {**_LAYER_PARAMS, "rate": 0.5, "p1": 2.0, "p2": 1.0, "init_epochs": None}
    schedule_defaults = dict(_INIT_SCHEDULE)

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) != 1:
            raise ConfigError("ft: give exactly one student_layer / teacher_layer pair")
        (f_s,), (f_t,) = self.probe()
        self._check_maps([f_s], "student", self.student_layers)
        self._check_maps([f_t], "teacher", self.teacher_layers)
        k = float(self.hparams["rate"])
        device, dtype = model_device(student)
        self.paraphraser = Paraphraser(f_t.shape[1], k).to(device, dtype)
        self.translator = Translator(f_s.shape[1], f_t.shape[1], k).to(device, dtype)

    def default_layers(self) -> tuple[list[str], list[str]]:
        s, t = self._stage_ends(pre_s=False, pre_t=False)
        return s[-1:], t[-1:]

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        if self.in_init():
            _, (f_t,) = self.teacher_forward(x, self.teacher_layers)
            with torch.no_grad(), eval_mode(self.student):
                z_s = self.student(x)
            _, rec = self.paraphraser(f_t)
            rec_loss = F.mse_loss(rec, f_t)
            return {"loss": rec_loss, "ce": self.ce(z_s, y).detach(), "paraphraser_rec": rec_loss.detach(),
                    "init_phase": 1.0, "logits": z_s}
        z_s, (f_s,), (f_t,) = self.features(x)
        with torch.no_grad(), eval_mode(self.paraphraser):
            factor_t, _ = self.paraphraser(f_t)
        ft = ft_loss(self.translator(f_s), factor_t, float(self.hparams["p1"]), float(self.hparams["p2"]))
        return self.combine(z_s, self.ce(z_s, y), ft, ft=ft, init_phase=0.0)


# ----------------------------------------------------------------------------------------------------- IRG


def _pooled(f: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> global average ``[B, C]``; ``[B, ...]`` flattened (the authors' ``global_pooling``)."""
    return f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1)


@register("irg")
class IRG(ClassicFeatureDistiller):
    """Instance relationship graph (Liu et al., CVPR 2019) as the authors' Caffe release runs it (yufanLIU/IRG:
    ``IRG.prototxt``, ``IRG_Transformation.prototxt``, ``batch_euclidean_map_layer.cpp``,
    ``batch_euclidean_vector_layer.cpp``): ``loss = ce_weight · CE + kd_weight · irg_loss`` (:func:`irg_loss`).

    The edge term compares the max-normalised squared-distance graphs of the pooled features (default: the
    penultimate features, the authors' globally pooled ``Pooling1``); each transformation pair
    ``[earlier, later]`` of ``transform_layers`` (teacher: ``teacher_transform_layers``, default the same names)
    compares the per-sample distance between two globally pooled maps of equal channel count. ``[B, C, H, W]``
    features are globally average-pooled, as in the prototxts. Gradients follow the Caffe layers' backward (the
    maxima are constants; the edge map's is half the exact one, see :func:`irg_edge_map`).

    Differences: the paper's vertex (logit) term is not in the authors' released prototxts and is not added; torch
    re-implementations (e.g. AberHu/Knowledge-Distillation-Zoo ``kd_losses/irg.py``) differ in the normalisation
    (``F.mse_loss`` means) and take exact autograd gradients.

    Params: ``transform_layers`` (None: no transformation term), ``teacher_transform_layers``, ``student_layer``,
    ``teacher_layer``, ``input_shape``. Published weights: CE 1, every IRG term 0.005.
    """

    default_kd_weight = 0.005
    param_defaults = {**_LAYER_PARAMS, "transform_layers": None, "teacher_transform_layers": None}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) != 1:
            raise ConfigError("irg: give exactly one student_layer / teacher_layer pair (the edge graph's features)")
        s_pairs = self._pairs(self.hparams["transform_layers"], "transform_layers")
        t_pairs = self._pairs(self.hparams["teacher_transform_layers"], "teacher_transform_layers")
        if t_pairs is None:
            t_pairs = s_pairs
        if s_pairs is None and t_pairs:
            raise ConfigError("irg: teacher_transform_layers is set but transform_layers is not; give both")
        s_pairs, t_pairs = s_pairs or [], t_pairs or []
        if len(s_pairs) != len(t_pairs):
            raise ConfigError(f"irg: transform_layers has {len(s_pairs)} pairs but teacher_transform_layers "
                              f"{len(t_pairs)}; they are paired in order")
        self.n_pairs = len(s_pairs)
        self.student_layers = self.student_layers + [n for p in s_pairs for n in p]
        self.teacher_layers = self.teacher_layers + [n for p in t_pairs for n in p]
        FeatureTap(student, self.student_layers, "student")
        FeatureTap(self.teachers[0], self.teacher_layers, "teacher")
        if self.n_pairs:
            f_s, f_t = self.probe()
            for feats, names, role in ((f_s, self.student_layers, "student"), (f_t, self.teacher_layers, "teacher")):
                for i in range(self.n_pairs):
                    a, b = _pooled(feats[1 + 2 * i]), _pooled(feats[2 + 2 * i])
                    if a.shape[1] != b.shape[1]:
                        raise ConfigError(f"irg: {role} transformation pair {names[1 + 2 * i]!r} / "
                                          f"{names[2 + 2 * i]!r} has {a.shape[1]} / {b.shape[1]} channels; the "
                                          "authors' BatchEuclideanVector needs equal channel counts")

    @staticmethod
    def _pairs(value, key: str) -> list[list[str]] | None:
        if value is None:
            return None
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in value)
        if not ok:
            raise ConfigError(f"irg: distill.params.{key} must be a list of [earlier, later] layer-name pairs, "
                              f"got {value!r}")
        return [list(p) for p in value]

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, f_s, f_t = self.features(x)
        p_s, p_t = [_pooled(f) for f in f_s], [_pooled(f) for f in f_t]
        pairs_s = [(p_s[1 + 2 * i], p_s[2 + 2 * i]) for i in range(self.n_pairs)]
        pairs_t = [(p_t[1 + 2 * i], p_t[2 + 2 * i]) for i in range(self.n_pairs)]
        irg = irg_loss(p_s[0], p_t[0], pairs_s, pairs_t)
        return self.combine(z_s, self.ce(z_s, y), irg, irg=irg)


# ------------------------------------------------------------------------------------------------ ReviewKD


class ABF(nn.Module):
    """ReviewKD's attention-based fusion (dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py`` ``ABF``).

    ``conv1`` (1x1, BN) maps the student level ``[B, C_in, H, W]`` to ``mid`` channels; with ``fuse`` the deeper
    level's residual is nearest-upsampled to ``(H, W)`` and mixed in by a 2-channel sigmoid attention; the result
    is nearest-resized to the teacher's size and ``conv2`` (3x3, BN) maps it to ``C_out``. Returns
    ``(output [B, C_out, H_t, W_t], residual [B, mid, ...])``.
    """

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(mid * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + residual * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def review_features(abfs: Sequence[ABF], f_s: Sequence[torch.Tensor], out_sizes: Sequence[tuple[int, int]]
                    ) -> list[torch.Tensor]:
    """ReviewKD's review path (the authors' ``ReviewKD.forward``): student levels ``f_s`` (shallow to deep,
    ``[B, C_i, H_i, W_i]``) fused from the deepest up by ``abfs`` (one per level, the deepest without fusion);
    returns the outputs shallow to deep, level ``i`` of size ``out_sizes[i]``."""
    out, res = abfs[-1](f_s[-1], None, out_sizes[-1])
    results = [out]
    for i in range(len(f_s) - 2, -1, -1):
        out, res = abfs[i](f_s[i], res, out_sizes[i])
        results.insert(0, out)
    return results


@register("reviewkd")
class ReviewKD(ClassicFeatureDistiller):
    """Knowledge review (Chen et al., CVPR 2021) as its authors run it on CIFAR-100 (dvlab-research/ReviewKD
    ``CIFAR-100/model/reviewkd.py`` ``ABF`` / ``ReviewKD`` / ``hcl``, ``CIFAR-100/train.py``,
    ``CIFAR-100/script/reviewKD.sh``).

    The student's levels (shallow to deep) pass through the ABF review path (:func:`review_features`, trainable
    heads, ``mid = min(512, C_deepest)``) and each output is matched to the teacher's level by :func:`hcl_loss`:
    ``loss = ce_weight · CE + kd_weight · min(1, epoch / warmup) · hcl`` (0-based epochs as the authors' loop;
    no epoch set: factor 1). Defaults: the student's stage ends (post-activation) and the teacher's
    (pre-activation, the authors' ``preact=True``), plus the globally pooled features ``[B, C, 1, 1]`` as the
    deepest level when both networks end in global average pooling and a Linear, as the authors' ``f4``.
    ``[B, C]`` vectors count as 1x1 maps. Non-square maps resize to ``(H, W)`` (the authors assume square).

    Params: ``warmup`` (None: 20 of 240 epochs), ``student_layer``, ``teacher_layer``, ``input_shape``. Published
    weights: CE 1, review 5 (the authors' script for ResNet32x4 -> ResNet8x4, WRN and ShuffleNet pairs; 0.6 for
    ResNet56 -> ResNet20, 1 for ResNet110 -> ResNet32, 8 for ShuffleNetV2).
    """

    default_kd_weight = 5.0
    param_defaults = {**_LAYER_PARAMS, "warmup": None}
    schedule_defaults = {"warmup": (20, 240)}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        f_s, f_t = self.probe()
        f_s, f_t = [as_map(f) for f in f_s], [as_map(f) for f in f_t]
        mid = min(512, f_s[-1].shape[1])
        n = len(f_s)
        device, dtype = model_device(student)
        abfs = [ABF(a.shape[1], mid, b.shape[1], fuse=i < n - 1) for i, (a, b) in enumerate(zip(f_s, f_t))]
        self.abfs = nn.ModuleList(abfs).to(device, dtype)

    def default_layers(self) -> tuple[list[str], list[str]]:
        s, t = self._stage_ends(pre_s=False, pre_t=True)
        shape = self.hparams.get("input_shape")
        head_s = global_pool_head(self.student, "student", self._example_input, shape)
        head_t = global_pool_head(self.teachers[0], "teacher", self._example_input, shape)
        if head_s is not None and head_t is not None:
            s, t = s + [head_s[0]], t + [head_t[0]]
        return s, t

    @property
    def warmup_factor(self) -> float:
        """``min(1, epoch / warmup)`` (1 when no epoch was set or ``warmup`` is 0)."""
        w = float(self.hparams.get("warmup") or 0.0)
        if self.epoch is None or w <= 0:
            return 1.0
        return min(1.0, self.epoch / w)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, f_s, f_t = self.features(x)
        f_t = [as_map(f) for f in f_t]
        outs = review_features(self.abfs, [as_map(f) for f in f_s], [tuple(f.shape[2:]) for f in f_t])
        hcl = hcl_loss(outs, f_t)
        factor = self.warmup_factor
        return self.combine(z_s, self.ce(z_s, y), factor * hcl, reviewkd=hcl, warmup=factor)
