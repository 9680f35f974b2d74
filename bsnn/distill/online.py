"""Online and self-distillation methods: switokd, sokd, byot, born_again.

* ``switokd`` (Qian et al., ECCV 2022): teacher and student trained together from scratch; a threshold on the
  distillation gap switches between *learning mode* (both learn from each other) and *expert mode* (the teacher
  pauses, the student keeps learning).
* ``sokd`` (Liu et al., BMVC 2021): a frozen, pre-trained teacher; an auxiliary branch grown from the teacher's
  last stage is trained online and mediates between teacher and student (the student learns from the branch).
* ``byot`` (Zhang et al., ICCV 2019, "Be Your Own Teacher"): no teacher; shallow classifiers on the student's
  intermediate stages learn from its deepest classifier and its penultimate features.
* ``born_again`` (Furlanello et al., ICML 2018): KD from a previous generation of the same architecture; the
  pipeline trains ``distill.params.generations`` generations (:mod:`bsnn.pipeline`).

Method-owned networks (the SOKD branch, the BYOT heads, the SwitOKD teacher) are submodules of the distiller, so
``fit`` trains and checkpoints them; the exported student stays the plain network. Intermediate features come
from forward hooks only (:mod:`bsnn.distill.hooks`); the SOKD branch is fed the teacher's feature by a hook that
lives inside a ``with`` block (:class:`Substitute`).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, register, teacher_list, unfreeze_
from bsnn.distill.hooks import (as_layer_list, default_layer, find_module, last_module_name, model_device,
                                parse_layer, probe_features)
from bsnn.errors import ConfigError

__all__ = ["BYOT", "BYOTHead", "BornAgain", "SOKD", "Substitute", "SwitOKD", "byot_feature_loss", "byot_kd_loss",
           "layer_signature", "stage_entries", "switokd_gap"]

# ------------------------------------------------------------------------------------------- pure losses


@torch.no_grad()
def switokd_gap(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> dict:
    """SwitOKD's switching statistics (hfutqian/SwitOKD, ``main.py``: ``dist_s_label``, ``dist_s_t``, ``train``).

    With ``p = softmax(z / τ)`` and ``y`` one-hot, all batch means of L1 distances:
    ``s_label = ‖p_s − y‖₁``, ``t_label = ‖p_t − y‖₁``, ``gap = ‖p_t − p_s‖₁`` (the distillation gap),
    ``threshold δ = s_label − exp(−t_label / (t_label + s_label)) · t_label``;
    ``expert = gap > δ and t_label < s_label`` (the teacher pauses).

    Args:
        z_s: student logits ``[B, K]``.
        z_t: teacher logits ``[B, K]``.
        y: labels ``[B]``.
        temperature: τ (the authors' code uses 1).

    Returns:
        ``{'s_label', 't_label', 'gap', 'threshold'}`` (0-dim tensors) and ``'expert'`` (a Python bool).
    """
    t = float(temperature)
    onehot = F.one_hot(y.long(), z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = F.softmax(z_s.detach() / t, dim=1), F.softmax(z_t.detach() / t, dim=1)
    s_label = (p_s - onehot).abs().sum(1).mean()
    t_label = (p_t - onehot).abs().sum(1).mean()
    gap = (p_t - p_s).abs().sum(1).mean()
    threshold = s_label - torch.exp(-t_label / (t_label + s_label)) * t_label
    expert = bool(gap > threshold) and bool(t_label < s_label)
    return {"s_label": s_label, "t_label": t_label, "gap": gap, "threshold": threshold, "expert": expert}


def byot_kd_loss(z_head: torch.Tensor, z_final: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """BYOT's KD term (luanyunteng/pytorch-be-your-own-teacher ``train.py``: ``kd_loss_function · T²``):
    ``T² · mean_b −Σ_k softmax(z_final/T)_k · log softmax(z_head/T)_k`` (a soft cross-entropy, not a KL: it
    includes the deepest classifier's entropy; the target is detached).

    Args:
        z_head: logits of a shallow classifier ``[B, K]``.
        z_final: logits of the deepest classifier ``[B, K]`` (detached here).
        temperature: T.
    """
    t = float(temperature)
    return t * t * L.soft_cross_entropy(z_head / t, F.softmax(z_final.detach() / t, dim=1))


def byot_feature_loss(f: torch.Tensor, f_final: torch.Tensor) -> torch.Tensor:
    """BYOT's feature hint (``feature_loss_function``): ``Σ (f − f_final)² · [f > 0 or f_final > 0]`` over every
    element (a sum, not a mean; the published weight 1e-6 assumes it). ``f_final`` is detached.

    Args:
        f: a shallow head's features ``[B, D]`` (or any shape equal to ``f_final``'s).
        f_final: the deepest features ``[B, D]``.
    """
    f_final = f_final.detach()
    return ((f - f_final) ** 2 * ((f > 0) | (f_final > 0)).to(f.dtype)).sum()


# ---------------------------------------------------------------------------------------------- helpers


def _fresh_copy(model: nn.Module, reinit: bool, training: bool) -> nn.Module:
    """A trainable deep copy of ``model`` (re-initialised where ``reinit``), in train mode ``training``."""
    out = copy.deepcopy(model)
    if reinit:
        for m in out.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return unfreeze_(out).train(training)


def _sequential_entry(model: nn.Module, name: str) -> str:
    """The shallowest ancestor-or-self of module ``name`` whose parent is an ``nn.Sequential`` (replacing its input
    then replaces everything upstream), else ``name``'s top-level ancestor (a chain-like ``forward`` assumed)."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        if isinstance(modules[".".join(parts[: i - 1])], nn.Sequential):
            return ".".join(parts[:i])
    return parts[0]


def stage_entries(model: nn.Module) -> list[str]:
    """Where the stages after the stem start, as input specs (``"layer2.0:in"``, ``"conv3:in"``, ``"7:in"``):
    every ``nn.Conv2d`` but the first that changes the channel count, lifted to the module whose input is the whole
    stage's input (:func:`_sequential_entry`; a residual block, not a conv inside it); in registration order,
    duplicates removed. Their inputs are the outputs of every stage but the last."""
    convs = [(name, m) for name, m in model.named_modules() if name and isinstance(m, nn.Conv2d)]
    out: list[str] = []
    for name, m in convs[1:]:
        if m.in_channels != m.out_channels:
            spec = _sequential_entry(model, name) + ":in"
            if spec not in out:
                out.append(spec)
    return out


def _last_stage_entry(model: nn.Module, role: str) -> str:
    """Input spec of the last stage (SOKD's branch point), else of the last conv (not the stem), else of the last
    ``nn.Linear``."""
    entries = stage_entries(model)
    if entries:
        return entries[-1]
    convs = [name for name, m in model.named_modules() if name and isinstance(m, nn.Conv2d)]
    if len(convs) > 1:
        return _sequential_entry(model, convs[-1]) + ":in"
    fc = last_module_name(model, nn.Linear)
    if fc is None:
        raise ConfigError(f"the {role} has neither a second nn.Conv2d nor an nn.Linear to branch from; name the "
                          "layer in distill.params.branch_layer")
    return _sequential_entry(model, fc) + ":in"


class Substitute:
    """Context manager: while active, layer ``spec`` of ``model`` sees ``value`` as its input (``"name:in"``) or
    returns ``value`` as its output (``"name"``); the hook is removed on exit.

    Args:
        model: the network.
        spec: a layer spec (:func:`bsnn.distill.hooks.parse_layer`).
        value: the tensor to substitute (shape of what it replaces).
    """

    def __init__(self, model: nn.Module, spec: str, value: torch.Tensor) -> None:
        name, self.use_input = parse_layer(spec)
        self.module = find_module(model, name, "branch")
        self.value = value
        self._handle = None

    def __enter__(self) -> "Substitute":
        if self.use_input:
            self._handle = self.module.register_forward_pre_hook(lambda m, args: (self.value, *args[1:]))
        else:
            self._handle = self.module.register_forward_hook(lambda m, args, out: self.value)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def layer_signature(model: nn.Module) -> list[tuple[str, str, tuple]]:
    """``(name, kind, weight shape)`` of every conv / linear / batch-norm layer: the architecture up to weight
    binarisation (``BinaryConv2d`` is an ``nn.Conv2d``) and activation functions."""
    kinds = ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"), (nn.Linear, "linear"),
             (nn.modules.batchnorm._BatchNorm, "batchnorm"))
    out = []
    for name, m in model.named_modules():
        for cls, kind in kinds:
            if isinstance(m, cls):
                w = getattr(m, "weight", None)
                shape = tuple(w.shape) if w is not None else (getattr(m, "num_features", None),)
                out.append((name, kind, shape))
                break
    return out


