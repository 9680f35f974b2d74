"""Teacher-side methods: the teacher itself is changed for the student's sake: metadistil, prue, prune_distill.

* ``metadistil`` (Zhou, Xu & McAuley, ACL 2022): the teacher is trained by a meta-gradient, the student's loss on
  held-out quiz data after a *pilot* update (the copy-student trick), written with :func:`torch.func.functional_call`.
* ``prue`` (Wang et al., ECML-PKDD 2022): the teacher is pruned so that its predictive uncertainty grows (PrUE
  scores), then KD from the sparse teacher.
* ``prune_distill`` (Park & No, ECCV 2022, "Prune your model before distill it"): iterative global magnitude
  pruning of the teacher, then KD from it; :func:`student_plan` gives the student widths from the pruned teacher.

Every method works on its **own copy** of the teacher (``meta_teacher`` / ``sparse_teacher``, a registered
submodule, so the changed teacher is checkpointed with the distiller); the user's teacher object and its file are
never changed (the base class only freezes it). The exported student stays a plain network. The pruning functions
are pure (masks in, masks out) and usable alone, e.g. to fine-tune a pruned teacher with
:func:`bsnn.train.train_teacher` while :func:`mask_gradients_` keeps the pruned weights at zero.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bsnn.distill import losses as L
from bsnn.distill.base import Distiller, DistillWarning, register, teacher_list, unfreeze_
from bsnn.distributed import all_reduce_tensor_sum
from bsnn.errors import ConfigError

Masks = dict[str, torch.Tensor]  # module name -> {0, 1} mask shaped like that module's weight


# --------------------------------------------------------------------------------------------- pruning: pure


def prunable_modules(model: nn.Module, kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> dict[str, nn.Module]:
    """``{name: module}`` of the modules of ``kinds`` whose ``weight`` is pruned, in registration order."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, kinds) and getattr(m, "weight", None)
            is not None}


