"""Methods that decide where or how a feature is distilled: sakd, lipschitz, ie_kd.

* ``sakd`` — spot-adaptive KD (Song et al. 2022): a policy network routes every sample, at every iteration, to
  the spots (layers and the output) where it is distilled; it wraps a registered feature method (``at`` by
  default) and logit KD.
* ``lipschitz`` — Lipschitz-continuity-guided KD (LONDON, Shang et al., ICCV 2021): the spectral norms of the
  transmitting matrices between consecutive feature maps (a layer-wise Lipschitz estimate, by power iteration) of
  student and teacher are matched, with the authors' margin-based feature term.
* ``ie_kd`` — inheritance and exploration KD (Huang et al., CVPR 2021): half of the student's channels inherit the
  teacher's auto-encoded factors, the other half are pushed away from them.

Features come from forward hooks (:class:`bsnn.distill.hooks.FeatureTap`); SAKD's grafted forward replaces tapped
values with hooks that exist only inside :class:`_Replace`. The pure functions come first (each method is checked in
float64, value and gradient, against a restatement of its authors' code in ``tests/test_distill_adaptive.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bsnn.distill import losses as L
from bsnn.distill.base import METHODS, Distiller, register, teacher_list
from bsnn.distill.feature import _LAYER_PARAMS, FeatureDistiller
from bsnn.distill.hooks import FeatureTap, default_layer, find_module, model_device, parse_layer, probe_features
from bsnn.errors import ConfigError

# ------------------------------------------------------------------------------------------------ pure losses


def gumbel_noise(shape: Sequence[int], *, device=None, dtype=None, eps: float = 1e-20) -> torch.Tensor:
    """Gumbel(0, 1) samples ``−log(−log(U + eps) + eps)``, ``U ~ U[0, 1)`` (SAKD models/gs.py ``sample_gumbel``)."""
    u = torch.rand(tuple(shape), device=device, dtype=dtype)
    return -torch.log(-torch.log(u + eps) + eps)


def hard_gumbel_softmax(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax: one-hot ``argmax`` forward, ``softmax((logits + noise)/τ)`` gradient.

    Args:
        logits: ``[..., n]`` unnormalised scores.
        noise: Gumbel noise of the same shape (:func:`gumbel_noise`).
        temperature: τ > 0 (SAKD: 5).

    Returns:
        ``[..., n]`` one-hot values carrying the soft sample's gradient.
    """
    soft = F.softmax((logits + noise) / float(temperature), dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return (hard - soft).detach() + soft


def transmitting_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """LONDON's (FSP-style) transmitting matrix ``f1 · f2ᵀ / (H·W)`` between two maps.

    Args:
        f1: ``[B, C1, H1, W1]``; average-pooled to ``f2``'s ``H × W`` when larger.
        f2: ``[B, C2, H2, W2]``; pooled to ``f1``'s size when larger (the authors' code assumes it is not).

    Returns:
        ``[B, C1, C2]``.
    """
    if f1.shape[-2:] != f2.shape[-2:]:
        f1, f2 = L.pool_to_common(f1, f2)
    a = f1.flatten(2)
    return torch.bmm(a, f2.flatten(2).transpose(1, 2)) / a.shape[2]


def spectral_norm_power(m: torch.Tensor, iterations: int = 10, eps: float = 1e-12) -> torch.Tensor:
    """Largest singular value of every ``m[b]`` by power iteration on ``K = m mᵀ`` (LONDON ``top_eigenvalue``).

    ``v₀ = 1``; ``v ← K v / ‖K v‖`` for ``iterations`` steps, differentiated through every step; the estimate is
    ``sqrt(‖K v_{k−1}‖ / ‖v_k‖) = sqrt(λ_max(K)) = σ_max(m)``.

    Args:
        m: ``[B, C1, C2]`` transmitting matrices.
        iterations: power-iteration steps (CIFAR code: 10).
        eps: floor of ``‖K v‖`` (only matters for an all-zero matrix, where the authors' code divides by 0).

    Returns:
        ``[B, 1, 1]`` spectral-norm estimates.
    """
    k = torch.bmm(m, m.transpose(1, 2))
    v = torch.ones(k.shape[0], k.shape[1], 1, device=k.device, dtype=k.dtype)
    n = None
    for _ in range(int(iterations)):
        u = torch.bmm(k, v)
        n = torch.norm(u, dim=1, keepdim=True).clamp_min(eps)
        v = u / n
    if n is None:
        raise ConfigError("lipschitz: params.power_iterations must be >= 1")
    return torch.sqrt(n / torch.norm(v, dim=1, keepdim=True))


def lipschitz_loss(feats_s: Sequence[torch.Tensor], feats_s_next: Sequence[torch.Tensor],
                   feats_t: Sequence[torch.Tensor], iterations: int = 10) -> torch.Tensor:
    """LONDON's spectral term ``Σ_i MSE(σ(TM_s,i), σ(TM_t,i)) / 2^(n−i−1)`` over consecutive tap pairs.

    ``TM_s,i = transmitting_matrix(feats_s[i], feats_s_next[i])``, ``TM_t,i`` from ``feats_t[i], feats_t[i+1]``
    (detached), σ by :func:`spectral_norm_power`. The front pairs weigh most (the authors' ``2 ** (n − i − 1)``).

    Args:
        feats_s: the student's first maps of each pair, ``n − 1`` tensors ``[B, C, H, W]`` (the authors pass the
            connector output here).
        feats_s_next: the student's second maps, ``n − 1`` tensors (the raw next tap in the authors' code).
        feats_t: the teacher's ``n`` tapped maps.
        iterations: power-iteration steps.

    Returns:
        Scalar loss.
    """
    n = len(feats_t)
    total = feats_t[0].new_zeros(())
    for i in range(n - 1):
        sig_s = spectral_norm_power(transmitting_matrix(feats_s[i], feats_s_next[i]), iterations)
        sig_t = spectral_norm_power(transmitting_matrix(feats_t[i].detach(), feats_t[i + 1].detach()), iterations)
        total = total + F.mse_loss(sig_s, sig_t) / 2 ** (n - i - 1)
    return total


def margin_feature_loss(f_s: torch.Tensor, f_t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Overhaul-style partial L2 (Heo 2019) as LONDON uses it: ``Σ (f_s − max(f_t, m))²`` where ``f_s > target`` or
    ``f_t > 0`` (a sum over all elements; the caller divides by the batch).

    Args:
        f_s: connector output ``[B, C, H, W]``.
        f_t: teacher map ``[B, C, H, W]`` (detached by the caller).
        margin: ``[1, C, 1, 1]`` per-channel margins (``−inf`` = none).
    """
    target = torch.max(f_t, margin)
    mask = ((f_s > target) | (target > 0)).to(f_s.dtype)
    return (F.mse_loss(f_s, target, reduction="none") * mask).sum()


def bn_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel margin ``E[x | x < 0]`` of ``x ~ N(β, γ²)`` from a teacher BatchNorm's affine parameters
    (LONDON / OFD ``get_margin_from_BN``); ``−3|γ|`` where ``Φ(−β/|γ|) ≤ 0.001``. Returns ``[C]``."""
    out = []
    for s, m in zip(bn.weight.detach().abs().tolist(), bn.bias.detach().tolist()):
        cdf = 0.5 * math.erfc((m / s) / math.sqrt(2.0))  # Φ(−m/s)
        if cdf > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=bn.weight.dtype, device=bn.weight.device)


def factor_transfer_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IE-KD's ``_factor_transfer`` (p = 1): mean ``|x/‖x‖ − y/‖y‖|`` over every element, each sample flattened and
    L2-normalised. ``x, y``: ``[B, C, H, W]`` of the same size. Returns a scalar."""
    d = F.normalize(x.flatten(1), p=2, dim=1) - F.normalize(y.flatten(1), p=2, dim=1)
    return d.abs().sum() / d.numel()


def ie_kd_losses(f_inh: torch.Tensor, f_exp: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inheritance, exploration)`` = ``(D(f_inh, f_t), −D(f_exp, f_t))`` with :func:`factor_transfer_distance`
    (the authors' ``NormLoss(p=1)`` and ``NormLoss(p=1, negative=True)``). Factors ``[B, C, H, W]``; the larger
    map is average-pooled to the smaller one first."""
    a, t1 = L.pool_to_common(f_inh, f_t)
    b, t2 = L.pool_to_common(f_exp, f_t)
    return factor_transfer_distance(a, t1), -factor_transfer_distance(b, t2)


def reconstruction_loss(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """IE-KD's ``RecLoss`` (p = 1): mean ``|x − rec|``."""
    return (x - rec).abs().sum() / x.numel()


# ------------------------------------------------------------------------------------------------ helpers


class _Replace:
    """Context manager: during forwards inside it, the tapped values of ``specs`` are replaced by ``values``
    (output specs by a forward hook, ``"name:in"`` specs by a pre-hook). Hooks are removed on exit."""

    def __init__(self, model: nn.Module, specs: Sequence[str], values: Sequence[torch.Tensor]) -> None:
        self._targets = [(find_module(model, parse_layer(s)[0]), parse_layer(s)[1], v) for s, v in zip(specs, values)]
        self._handles: list = []

    def __enter__(self) -> "_Replace":
        for module, use_input, value in self._targets:
            if use_input:
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, v=value: (v.clone(),) + tuple(args[1:])))
            else:  # a copy: an in-place op downstream (ReLU(inplace=True)) must not alter the stored value
                self._handles.append(module.register_forward_hook(lambda m, args, out, v=value: v.clone()))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ConvReg(nn.Module):
    """SAKD's ``ConvReg`` (models/util.py): conv chosen from the two map shapes, then BatchNorm and ReLU.
    ``[B, C_in, H_in, W_in]`` -> ``[B, C_out, H_out, W_out]``."""

    def __init__(self, shape_in: Sequence[int], shape_out: Sequence[int]) -> None:
        super().__init__()
        _, c_i, h_i, w_i = shape_in
        _, c_o, h_o, w_o = shape_out
        if h_i == 2 * h_o:
            self.conv = nn.Conv2d(c_i, c_o, kernel_size=3, stride=2, padding=1)
        elif h_i * 2 == h_o:
            self.conv = nn.ConvTranspose2d(c_i, c_o, kernel_size=4, stride=2, padding=1)
        elif h_i >= h_o:
            self.conv = nn.Conv2d(c_i, c_o, kernel_size=(1 + h_i - h_o, 1 + w_i - w_o))
        else:
            s = h_o // h_i
            self.conv = nn.ConvTranspose2d(c_i, c_o, kernel_size=(h_o - s * (h_i - 1), w_o - s * (w_i - 1)), stride=s)
        self.bn = nn.BatchNorm2d(c_o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _graft_head(f_in: torch.Tensor, f_out: torch.Tensor) -> nn.Module:
    """``ConvReg`` between maps, ``nn.Linear`` (SAKD's ``LinearClassifier``) between vectors."""
    if f_in.dim() == 4 and f_out.dim() == 4:
        return ConvReg(f_in.shape, f_out.shape)
    if f_in.dim() == 2 and f_out.dim() == 2:
        return nn.Linear(f_in.shape[1], f_out.shape[1])
    raise ConfigError(f"sakd: a spot must give maps [B, C, H, W] or vectors [B, D] in both networks, got "
                      f"{tuple(f_in.shape)} / {tuple(f_out.shape)}")


def _pair_loss_methods() -> list[str]:
    """Registered feature methods SAKD can wrap: those scoring one layer pair at a time (``pair_loss``)."""
    return [n for n in METHODS.names() if issubclass(METHODS.get(n), FeatureDistiller)
            and METHODS.get(n).pair_loss is not FeatureDistiller.pair_loss]


def _as_mask(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------------- sakd

#: SAKD's ``classify_weight`` (γ of the policy loss) per wrapped method, from the authors' CIFAR-100 configs.
SAKD_GAMMA = {"at": 2.0, "vid": 2.0, "rkd": 2.0}


@register("sakd")
class SAKD(Distiller):
    """Spot-adaptive KD (Song, Chen, Ye, Song, IEEE TIP 2022; zju-vipa/spot-adaptive-pytorch ``train.py``
    ``train_epoch``, ``models/gs.py``, ``models/util.py`` ``ConvReg``, ``models/classifier.py``).

    Spots are the wrapped method's layer pairs plus the output. A policy (``nn.Linear`` on the detached
    penultimate features of teacher and student, concatenated) scores ``[B, n_spots, 2]``; a straight-through
    Gumbel-softmax (τ = ``policy_temperature``) picks per sample and spot whether to distill there (``a = 1``).

    Student loss: ``ce_weight·CE + kd_weight·KD_T(z_s[a_out], z_t[a_out])·|a_out|/B
    + feature_weight·Σ_i pair_loss_i(f_s[a_i], f_t[a_i])·|a_i|/B``, the pair loss being the wrapped method's
    (:meth:`FeatureDistiller.pair_loss`, its heads trained with the student).

    Policy loss (trains the policy and the graft heads only, not the student): the student and teacher are run
    again, grafted at every spot — the student's next stage gets ``(1−a)·s + a·anti_hint(t)``, the teacher's
    ``(1−a)·hint(s) + a·t`` — and their logits mixed ``(1−a_out)·z_s + a_out·z_t``; its CE, ×γ if above the
    student's CE and then ÷γ if below it (the authors' two ``if``s), plus ``max(0, B/2 − Σ a_out)``. The student
    runs in eval mode with detached parameters there (the authors step it with a separate optimiser).

    Params: ``base`` (``at``; any method with a ``pair_loss``), ``base_params`` (the wrapped method's params:
    layers, ``p``, ...), ``feature_weight`` (None: the wrapped method's published weight, the authors'
    ``other_kd``), ``gamma`` (None: :data:`SAKD_GAMMA`, else 1), ``policy_temperature`` (5), ``policy_weight``
    (0.5), ``homo`` (True: policy bias +10 on "distill", so it starts distilling everywhere, as the authors'
    configs), ``policy_layer`` / ``policy_teacher_layer`` (None: the input of the last ``nn.Linear``).
    Published: CE 1, KD 1, T = 4.

    Differences from the authors' code: one optimiser (``fit``'s) trains everything; the policy loss is scaled
    by ``policy_weight`` = 0.5 instead of the agent optimiser's halved learning rate (equal for plain SGD, not for
    weight decay 1e-3 vs 5e-4 or Adam); grafting re-runs each network once per spot with the earlier spots'
    values replaced through hooks, instead of the authors' ``model(x, begin, end)`` segments (same values); the
    Gumbel noise is also drawn in eval mode; the wrapped FitNet keeps bsnn's weight 100 (the authors' SAKD config
    uses 1).
    """

    default_kd_weight = 1.0
    param_defaults = {"base": "at", "base_params": None, "feature_weight": None, "gamma": None,
                      "policy_temperature": 5.0, "policy_weight": 0.5, "homo": True, "policy_layer": None,
                      "policy_teacher_layer": None, "input_shape": None}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        hp = self.hparams
        base_name = str(hp["base"]).lower()
        valid = _pair_loss_methods()
        if base_name not in valid:
            raise ConfigError(f"sakd: params.base={base_name!r} cannot be wrapped; valid: {', '.join(valid)}")
        base_cfg = dataclasses.replace(cfg, method=base_name, params=dict(hp["base_params"] or {}), ce_weight=None,
                                       kd_weight=None)
        base = METHODS.get(base_name)(student, teacher, base_cfg, **context)
        self.__dict__["base_method"] = base  # not registered (its student is ours); its heads are, below
        for name, child in base.named_children():
            if name != "student":
                self.add_module("base_" + name, child)
        self.base_name = base_name
        self.student_layers, self.teacher_layers = base.student_layers, base.teacher_layers
        self.feature_weight = float(base.kd_weight if hp["feature_weight"] is None else hp["feature_weight"])
        self.gamma = float(SAKD_GAMMA.get(base_name, 1.0) if hp["gamma"] is None else hp["gamma"])

        s_pen = hp["policy_layer"] or default_layer(student, "student")
        t_pen = hp["policy_teacher_layer"] or hp["policy_layer"] or default_layer(self.teachers[0], "teacher")
        self.policy_layers = (s_pen, t_pen)
        shape = hp["input_shape"] or base.hparams.get("input_shape")
        f_s = probe_features(student, [*self.student_layers, s_pen], "student", self._example_input, shape)
        f_t = probe_features(self.teachers[0], [*self.teacher_layers, t_pen], "teacher", self._example_input, shape)
        device, dtype = model_device(student)
        n_spots = len(self.student_layers) + 1
        self.policy = nn.Linear(f_t[-1][0].numel() + f_s[-1][0].numel(), 2 * n_spots).to(device, dtype)
        if hp["homo"]:  # the authors' set_n_to_True: start by distilling at every spot
            with torch.no_grad():
                self.policy.bias[0::2] += 10.0
        self.hints = nn.ModuleList([_graft_head(a, b) for a, b in zip(f_s[:-1], f_t[:-1])]).to(device, dtype)
        self.anti_hints = nn.ModuleList([_graft_head(b, a) for a, b in zip(f_s[:-1], f_t[:-1])]).to(device, dtype)

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.base_method.pair_loss(i, f_s, f_t)

    def actions(self, pen_s: torch.Tensor, pen_t: torch.Tensor) -> torch.Tensor:
        """Routing ``[B, n_spots]`` (1 = distill at the spot; straight-through gradient to the policy)."""
        logits = self.policy(torch.cat([pen_t.detach().flatten(1), pen_s.detach().flatten(1)], 1))
        logits = logits.view(logits.shape[0], -1, 2)
        noise = gumbel_noise(logits.shape, device=logits.device, dtype=logits.dtype)
        return hard_gumbel_softmax(logits, noise, float(self.hparams["policy_temperature"]))[..., 0]

    def _run(self, model: nn.Module, x: torch.Tensor, replace: Sequence[str], values: Sequence[torch.Tensor],
             tap: Sequence[str], detach_params: bool) -> tuple[torch.Tensor, list]:
        params = {n: (p.detach() if detach_params else p) for n, p in model.named_parameters()}
        with _Replace(model, replace, values), FeatureTap(model, tap, "graft") as feats:
            z = functional_call(model, params, (x,)) if detach_params else model(x)
        return z, list(feats)

    def graft_logits(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` of the grafted student/teacher pair for routing ``a`` ``[B, n_spots]``.

        Pass ``k`` runs both networks with spots ``< k`` replaced by their mixes and reads spot ``k``; the student
        runs in eval mode with detached parameters, the (frozen) teacher with gradients flowing to the hints.
        """
        modes = {m: m.training for m in self.student.modules()}
        s_specs, t_specs, n = self.student_layers, self.teacher_layers, len(self.student_layers)
        mix_s: list[torch.Tensor] = []
        mix_t: list[torch.Tensor] = []
        try:
            self.student.eval()
            for k in range(n + 1):
                tap_s, tap_t = ([s_specs[k]], [t_specs[k]]) if k < n else ([], [])
                z_s, fs = self._run(self.student, x, s_specs[:k], mix_s, tap_s, detach_params=True)
                z_t, ft = self._run(self.teachers[0], x, t_specs[:k], mix_t, tap_t, detach_params=False)
                if k < n:
                    ak = _as_mask(a[:, k], fs[0])
                    mix_t.append((1 - ak) * self.hints[k](fs[0]) + ak * ft[0])
                    mix_s.append((1 - ak) * fs[0] + ak * self.anti_hints[k](ft[0]))
        finally:
            for m, mode in modes.items():
                m.training = mode
        a_out = a[:, -1].view(-1, 1)
        return z_s * (1 - a_out) + z_t * a_out

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        n_f = len(self.student_layers)
        z_t, f_t = self.teacher_forward(x, [*self.teacher_layers, self.policy_layers[1]])
        z_s, f_s = self.student_forward(x, [*self.student_layers, self.policy_layers[0]])
        a = self.actions(f_s[n_f], f_t[n_f])
        b = x.shape[0]
        feat = z_s.new_zeros(())
        for i in range(n_f):
            sel = a[:, i].detach() > 0.5
            if int(sel.sum()) > 0:
                feat = feat + self.pair_loss(i, f_s[i][sel], f_t[i][sel].detach()) * int(sel.sum()) / b
        sel = a[:, -1].detach() > 0.5
        kd = z_s.new_zeros(())
        if int(sel.sum()) > 0:
            kd = L.kd_loss(z_s[sel], z_t[sel], self.temperature) * int(sel.sum()) / b
        ce = self.ce(z_s, y)
        graft = F.cross_entropy(self.graft_logits(x, a), y)
        if graft > ce:
            graft = graft * self.gamma
        if graft < ce:
            graft = graft / self.gamma
        short = b / 2 - a[:, -1].sum()
        policy = graft + (short if float(short.detach()) > 0 else 0.0)
        out = self.combine(z_s, ce, kd, kd=kd, sakd_feature=feat, policy=policy,
                           distill_rate=a.detach().mean())
        out["loss"] = out["loss"] + self.feature_weight * feat + float(self.hparams["policy_weight"]) * policy
        return out


# ----------------------------------------------------------------------------------------------- lipschitz


def _connector(c_s: int, c_t: int) -> nn.Sequential:
    """LONDON / OFD ``build_feature_connector``: 1x1 conv (no bias) + BatchNorm, He-normal init (fan-out)."""
    conv, bn = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t)
    with torch.no_grad():
        conv.weight.normal_(0.0, math.sqrt(2.0 / c_t))
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    return nn.Sequential(conv, bn)


@register("lipschitz")
class Lipschitz(FeatureDistiller):
    """Lipschitz-continuity-guided KD, LONDON (Shang, Duan, Zong, Nie, Yan, ICCV 2021; authors' code
    42Shawn/LONDON ``CIFAR-100/distiller_london.py`` ``Distiller`` and ``train_with_distillation_a.py``, in that
    repository's git history: its current head only keeps the README).

    For ``n ≥ 2`` tapped maps per network, the student's map ``i`` goes through a trained connector (1x1 conv +
    BN to the teacher's channels). Loss::

        ce_weight·CE + kd_weight·decay·Σ_{i<n−1} MSE(σ(TM(conn_i(s_i), s_{i+1})), σ(TM(t_i, t_{i+1}))) / 2^(n−i−1)
                     + feature_weight·Σ_i margin_l2(conn_i(s_i), t_i, m_i) / 2^(n−i−1) / B

    ``TM`` the transmitting matrix (:func:`transmitting_matrix`), σ its spectral norm by power iteration
    (:func:`spectral_norm_power`, a layer-wise Lipschitz estimate), ``margin_l2`` the authors' partial L2
    (:func:`margin_feature_loss`) with margins ``m_i`` from the teacher's tapped BatchNorm (:func:`bn_margin`).
    As in the authors' code the pair's second student map is the raw tap (not its connector output).

    Params: ``student_layer`` / ``teacher_layer`` (lists of ≥ 2 maps in forward order; default: the outputs of the
    last two ``nn.Conv2d``; the authors tap pre-ReLU stage outputs, i.e. the BatchNorms before the ReLUs),
    ``feature_weight`` (1e-3), ``power_iterations`` (10), ``decay_epoch`` (None: 60 % of the run),
    ``decay_factor`` (0.25), ``input_shape``. Published (CIFAR-100 setting a, WRN-28-4 -> WRN-16-4): CE 1,
    spectral ``α/200`` = 0.8/200 = 0.004, ×0.25 from 60 % of training; other settings keep α constant (0.2, 0.25,
    1, 4) — set ``kd_weight = α/200`` and ``decay_factor = 1``.

    Differences: the power iteration starts from ones (the ImageNet code; the CIFAR code draws ``torch.rand``) and
    floors ``‖K v‖`` at 1e-12; a teacher tap that is not a ``BatchNorm2d`` gets no margin (``−inf``: target = the
    teacher's map); maps are pooled to the smaller size whichever is larger.
    """

    spatial = True
    default_kd_weight = 0.8 / 200.0
    param_defaults = {**_LAYER_PARAMS, "feature_weight": 1e-3, "power_iterations": 10, "decay_epoch": None,
                      "decay_factor": 0.25}
    schedule_defaults = {"decay_epoch": (120, 200)}

    def __init__(self, student, teacher, cfg, **context) -> None:
        p, teachers = dict(cfg.params or {}), teacher_list(teacher)
        if p.get("student_layer") is None and p.get("teacher_layer") is None and teachers:
            p["student_layer"] = _last_convs(student, "student")
            p["teacher_layer"] = _last_convs(teachers[0], "teacher")
            cfg = dataclasses.replace(cfg, params=p)
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) < 2:
            raise ConfigError("lipschitz: give at least two student_layer / teacher_layer maps (in forward order); "
                              "the transmitting matrices link consecutive maps")
        f_s, f_t = self.probe()
        for i, (a, b) in enumerate(zip(f_s, f_t)):
            if a.dim() != 4 or b.dim() != 4:
                raise ConfigError(f"lipschitz: layers {self.student_layers[i]!r} / {self.teacher_layers[i]!r} must "
                                  f"give [B, C, H, W] maps, got {tuple(a.shape)} / {tuple(b.shape)}")
        device, dtype = model_device(student)
        self.connectors = nn.ModuleList([_connector(a.shape[1], b.shape[1]) for a, b in zip(f_s, f_t)]).to(device,
                                                                                                         dtype)
        for i, (spec, b) in enumerate(zip(self.teacher_layers, f_t)):
            name, use_input = parse_layer(spec)
            module = find_module(self.teachers[0], name, "teacher")
            if isinstance(module, nn.BatchNorm2d) and not use_input and module.affine:
                m = bn_margin(module).to(device, dtype)
            else:
                m = torch.full((b.shape[1],), -math.inf, device=device, dtype=dtype)
            self.register_buffer(f"margin{i}", m.view(1, -1, 1, 1))

    def decay(self) -> float:
        """Spectral-weight factor: ``decay_factor`` from ``decay_epoch`` on (1 before, and with no epoch set)."""
        if self.progress is None or self.progress < float(self.hparams["decay_epoch"]):
            return 1.0
        return float(self.hparams["decay_factor"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        z_s, f_s, f_t = self.features(x)
        n = len(f_s)
        conn = [self.connectors[i](f) for i, f in enumerate(f_s)]
        f_t = [t.detach() for t in f_t]
        feature = sum(margin_feature_loss(*L.pool_to_common(conn[i], f_t[i]), getattr(self, f"margin{i}"))
                      / 2 ** (n - i - 1) for i in range(n)) / x.shape[0]
        spectral = lipschitz_loss(conn[:-1], f_s[1:], f_t, int(self.hparams["power_iterations"]))
        decay = self.decay()
        out = self.combine(z_s, self.ce(z_s, y), decay * spectral, lipschitz=spectral, margin_feature=feature)
        out["loss"] = out["loss"] + float(self.hparams["feature_weight"]) * feature
        return out


def _last_convs(model: nn.Module, role: str, count: int = 2) -> list[str]:
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Conv2d)]
    if len(names) < count:
        raise ConfigError(f"lipschitz: the {role} has {len(names)} nn.Conv2d, need {count}; name the maps in "
                          "distill.params (student_layer / teacher_layer)")
    return names[-count:]


# --------------------------------------------------------------------------------------------------- ie_kd


class Coder(nn.Module):
    """IE-KD's three-conv ``Coder`` (model/auto_encoder.py, ``use_bn=True``): LeakyReLU(0.1), then three times
    3x3 conv (no bias) -> BatchNorm -> LeakyReLU(0.1); ``cin -> cin -> cout -> cout`` channels; He-normal init
    (fan-out). ``[B, cin, H, W]`` -> ``[B, cout, H, W]``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LeakyReLU(0.1)]
        for a, b in ((cin, cin), (cin, cout), (cout, cout)):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (9 * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AutoEncoder(nn.Module):
    """IE-KD's ``auto_encoder``: ``Coder(cin, cout)`` then ``Coder(cout, cin)``; returns ``(factor, reconstruction)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.encoder = Coder(cin, cout)
        self.decoder = Coder(cout, cin)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


@register("ie_kd")
class IEKD(FeatureDistiller):
    """Inheritance and exploration KD (Huang et al., CVPR 2021; authors' code
    aliyun/Revisiting-Knowledge-Distillation-an-Inheritance-and-Exploration-Framework ``processors/IE_KD.py``,
    ``model/auto_encoder.py``, ``loss/factor_transfer.py``, ``loss/reconstruction.py``, ``config/ie_kd.yaml``).
    (The authors' code calls the trained network "teacher" and the given one "student"; here the given, frozen
    network is the teacher.)

    1. While ``progress < ae_epochs`` (epochs passed, fractions included) the teacher's auto-encoder (``embed_t``, ``C_t -> factor_rate·C_t``) learns to
       reconstruct the teacher's map (:func:`reconstruction_loss`); the loss is that term only, the student is
       not trained (its logits come from an eval-mode, no-grad forward).
    2. Afterwards the auto-encoder is frozen (eval mode, no grad) and the student's map is split channel-wise
       (``divide``: ``natural`` = first half / second half, ``random`` = a fixed random permutation) into an
       inheritance and an exploration half, each encoded by its own trained encoder (``embed_inh``, ``embed_exp``;
       the authors' auto-encoders, whose decoders are never used) to the factor size. Loss:
       ``ce_weight·CE + kd_weight·(inh_weight·D(φ_inh, φ_t) − exp_weight·D(φ_exp, φ_t))`` with
       :func:`factor_transfer_distance` D (the authors' ``NormLoss(p=1)`` / ``NormLoss(p=1, negative=True)``).

    Params: ``student_layer`` / ``teacher_layer`` (one ``[B, C, H, W]`` map each; default the last ``nn.Conv2d``
    output, the authors take the last stage's output), ``inh_weight`` (1), ``exp_weight`` (1), ``factor_rate``
    (0.5), ``divide`` (``natural``), ``ae_epochs`` (None: 30 of the authors' 30 + 160 epochs, scaled to the run;
    0 skips it), ``input_shape``. Published: CE 1, inheritance 1, exploration 1.

    Differences: the authors train the auto-encoder for 30 epochs before a separate 160-epoch run; here both
    stages share the run's epochs (``fit`` calls :meth:`set_epoch`; with no epoch set the student stage runs).
    Factor maps of different sizes are average-pooled to the smaller one (the authors' maps have the same size).
    """

    spatial = True
    param_defaults = {**_LAYER_PARAMS, "inh_weight": 1.0, "exp_weight": 1.0, "factor_rate": 0.5,
                      "divide": "natural", "ae_epochs": None}
    schedule_defaults = {"ae_epochs": (30, 190)}

    def __init__(self, student, teacher, cfg, **context) -> None:
        super().__init__(student, teacher, cfg, **context)
        if len(self.student_layers) != 1:
            raise ConfigError("ie_kd: give exactly one student_layer / teacher_layer pair")
        (f_s,), (f_t,) = self.probe()
        if f_s.dim() != 4 or f_t.dim() != 4:
            raise ConfigError(f"ie_kd: layers {self.student_layers[0]!r} / {self.teacher_layers[0]!r} must give "
                              f"[B, C, H, W] maps, got {tuple(f_s.shape)} / {tuple(f_t.shape)}")
        c_s, c_t = f_s.shape[1], f_t.shape[1]
        if c_s < 2:
            raise ConfigError(f"ie_kd: the student map has {c_s} channel(s); splitting needs at least 2")
        rate = float(self.hparams["factor_rate"])
        c_f = max(1, int(c_t * rate))
        divide = self.hparams["divide"]
        if divide == "natural":
            order = torch.arange(c_s)
        elif divide == "random":
            order = torch.randperm(c_s)
        else:
            raise ConfigError(f"ie_kd: params.divide must be 'natural' or 'random', got {divide!r}")
        half = c_s // 2
        device, dtype = model_device(student)
        self.register_buffer("inh_index", order[:half].to(device))
        self.register_buffer("exp_index", order[half:].to(device))
        self.embed_t = AutoEncoder(c_t, c_f).to(device, dtype)
        self.embed_inh = Coder(half, c_f).to(device, dtype)
        self.embed_exp = Coder(c_s - half, c_f).to(device, dtype)

    def in_ae_stage(self) -> bool:
        """True while the teacher's auto-encoder is trained (``progress < ae_epochs``: a fraction of an epoch in
        a short run)."""
        return self.progress is not None and self.progress < float(self.hparams["ae_epochs"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        if self.in_ae_stage():
            _, (f_t,) = self.teacher_forward(x, self.teacher_layers)
            self.embed_t.train(self.training)
            _, rec = self.embed_t(f_t.detach())
            rec_loss = reconstruction_loss(f_t.detach(), rec)
            modes = {m: m.training for m in self.student.modules()}
            try:
                self.student.eval()
                with torch.no_grad():
                    z_s = self.student(x)
            finally:
                for m, mode in modes.items():
                    m.training = mode
            ce = self.ce(z_s, y)
            return {"loss": rec_loss, "ce": ce.detach(), "reconstruction": rec_loss.detach(), "logits": z_s}
        z_s, (f_s,), (f_t,) = self.features(x)
        self.embed_t.eval()
        with torch.no_grad():
            phi_t, _ = self.embed_t(f_t)
        phi_inh = self.embed_inh(f_s.index_select(1, self.inh_index))
        phi_exp = self.embed_exp(f_s.index_select(1, self.exp_index))
        inh, exp = ie_kd_losses(phi_inh, phi_exp, phi_t)
        term = float(self.hparams["inh_weight"]) * inh + float(self.hparams["exp_weight"]) * exp
        return self.combine(z_s, self.ce(z_s, y), term, inheritance=inh, exploration=exp)