# ------------------------------------------------------------------------------------------------ methods


@register("switokd")
class SwitOKD(Distiller):
    """Switchable online KD (Qian et al., ECCV 2022), as the authors run it (hfutqian/SwitOKD,
    ``SwitOKD_code/CIFAR-10/WRN-16-1_8/main.py`` ``train``; the same rule in the CIFAR-100, Tiny-ImageNet and ImageNet
    scripts). Teacher and student train together from scratch; every batch :func:`switokd_gap` decides the mode:

    * learning mode: ``ce_weight·CE(z_s, y) + kd_weight·KL(p_t ‖ p_s)`` (teacher detached) plus the teacher's
      ``ce_weight·CE(z_t, y) + kd_weight·KL(p_s ‖ p_t)`` (student detached);
    * expert mode (``gap > δ`` and the teacher closer to the labels): the student's term only; the teacher gets no
      gradient, so the optimiser skips it (paused, as in the authors' code, where only the student's optimiser
      steps).

    The authors' two SGD optimisers are one here (same settings in their scripts). ``KL`` is
    :func:`bsnn.distill.losses.kd_loss` (``T²·KL``): at the published T = 1 it is the authors' ``kl_div``; the
    switching statistics use the same T (the authors' code computes them at 1). ``teacher`` must be exactly one
    network; the pipeline gives a freshly initialised ``model.teacher`` (``online_teacher.pt``). Expert steps leave
    the teacher without gradients, which ``DistributedDataParallel`` refuses: train on one process.
    Parts: ``expert`` (1 / 0), ``gap``, ``threshold``. Published: CE 1, KL 1, T = 1.
    """

    trains_teacher = True
    default_temperature = 1.0

    def __init__(self, student, teacher, cfg, **context) -> None:
        online = teacher_list(teacher)
        if len(online) != 1:
            raise ConfigError(f"switokd trains one teacher online with the student; give exactly one teacher network "
                              f"(model.teacher), got {len(online)}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("switokd pauses its teacher on expert-mode steps (no gradients), which "
                              "DistributedDataParallel does not support; train switokd on one process")
        super().__init__(student, teacher, cfg, **context)
        device = model_device(student)[0]
        self.online_teacher = unfreeze_(online[0].to(device).train(student.training))

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        t = self.temperature
        z_s = self.student(x)
        z_t = self.online_teacher(x)
        stats = switokd_gap(z_s, z_t, y, t)
        ce_s, kd_s = self.ce(z_s, y), L.kd_loss(z_s, z_t.detach(), t)
        ce_t, kd_t = self.ce(z_t, y), L.kd_loss(z_t, z_s.detach(), t)
        loss = self.ce_weight * ce_s + self.kd_weight * kd_s
        if not stats["expert"]:
            loss = loss + self.ce_weight * ce_t + self.kd_weight * kd_t
        return {"loss": loss, "ce": ce_s.detach(), "kd": kd_s.detach(), "teacher_ce": ce_t.detach(),
                "teacher_kd": kd_t.detach(), "expert": torch.tensor(float(stats["expert"])),
                "gap": stats["gap"], "threshold": stats["threshold"], "logits": z_s}