def global_threshold_masks(scores: Masks, sparsity: float) -> Masks:
    """PrUE's global rule (``pruner.py``): keep the weights whose score is above the ``k``-th smallest of all scores,
    ``k = int(sparsity · N)`` over the ``N`` scored weights (ties at the threshold are pruned too).

    Args:
        scores: ``{name: score}``, each shaped like the layer's weight.
        sparsity: fraction of weights to remove, in ``[0, 1)``.
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = torch.cat([s.detach().reshape(-1).cpu() for s in scores.values()])
    k = int(float(sparsity) * flat.numel())
    if k < 1:
        return {n: torch.ones_like(s) for n, s in scores.items()}
    threshold = torch.kthvalue(flat, k).values
    return {n: (s.detach() > threshold.to(s.device)).to(s.dtype) for n, s in scores.items()}


def magnitude_round_masks(weights: Masks, masks: Masks, fraction: float) -> Masks:
    """One round of global L1 unstructured pruning over the weights still unpruned (torch's
    ``prune.global_unstructured(..., L1Unstructured, amount=fraction)`` on masked layers, as Park & No's
    ``pruning/lr_rewinding.py``): the ``round(fraction · n_remaining)`` smallest ``|w|`` among the remaining weights
    are removed.

    Args:
        weights: ``{name: weight}``.
        masks: current ``{name: mask}`` (same shapes); returned masks are new tensors.
        fraction: share of the *remaining* weights removed this round, in ``[0, 1]``.
    """
    names = list(weights)
    w = torch.cat([weights[n].detach().reshape(-1) for n in names])
    m = torch.cat([masks[n].detach().reshape(-1).to(w) for n in names])
    alive = torch.nonzero(m > 0).view(-1)
    k = round(float(fraction) * alive.numel())  # torch.nn.utils.prune._compute_nparams_toprune
    new = m.clone()
    if k > 0:
        drop = torch.topk(w[alive].abs(), k, largest=False).indices
        new[alive[drop]] = 0
    out, start = {}, 0
    for n in names:
        size = weights[n].numel()
        out[n] = new[start:start + size].view_as(weights[n]).to(masks[n].dtype)
        start += size
    return out


def pruning_rounds(pruning_ratio: float, fraction: float = 0.2) -> int:
    """Park & No's ``iter_pruning_freq_determiner``: the number of rounds ``n`` (each removing ``fraction`` of what
    is left) whose sparsity ``1 − (1 − fraction)^n`` is closest to ``pruning_ratio`` (ties: fewer rounds); a ratio
    ``>= 1`` is the number of rounds itself."""
    if pruning_ratio >= 1:
        return int(pruning_ratio)
    keep = 1.0 - float(fraction)
    n = 0
    while 1.0 - keep ** n <= pruning_ratio and n < 1000:
        n += 1
    lower, upper = abs(pruning_ratio - (1 - keep ** (n - 1))), abs(pruning_ratio - (1 - keep ** n))
    return n - 1 if lower <= upper else n


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> nn.Module:
    """``weight *= mask`` in place for every named module (pruned weights become exact zeros)."""
    modules = dict(model.named_modules())
    for n, mask in masks.items():
        modules[n].weight.mul_(mask.to(modules[n].weight))
    return model


def mask_gradients_(model: nn.Module, masks: Masks) -> list:
    """Gradient hooks ``grad *= mask`` on the masked weights, so fine-tuning (SGD with weight decay, Adam) keeps the
    pruned weights at zero. Returns the hook handles (``handle.remove()`` to stop)."""
    modules = dict(model.named_modules())
    return [modules[n].weight.register_hook(lambda g, m=mask: g * m.to(g)) for n, mask in masks.items()]


def weight_sparsity(model: nn.Module, kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> float:
    """Fraction of exactly-zero weights over the modules of ``kinds``."""
    ws = [m.weight.detach() for m in prunable_modules(model, kinds).values()]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws)) / max(total, 1)


def prue_uncertainty_loss(p_true: torch.Tensor, y: torch.Tensor, class_mean: torch.Tensor) -> torch.Tensor:
    """PrUE's objective whose mask gradient scores the weights: ``Σ_b |p̄_{y_b} − p_{y_b}(x_b)|``.

    Args:
        p_true: the teacher's softmax probability of each sample's own class ``[B]``.
        y: labels ``[B]``.
        class_mean: the average of ``p_true`` over each class's training samples ``[K]`` (constant).
    """
    return (class_mean.to(p_true)[y] - p_true).abs().sum()


def _batches(data) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in data:
        yield batch[0], batch[1]


def prue_scores(model: nn.Module, data: Iterable, kinds: tuple[type, ...] = (nn.Conv2d,)) -> Masks:
    """PrUE connection scores (Wang et al.; ``pruner.py`` ``prue``): ``|∂U/∂mask| = |w ⊙ ∂U/∂w|`` with ``U`` the
    :func:`prue_uncertainty_loss` summed over ``data``, the model in eval mode; ``p̄`` is computed in a first pass.

    Under ``torch.distributed`` the class sums and the gradients are summed over the ranks (each rank scoring its
    own batches gives the scores of all of them, and every rank the same masks): call it on every rank.

    Args:
        model: the (dense) teacher; its mode and ``requires_grad`` flags are restored afterwards.
        data: an iterable of ``(x [B, ...], y [B], ...)`` batches, iterated twice (the authors: the whole training
            set, batches of one class; in eval mode the batching does not change the scores).
        kinds: the module types scored (the authors: ``nn.Conv2d`` only).

    Returns:
        ``{name: score}`` shaped like each weight.
    """
    modules = prunable_modules(model, kinds)
    if not modules:
        raise ConfigError(f"prue: the teacher has no {'/'.join(k.__name__ for k in kinds)} layer to prune")
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    try:
        sums = counts = None
        with torch.no_grad():
            for x, y in _batches(data):
                z = model(x)
                p = F.softmax(z, dim=1).gather(1, y.view(-1, 1).long()).view(-1)
                if sums is None:
                    sums = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
                    counts = torch.zeros_like(sums)
                sums.index_add_(0, y.long(), p.to(sums))
                counts.index_add_(0, y.long(), torch.ones_like(p, dtype=sums.dtype))
        if sums is None:
            raise ConfigError("prue: the pruning data yielded no batch; give it at least one labelled batch")
        sums, counts = all_reduce_tensor_sum(sums), all_reduce_tensor_sum(counts)
        mean = sums / counts.clamp(min=1)
        weights = [m.weight for m in modules.values()]
        for w in weights:
            w.requires_grad_(True)
        grads = [torch.zeros_like(w) for w in weights]
        with torch.enable_grad():
            for x, y in _batches(data):
                p = F.softmax(model(x), dim=1).gather(1, y.view(-1, 1).long()).view(-1)
                for g, d in zip(grads, torch.autograd.grad(prue_uncertainty_loss(p, y, mean), weights,
                                                           allow_unused=True)):
                    if d is not None:
                        g.add_(d)
        return {n: (w.detach() * all_reduce_tensor_sum(g)).abs()
                for (n, _), w, g in zip(modules.items(), weights, grads)}
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def student_plan(pruned_teacher: nn.Module, in_channels: int | None = None) -> list[int]:
    """Park & No's student widths from the pruned teacher (``models/base.py`` ``get_student_plan``): conv layer ``l``
    (registration order) gets ``round(nnz_l / (k_h · k_w · c_{l−1}))`` output channels, ``c_{l−1}`` the student's
    previous width (the input channels for the first conv), i.e. the dense layer holding as many weights as the
    pruned one keeps. At least 1 channel.

    The authors' code divides the later layers by ``3 · c_{l−1}``; their published student plans
    (``vgg19_rwd_st79`` etc. in ``models/cifar_vgg.py``) keep ``0.8^7`` of the weights only with the kernel size
    ``k_h · k_w = 9`` there, which is what this function uses.

    Args:
        pruned_teacher: a teacher whose pruned weights are zeros.
        in_channels: the network's input channels (default: the first conv's ``in_channels``).

    Returns:
        One width per ``nn.Conv2d``, in order (classifier layers are kept as they are).
    """
    convs = list(prunable_modules(pruned_teacher, (nn.Conv2d,)).values())
    if not convs:
        raise ConfigError("student_plan: the pruned teacher has no nn.Conv2d layer")
    prev = int(in_channels if in_channels is not None else convs[0].in_channels)
    plan = []
    for conv in convs:
        nnz = int((conv.weight.detach() != 0).sum())
        width = max(1, int(round(nnz / (conv.kernel_size[0] * conv.kernel_size[1] * prev))))
        plan.append(width)
        prev = width
    return plan


# ------------------------------------------------------------------------------------ methods on a teacher copy


def freeze_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, eval mode, ``requires_grad=False`` (the original is not touched)."""
    out = copy.deepcopy(model)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _single_teacher(teacher, name: str) -> nn.Module:
    ts = teacher_list(teacher)
    if len(ts) != 1:
        raise ConfigError(f"{name} changes one teacher (its own copy of it); give exactly one teacher network "
                          f"(model.teacher), got {len(ts)}")
    return ts[0]