@register("sokd")
class SOKD(Distiller):
    """Semi-online KD (Liu et al., BMVC 2021), as the authors run it (swlzq/Semi-Online-KD, ``trainer/sokd.py``
    ``SemiOnlineKnowledgeDistillation.train`` / ``calculate_kd``, ``models/wrn.py`` ``auxiliary_forward``,
    ``configs/sokd.yaml``).

    The teacher is pre-trained and frozen. An auxiliary *branch*, a copy of the teacher's last stage and classifier
    (freshly initialised, as the authors' ``auxiliary_*`` modules are), runs on the teacher's (detached) feature
    at the start of that stage and is trained online:

    * branch: ``branch_ce_weight·CE(z_a, y) + branch_teacher_weight·KD(z_a, z_t) + branch_student_weight·KD(z_a,
      z_s.detach())``;
    * student: ``ce_weight·CE(z_s, y) + kd_weight·KD(z_s, z_a.detach())`` (the student learns from the branch);

    ``KD = T²·KL`` (the authors' ``SoftTarget``, batch mean). The loss is their sum (one optimiser, as the authors').

    The branch is a deep copy of the whole teacher whose layer ``branch_layer`` is fed the teacher's feature there
    (:class:`Substitute`): general for any architecture; the copy's layers before that point run but their output
    is discarded (extra compute, no effect on the result or on training: they get no gradients).
    ``branch_layer`` (default: the input of the last stage, :func:`stage_entries`; the authors branch at the input
    of WRN's ``block3``) must be a point every later layer depends on only through it (the input of a stage, not of
    a conv inside a residual block).

    Differences from the authors' code: the teacher stays in eval mode (bsnn's contract: frozen BatchNorm
    statistics; the authors' ``teacher.train()`` normalises the frozen teacher with batch statistics and drifts its
    running ones); one learning rate for student and branch (the published config uses lr 0.1 for both).
    Params: ``branch_layer`` (None), ``branch_ce_weight`` (1), ``branch_teacher_weight`` (1),
    ``branch_student_weight`` (1), ``reinit`` (True: a fresh branch; False: start from the teacher's weights).
    Published: CE 1, KD 1, T = 4.
    """

    param_defaults = {"branch_layer": None, "branch_ce_weight": 1.0, "branch_teacher_weight": 1.0,
                      "branch_student_weight": 1.0, "reinit": True}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        spec = self.hparams["branch_layer"]
        if spec is not None and not isinstance(spec, str):
            raise ConfigError(f"sokd: distill.params.branch_layer must be one layer name (e.g. 'layer3:in'), got "
                              f"{spec!r}")
        self.branch_layer = spec or _last_stage_entry(self.teachers[0], "teacher")
        find_module(self.teachers[0], parse_layer(self.branch_layer)[0], "teacher")  # a clear error for a bad name
        device, dtype = model_device(student)
        self.branch = _fresh_copy(self.teachers[0], bool(self.hparams["reinit"]), student.training).to(device, dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t, (f_t,) = self.teacher_forward(x, [self.branch_layer])
        with Substitute(self.branch, self.branch_layer, f_t.detach()):
            z_a = self.branch(x)
        z_s = self.student(x)
        t = self.temperature
        kd = L.kd_loss(z_s, z_a.detach(), t)
        ce_a, kd_at, kd_as = self.ce(z_a, y), L.kd_loss(z_a, z_t, t), L.kd_loss(z_a, z_s.detach(), t)
        h = self.hparams
        branch = (float(h["branch_ce_weight"]) * ce_a + float(h["branch_teacher_weight"]) * kd_at
                  + float(h["branch_student_weight"]) * kd_as)
        out = self.combine(z_s, self.ce(z_s, y), kd, kd=kd, branch_ce=ce_a, branch_kd_teacher=kd_at,
                           branch_kd_student=kd_as)
        out["loss"] = out["loss"] + branch
        return out


class BYOTHead(nn.Module):
    """A BYOT shallow classifier (the authors' ``branchBottleNeck`` + ``avgpool`` + ``middle_fc``).

    ``1x1 conv (C -> D/4) - BN - ReLU - kxk conv stride k (D/4 -> D/4) - BN - ReLU - 1x1 conv (D/4 -> D) - BN -
    ReLU - global average pool`` gives the head's features ``[B, D]`` (matched to the deepest features), then
    ``Linear(D, K)`` its logits. Convs have biases and Kaiming-normal (fan-out) weights, BN weight 1, bias 0, as
    in the authors' ``Multi_ResNet``.

    Args:
        in_channels: C of the tapped map ``[B, C, H, W]``.
        feat_dim: D, the size of the deepest (penultimate) features.
        num_classes: K.
        kernel: k, the spatial reduction to the last stage (the authors' 8, 4, 2 for ResNet-18's stages 1-3).
    """

    def __init__(self, in_channels: int, feat_dim: int, num_classes: int, kernel: int) -> None:
        super().__init__()
        mid = max(1, feat_dim // 4)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, kernel, stride=kernel), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, feat_dim, 1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
        )
        self.fc = nn.Linear(feat_dim, num_classes)
        for m in self.bottleneck:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, H, W]`` -> ``(features [B, D], logits [B, K])``."""
        feat = F.adaptive_avg_pool2d(self.bottleneck(f), 1).flatten(1)
        return feat, self.fc(feat)


@register("byot")
class BYOT(Distiller):
    """Be Your Own Teacher (Zhang et al., ICCV 2019), as luanyunteng/pytorch-be-your-own-teacher runs it
    (``train.py`` ``run_training``, ``kd_loss_function``, ``feature_loss_function``; heads: ``models/resnet.py``
    ``branchBottleNeck``). No teacher (a given one is ignored).

    Shallow classifiers (:class:`BYOTHead`, owned by the distiller) sit on the student's intermediate stages,
    tapped by forward hooks; with ``z`` the student's logits, ``f`` its penultimate features (input of the last
    ``nn.Linear``) and head i giving ``(f_i, z_i)``::

        loss = ce_weight·(CE(z) + Σ_i CE(z_i)) + kd_weight·Σ_i byot_kd(z_i, z) + feature_weight·Σ_i hint(f_i, f)

    (:func:`byot_kd_loss`, :func:`byot_feature_loss`; the deepest logits and features are detached targets).
    The authors' ``(1 − α)``, ``α`` and ``β`` are ``ce_weight``, ``kd_weight`` and ``feature_weight``.

    ``layers`` (default: the start of every stage after the first, :func:`stage_entries`, i.e. the outputs of all
    stages but the last, where the authors attach their three heads on ResNet-18; without stage changes the input
    of the last conv). Each head's stride k is the tapped map's side over the last conv's output side. The
    authors' unused ``downsample*_1`` modules are left out. Params: ``layers`` (None), ``feature_weight`` (1e-6),
    ``input_shape`` (None). Published (the repository's defaults): CE 1 − α = 0.9, KD α = 0.1, T = 3, β = 1e-6.
    """

    needs_teacher = False
    default_ce_weight = 0.9
    default_kd_weight = 0.1
    default_temperature = 3.0
    param_defaults = {"layers": None, "feature_weight": 1e-6, "input_shape": None}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        layers = as_layer_list(self.hparams["layers"])
        if layers is None:
            layers = stage_entries(student)
            convs = [name for name, m in student.named_modules() if name and isinstance(m, nn.Conv2d)]
            if not layers and len(convs) > 1:
                layers = [_sequential_entry(student, convs[-1]) + ":in"]
        if not layers:
            raise ConfigError("byot: the student has no intermediate stage to attach a classifier to; name the "
                              "layers in distill.params.layers (e.g. ['layer2:in', 'layer3:in'])")
        last_conv = last_module_name(student, nn.Conv2d)
        self.final_layer = default_layer(student, "student")  # penultimate features: input of the last Linear
        specs = layers + [self.final_layer] + ([last_conv] if last_conv else [])
        feats = probe_features(student, specs, "student", self._example_input, self.hparams["input_shape"])
        final, side = feats[len(layers)], (feats[-1].shape[-1] if last_conv and feats[-1].dim() == 4 else 1)
        fc = dict(student.named_modules())[last_module_name(student, nn.Linear)]
        heads = []
        for spec, f in zip(layers, feats):
            if f.dim() != 4:
                raise ConfigError(f"byot: layer {spec!r} gives {tuple(f.shape)}, not a [B, C, H, W] map; name stage "
                                  "inputs / outputs in distill.params.layers")
            heads.append(BYOTHead(f.shape[1], final[0].numel(), fc.out_features, max(1, f.shape[-1] // side)))
        self.layers = layers
        device, dtype = model_device(student)
        self.heads = nn.ModuleList(heads).to(device, dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z, feats = self.student_forward(x, self.layers + [self.final_layer])
        final = feats[-1].flatten(1)
        t = self.temperature
        ces, kds, hints = [], [], []
        for head, f in zip(self.heads, feats[:-1]):
            f_i, z_i = head(f)
            ces.append(self.ce(z_i, y))
            kds.append(byot_kd_loss(z_i, z, t))
            hints.append(byot_feature_loss(f_i, final))
        ce = self.ce(z, y)
        head_ce, kd, hint = sum(ces), sum(kds), sum(hints)
        loss = (self.ce_weight * (ce + head_ce) + self.kd_weight * kd
                + float(self.hparams["feature_weight"]) * hint)
        return {"loss": loss, "ce": ce.detach(), "head_ce": head_ce.detach(), "kd": kd.detach(),
                "feature": hint.detach(), "logits": z}


@register("born_again")
class BornAgain(Distiller):
    """Born-again networks (Furlanello et al., ICML 2018): the student has its teacher's architecture and learns
    ``ce_weight·CE(z_s, y) + kd_weight·T²·KL(p_t ‖ p_s)`` ("predicting the correct labels and matching the output
    distribution of the teacher", BAN §1; no temperature: T = 1). Self-distillation of this kind is what Pham et
    al. 2022 ("Revisiting Self-Distillation", arXiv:2206.08491) study and relate to flatter minima.

    The teacher is the previous generation. :func:`bsnn.pipeline.stage_student` trains
    ``distill.params.generations`` generations: generation 1 learns from ``model.teacher``, generation g from
    generation g − 1 (a fresh initialisation each time); every generation is saved and the last is the student.
    A teacher of another architecture is refused (:func:`layer_signature`: conv / linear / BN names and shapes;
    weight binarisation and activation functions may differ) unless ``strict`` is False.
    No authors' code is public (BAN's official code is not released; none is found for Pham et al.): the loss is
    Hinton's KD with BAN's equal weights. Params: ``generations`` (1), ``strict`` (True).
    Defaults: CE 1, KD 1, T = 1.
    """

    default_temperature = 1.0
    param_defaults = {"generations": 1, "strict": True}
    same_architecture = True

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        g = self.hparams["generations"]
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"born_again: distill.params.generations must be an integer >= 1, got {g!r}")
        if self.hparams["strict"]:
            a, b = layer_signature(student), layer_signature(self.teachers[0])
            if a != b:
                diff = next((f"student {s} vs teacher {t}" for s, t in zip(a, b) if s != t),
                            f"student has {len(a)} layers, teacher {len(b)}")
                raise ConfigError(f"born_again distils from a previous generation of the same architecture, but the "
                                  f"teacher's differs ({diff}); give model.student the teacher's architecture (or "
                                  "leave it unset), or use distill.method=kd for a different teacher")

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        kd = L.kd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), kd, kd=kd)