class _SparseTeacherKD(Distiller):
    """KD ``ce_weight·CE + kd_weight·T²·KL(p_t ‖ p_s)`` (batch mean) from a pruned copy of the teacher.

    The copy is the submodule ``sparse_teacher`` (frozen, always in eval mode, checkpointed with the distiller);
    ``self.teachers`` is ``[sparse_teacher]``, so the base class runs it under ``no_grad``. ``pruned`` (a buffer)
    records that the copy is pruned, so a resumed run never prunes again. Subclasses implement :meth:`prune`.
    """

    pruned_kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear)

    def __init__(self, student, teacher, cfg, **context) -> None:
        dense = _single_teacher(teacher, type(self).method_name)
        super().__init__(student, teacher, cfg, **context)
        sparse = freeze_copy(dense)
        self.sparse_teacher = sparse
        self.__dict__["teachers"] = [sparse]
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))
        self.masks: Masks = {}

    def prune(self, data: Iterable | None) -> None:
        raise NotImplementedError

    def _finish_pruning(self, masks: Masks) -> None:
        apply_masks_(self.sparse_teacher, masks)
        self.masks = masks
        self.pruned.fill_(True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        if not bool(self.pruned):
            self.prune([(x, y)])
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        kd = L.kd_loss(z_s, z_t, self.temperature)
        return self.combine(z_s, self.ce(z_s, y), kd, kd=kd)


@register("prue")
class PrUE(_SparseTeacherKD):
    """PrUE (Wang, Chen, Kou & Shi, ECML-PKDD 2022; authors' code ``wangshaopu/prue``): prune the teacher where that
    most raises its predictive uncertainty, then KD from the sparse teacher.

    Scores :func:`prue_scores` (``pruner.py`` ``prue``: ``|∂/∂mask Σ_x |p̄_y − p_y(x)||``, teacher in eval mode, all
    ``nn.Conv2d`` weights as in ``utils.py`` ``model_prune``), global threshold :func:`global_threshold_masks` at
    ``sparsity``; the pruned weights of the copy are set to zero. KD as the authors' ``trainModule.py``
    ``DistillModule``: ``0.9·CE + 0.1·T²·KL`` (batch mean), T = 4.

    Pruning data: the ``prune_loader`` keyword of :func:`~bsnn.distill.build_distiller` (an iterable of ``(x, y)``
    batches; the authors use the whole training set) prunes at construction; without it (the CLI pipeline) the copy
    is pruned on the **first training batch** the distiller sees (same formula on less data; under torchrun on the
    first batch of every rank, scores summed over the ranks).

    Differences from the authors' code: the authors fine-tune the sparse teacher (a full training run, masks kept)
    before distilling; here the copy is distilled from as pruned. For the authors' teacher, prune with
    :func:`prue_scores` + :func:`global_threshold_masks` + :func:`apply_masks_`, fine-tune with
    :func:`mask_gradients_` and :func:`bsnn.train.train_teacher`, then distil from the result with ``sparsity=0``.
    Params: ``sparsity`` (0.5, the authors' ``--ratio``). Published: CE 0.9, KD 0.1, T = 4.
    """

    default_ce_weight = 0.9
    default_kd_weight = 0.1
    default_temperature = 4.0
    param_defaults = {"sparsity": 0.5}
    pruned_kinds = (nn.Conv2d,)

    def __init__(self, student, teacher, cfg, *, prune_loader: Iterable | None = None, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if not 0.0 <= float(self.hparams["sparsity"]) < 1.0:
            raise ConfigError(f"prue: params.sparsity must be in [0, 1), got {self.hparams['sparsity']}")
        if float(self.hparams["sparsity"]) == 0:
            self.pruned.fill_(True)
        elif prune_loader is not None:
            self.prune(prune_loader)

    def prune(self, data: Iterable | None) -> None:
        scores = prue_scores(self.sparse_teacher, data, self.pruned_kinds)
        self._finish_pruning(global_threshold_masks(scores, float(self.hparams["sparsity"])))


@register("prune_distill")
class PruneDistill(_SparseTeacherKD):
    """"Prune your model before distill it" (Park & No, ECCV 2022; authors' code ``ososos888/prune-then-distill``).

    The copy of the teacher is pruned as ``pruning/lr_rewinding.py``: global L1 unstructured pruning over every
    ``nn.Conv2d`` and ``nn.Linear`` weight, :func:`pruning_rounds` rounds (``pruning_ratio`` 0.8 -> 7 rounds, 79 %
    sparsity) each removing ``round_fraction`` (0.2) of the remaining weights (:func:`magnitude_round_masks`). KD as
    ``kd/kd_vanilla.py`` ``loss_fn_kd``: ``α·T²·KL (batch mean) + (1 − α)·CE`` with α = 0.95, T = 10.
    The student the authors distil into is built from the pruned teacher's shape: :func:`student_plan`; with
    ``params.student_plan: true`` the pipeline does so (:meth:`student_kwargs`: ``channels`` = the plan, for
    student architectures with per-conv ``channels``: ``plain_vgg8``, ``vgg15_snn``). Off by default, so the
    method also distils into any configured student.

    Differences from the authors' code: they fine-tune the teacher after every round (LR rewinding, 130 epochs a
    round on CIFAR-100); here the rounds run back to back at construction (no data: without fine-tuning the rounds
    equal one-shot magnitude pruning to ``1 − 0.8^n``). For the authors' teacher, prune and fine-tune with
    :func:`magnitude_round_masks`, :func:`apply_masks_`, :func:`mask_gradients_` and
    :func:`bsnn.train.train_teacher`, then distil with ``pruning_ratio=0``.
    Params: ``pruning_ratio`` (0.8), ``round_fraction`` (0.2), ``student_plan`` (false). Published: CE 0.05,
    KD 0.95, T = 10.
    """

    default_ce_weight = 0.05
    default_kd_weight = 0.95
    default_temperature = 10.0
    param_defaults = {"pruning_ratio": 0.8, "round_fraction": 0.2, "student_plan": False}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        self.rounds = self._rounds(self.hparams)
        self.prune(None)

    @staticmethod
    def _rounds(hparams: dict) -> int:
        ratio, frac = float(hparams["pruning_ratio"]), float(hparams["round_fraction"])
        if ratio < 0 or not 0.0 < frac < 1.0:
            raise ConfigError(f"prune_distill: params.pruning_ratio must be >= 0 and round_fraction in (0, 1), got "
                              f"{ratio} / {frac}")
        return pruning_rounds(ratio, frac) if ratio > 0 else 0

    @classmethod
    def pruned_masks(cls, teacher: nn.Module, hparams: dict) -> Masks:
        """The masks of the pruning rounds on ``teacher``'s weights (data-free: magnitude only)."""
        weights = {n: m.weight for n, m in prunable_modules(teacher, cls.pruned_kinds).items()}
        masks = {n: torch.ones_like(w) for n, w in weights.items()}
        for _ in range(cls._rounds(hparams)):
            masks = magnitude_round_masks(weights, masks, float(hparams["round_fraction"]))
        return masks

    def prune(self, data: Iterable | None) -> None:
        self._finish_pruning(self.pruned_masks(self.sparse_teacher, self.hparams))

    @classmethod
    def student_kwargs(cls, teacher, cfg) -> dict:
        """``{"channels": student_plan(pruned teacher)}`` with ``params.student_plan: true``, else ``{}``."""
        hparams = cls.check_params(cfg.params)
        if not hparams["student_plan"]:
            return {}
        pruned = freeze_copy(_single_teacher(teacher, cls.method_name))
        apply_masks_(pruned, cls.pruned_masks(pruned, hparams))
        return {"channels": student_plan(pruned)}


# ------------------------------------------------------------------------------------------------- MetaDistil


def pilot_step(params: dict[str, torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """MetaDistil's pilot (assumed) student update ``θ' = θ − lr · g`` (plain SGD), kept in the graph."""
    return {n: p - lr * g for (n, p), g in zip(params.items(), grads)}


def meta_distil_loss(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, temperature: float, ce_weight: float,
                     kd_weight: float) -> torch.Tensor:
    """The student's objective in MetaDistil's CV code: ``ce_weight·CE + kd_weight·T²·Σ_k p_t (log p_t − log p_s)``
    (batch mean; ``distiller_zoo/KD.py`` ``CustomDistillKL``). ``z_s``, ``z_t``: logits ``[B, K]``; ``y``: ``[B]``."""
    return ce_weight * F.cross_entropy(z_s, y) + kd_weight * L.kd_loss(z_s, z_t, temperature)


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("metadistil: quiz_loader yielded no batch; give it a non-empty loader")


@register("metadistil")
class MetaDistil(Distiller):
    """MetaDistil (Zhou, Xu & McAuley, ACL 2022; authors' code ``JetRunner/MetaDistil``, ``cv/helper/meta_loops.py``
    ``train_distill``): the teacher learns to teach from the student's quiz-set loss after a pilot update.

    Each training batch (one meta batch, the authors' ``num_meta_batches=1``):

    1. pilot: ``θ' = θ_s − η·∇_θs [ce_weight·CE + kd_weight·KD](f(x; θ_s), g(x; θ_t))`` with the graph kept, on
       detached copies of the student's parameters (:func:`torch.func.functional_call`; the real student and its
       BatchNorm statistics are untouched, as the authors' backup/restore);
    2. quiz: ``quiz = CE(f(x_q; θ'), y_q)``, whose gradient reaches only the teacher (the meta-gradient);
    3. real: ``ce_weight·CE + kd_weight·KD`` on the batch with the teacher's logits as constants.

    ``loss = real + quiz``: one backward gives the student the real loss's gradient and the teacher the
    meta-gradient; ``fit``'s optimiser steps the student, and the teacher has its own SGD, as in the authors' code
    (momentum 0.9, weight decay 5e-4, lr = the pilot step η at the current epoch — the authors use one lr for the
    student, its pilot and the teacher, decayed at the same milestones), stepped by :meth:`after_step`. (Sharing the
    student's optimiser — Adam, lr 2e-3 in the CIFAR-10 benchmark — wrecked the trained teacher within the run.) The teacher always runs in eval mode (running BN statistics), as in the authors' code.
    The teacher is the distiller's own copy ``meta_teacher`` (a trained submodule, saved in its ``state_dict``):
    the user's (pre-trained) teacher is never changed.

    Quiz data: the authors hold out a separate part of the training set (``CIFAR100WithHeld``, its own loader);
    here the ``quiz_loader`` keyword of :func:`~bsnn.distill.build_distiller` does that, else (the CLI pipeline) the
    last ``quiz_fraction`` of every training batch is held out (never in the student's pilot or real loss; it does
    share the student's BatchNorm batch statistics in the real forward).

    Schedule as the authors': the teacher is frozen for the first 149 of 240 epochs (their teacher lr is 0 until
    epoch 150) and the pilot step η = ``pilot_lr`` (0.05) is multiplied by ``pilot_decay`` (0.1) at each of
    ``pilot_milestones`` (their epochs 150, 180, 210: 0-based 149, 179, 209); both scale to the run's epochs when
    left at None. With the epoch unknown (``set_epoch`` never called) the teacher is trained and η = ``pilot_lr``.

    Differences from the authors' code: the real loss uses the teacher from before this step's meta update (the
    authors update the teacher first); the teacher's SGD momentum is not in ``fit``'s checkpoint (a resumed run
    restarts it). The authors'
    CV script leaves α unset (``-a`` default None) and ``held_size`` required; α = 0.9 and T = 4 are their
    RepDistiller KD setting, ``quiz_fraction`` 0.1 is bsnn's choice.
    Params: ``teacher_delay`` (None), ``pilot_lr`` (0.05), ``pilot_decay`` (0.1), ``pilot_milestones`` (None),
    ``quiz_fraction`` (0.1). Published: CE 0.1, KD 0.9, T = 4.
    """

    default_ce_weight = 0.1
    default_kd_weight = 0.9
    default_temperature = 4.0
    param_defaults = {"teacher_delay": None, "pilot_lr": 0.05, "pilot_decay": 0.1, "pilot_milestones": None,
                      "quiz_fraction": 0.1}
    schedule_defaults = {"teacher_delay": (149, 240)}
    published_milestones = (149, 179, 209)  # 0-based epochs of the authors' 240

    def __init__(self, student, teacher, cfg, *, quiz_loader: Iterable | None = None, **context) -> None:
        dense = _single_teacher(teacher, "metadistil")
        super().__init__(student, teacher, cfg, **context)
        if not 0.0 < float(self.hparams["quiz_fraction"]) < 1.0:
            raise ConfigError(f"metadistil: params.quiz_fraction must be in (0, 1), got "
                              f"{self.hparams['quiz_fraction']}")
        self.meta_teacher = unfreeze_(copy.deepcopy(dense).eval())
        self.__dict__["teachers"] = [self.meta_teacher]  # Distiller.train keeps it in eval mode
        self.milestones = self._milestones()
        self._quiz = None if quiz_loader is None else _cycle(quiz_loader)
        self.teacher_optimizer = torch.optim.SGD(list(self.meta_teacher.parameters()),
                                                 lr=float(self.hparams["pilot_lr"]), momentum=0.9, weight_decay=5e-4)

    def separately_optimized(self) -> list[nn.Parameter]:
        """The teacher's parameters: stepped by :attr:`teacher_optimizer`, not by ``fit``'s optimiser."""
        return list(self.meta_teacher.parameters())

    def after_step(self) -> None:
        """After ``fit``'s step: the teacher's SGD step on its meta-gradient (while the teacher is active), at
        η = :meth:`pilot_lr`; its gradients are cleared either way."""
        opt = self.teacher_optimizer
        if self.teacher_active():
            for group in opt.param_groups:
                group["lr"] = self.pilot_lr()
            opt.step()
        opt.zero_grad(set_to_none=True)

    def _milestones(self) -> list[float]:
        given = self.hparams["pilot_milestones"]
        if given is not None:
            return sorted(float(m) for m in given)
        if self.run_epochs is None:
            warnings.warn("metadistil: the run's epoch count is unknown, so params.pilot_milestones keep the "
                          "published epochs 149, 179, 209 (of 240); pass epochs= to build_distiller",
                          DistillWarning, stacklevel=3)
            return [float(m) for m in self.published_milestones]
        return [m * self.run_epochs / 240.0 for m in self.published_milestones]

    def teacher_active(self) -> bool:
        """The meta update runs from epoch ``teacher_delay`` on (always when the epoch is unknown)."""
        return self.progress is None or self.progress >= float(self.hparams["teacher_delay"])

    def pilot_lr(self) -> float:
        """η at the current epoch: ``pilot_lr · pilot_decay^(milestones passed)``."""
        passed = 0 if self.progress is None else sum(self.progress >= m for m in self.milestones)
        return float(self.hparams["pilot_lr"]) * float(self.hparams["pilot_decay"]) ** passed

    def split(self, x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(n_train, x_quiz, y_quiz)``: the quiz rows are the last ``ceil(quiz_fraction·B)`` (or a quiz_loader
        batch); with a batch of one row there is no quiz."""
        if self._quiz is not None:
            xq, yq = next(self._quiz)[:2]
            return x.shape[0], xq.to(x.device, x.dtype), yq.to(y.device)
        b = x.shape[0]
        if b < 2:
            return b, None, None
        n_quiz = min(b - 1, max(1, math.ceil(float(self.hparams["quiz_fraction"]) * b)))
        return b - n_quiz, x[b - n_quiz:], y[b - n_quiz:]

    def quiz_loss(self, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """Steps 1–2: the student's quiz CE after the pilot step, differentiable in the teacher only."""
        params = {n: p.detach().requires_grad_(True) for n, p in self.student.named_parameters() if p.requires_grad}
        buffers = {n: b.clone() for n, b in self.student.named_buffers()}  # BN statistics: scratch copies
        z_s = functional_call(self.student, {**params, **buffers}, (x,))
        z_t = self.meta_teacher(x)
        pilot = meta_distil_loss(z_s, z_t, y, self.temperature, self.ce_weight, self.kd_weight)
        grads = torch.autograd.grad(pilot, list(params.values()), create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        fast = pilot_step(params, grads, self.pilot_lr())
        buffers = {n: b.clone() for n, b in self.student.named_buffers()}
        return F.cross_entropy(functional_call(self.student, {**fast, **buffers}, (xq,)), yq)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        n, xq, yq = self.split(x, y)
        active = xq is not None and self.teacher_active()
        self.meta_teacher.eval()
        quiz = self.quiz_loss(x[:n], y[:n], xq, yq) if active else None
        with torch.no_grad():
            z_t = self.meta_teacher(x[:n])
        z_s = self.student(x)
        kd = L.kd_loss(z_s[:n], z_t, self.temperature)
        out = self.combine(z_s, self.ce(z_s[:n], y[:n]), kd, kd=kd)
        if quiz is not None:
            out["loss"] = out["loss"] + quiz
            out["quiz"] = quiz.detach()
        return out


__all__ = ["MetaDistil", "PrUE", "PruneDistill", "apply_masks_", "freeze_copy", "global_threshold_masks",
           "magnitude_round_masks", "mask_gradients_", "meta_distil_loss", "pilot_step", "prunable_modules",
           "prue_scores", "prue_uncertainty_loss", "pruning_rounds", "student_plan", "weight_sparsity"]
