"""Pure distillation loss functions (no modules, no state).

Shapes: ``z_s``, ``z_t`` are student / teacher logits ``[B, K]``; ``y`` integer labels ``[B]``; ``f_s``, ``f_t``
features ``[B, ...]`` (``[B, C, H, W]`` maps or ``[B, D]`` vectors). Unless a function says otherwise the result
is a scalar batch mean. Nothing here detaches the teacher: callers pass teacher tensors computed under
``torch.no_grad()``. Targets that a method builds from the student itself (Zipf, tf-NKD, BAKE) are detached here.

Sources (formulas and defaults: ``REFERENCE.md`` §3): Hinton 2015 (KD), Zhao 2022 (DKD), Huang 2022 (DIST),
Yang 2023 (NKD, tf-NKD / USKD), Liang 2022 (Zipf label smoothing), Ge 2021 (BAKE), Romero 2015 (FitNet),
Zagoruyko 2017 (AT), Tung & Mori 2019 (SP), Park 2019 (RKD), Passalis 2018 (PKT), Tian 2020 (CRD),
Zhang 2022 (CA-MKD), Mirzadeh 2020 (TAKD), Choi 2023 (MIX-KD), Zhang 2018 (DML), Amara 2022 (BD-KD). Where the
authors' code is public, each function follows it (value and gradient; tests/test_distill.py checks each against
a reference written from that code).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def kl_from_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ q) = Σ_k p_k (log p_k − log q_k)`` from log-probabilities ``[B, K]`` -> ``[B]``."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def entropy(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(z / T)`` per row: ``[B, K]`` -> ``[B]``."""
    log_p = F.log_softmax(z / float(temperature), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def soft_cross_entropy(z: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``−Σ_k target_k · log softmax(z)_k`` for a probability target ``[B, K]``."""
    return _reduce(-(target * F.log_softmax(z, dim=1)).sum(dim=1), reduction)


# ----------------------------------------------------------------------------------------------- logit-based


def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """Hinton et al. 2015: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, averaged over the batch.

    Args:
        z_s: student logits ``[B, K]``.
        z_t: teacher logits ``[B, K]`` (detached by the caller).
        temperature: softmax temperature T > 0.
        reduction: ``"mean"`` (scalar batch mean) or ``"none"`` (``[B]``).

    Returns:
        Scalar loss (or ``[B]``).
    """
    t = float(temperature)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    log_p_t = F.log_softmax(z_t / t, dim=1)
    return _reduce((t * t) * kl_from_log(log_p_t, log_p_s), reduction)


def reverse_kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, reduction: str = "mean"
                    ) -> torch.Tensor:
    """Reverse (mode-seeking) KD: ``T² · KL(softmax(z_s/T) ‖ softmax(z_t/T))``. Shapes as :func:`kd_loss`."""
    t = float(temperature)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    log_p_t = F.log_softmax(z_t / t, dim=1)
    return _reduce((t * t) * kl_from_log(log_p_s, log_p_t), reduction)


def logit_matching_loss(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """``mean_b ‖z_s − z_t‖² / (2K)``: the T → ∞ limit of :func:`kd_loss` for zero-mean logits ``[B, K]``."""
    return ((z_s - z_t) ** 2).sum(dim=1).mean() / (2 * z_s.shape[1])


def _split_target(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_gt [B, 1], z_non [B, K−1], mask [B, K] True on non-targets)``."""
    mask = torch.ones_like(z, dtype=torch.bool).scatter_(1, y.view(-1, 1), False)
    return z.gather(1, y.view(-1, 1)), z[mask].view(z.shape[0], -1), mask


def dkd_parts(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, temperature: float,
              reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao 2022): target-class and non-target-class KL, both scaled by ``T²``.

    ``TCKD = KL([p_t^gt, 1 − p_t^gt] ‖ [p_s^gt, 1 − p_s^gt])``; ``NCKD = KL(p̂_t ‖ p̂_s)`` with ``p̂`` the softmax
    over the K−1 non-target logits (all at temperature T). Per sample
    ``KD = TCKD + (1 − p_t^gt) · NCKD`` exactly.

    Args:
        z_s: student logits ``[B, K]`` (K >= 2).
        z_t: teacher logits ``[B, K]``.
        y: labels ``[B]``.
        temperature: T > 0.
        reduction: ``"mean"`` or ``"none"`` (``[B]`` each).

    Returns:
        ``(tckd, nckd)``.
    """
    t = float(temperature)

    def binary_and_non(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zt = z / t
        z_gt, z_non, _ = _split_target(zt, y)
        lse_all = torch.logsumexp(zt, dim=1, keepdim=True)
        lse_non = torch.logsumexp(z_non, dim=1, keepdim=True)
        log_b = torch.cat([z_gt - lse_all, lse_non - lse_all], dim=1)  # log [p_gt, 1 − p_gt], stable
        return log_b, F.log_softmax(z_non, dim=1)

    log_b_s, log_n_s = binary_and_non(z_s)
    log_b_t, log_n_t = binary_and_non(z_t)
    tckd = (t * t) * kl_from_log(log_b_t, log_b_s)
    nckd = (t * t) * kl_from_log(log_n_t, log_n_s)
    return _reduce(tckd, reduction), _reduce(nckd, reduction)


def dkd_loss(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, temperature: float = 4.0,
             alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """``α · TCKD + β · NCKD`` (see :func:`dkd_parts`; the epoch warm-up is the method's business)."""
    tckd, nckd = dkd_parts(z_s, z_t, y, temperature)
    return alpha * tckd + beta * nckd


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row pair of ``a``, ``b`` ``[N, M]`` -> ``[N]`` (0 for a constant row).

    ``⟨ā, b̄⟩ / (‖ā‖·‖b̄‖ + eps)`` with centred rows, as the DIST authors compute it.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 4.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST (Huang 2022): ``(inter, intra)`` relation losses on ``y = softmax(z / τ)``.

    ``inter = τ² (1 − mean_rows Pearson(y_s[i], y_t[i]))``; ``intra`` the same over columns (classes).
    Both are 0 when the logits match and unchanged by adding a constant to a row's logits.

    Args:
        z_s: student logits ``[B, K]``.
        z_t: teacher logits ``[B, K]``.
        temperature: τ.
    """
    t = float(temperature)
    y_s = F.softmax(z_s / t, dim=1)
    y_t = F.softmax(z_t / t, dim=1)
    inter = (t * t) * (1.0 - pearson_rows(y_s, y_t).mean())
    intra = (t * t) * (1.0 - pearson_rows(y_s.t(), y_t.t()).mean())
    return inter, intra


def dist_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 4.0, beta: float = 1.0,
              gamma: float = 1.0) -> torch.Tensor:
    """``β · inter + γ · intra`` (see :func:`dist_parts`)."""
    inter, intra = dist_parts(z_s, z_t, temperature)
    return beta * inter + gamma * intra


def nkd_parts(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, temperature: float = 1.0,
              gamma: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized KD (Yang 2023): ``(target, non_target)`` terms.

    ``target = −mean_b(p_t[y] · log p_s[y])`` at T = 1;
    ``non_target = −γ T² mean_b Σ_{k≠y} softmax(ẑ_t/T)_k · log softmax(ẑ_s/T)_k`` over the K−1 non-target logits ẑ.

    Args:
        z_s: student logits ``[B, K]``.
        z_t: teacher logits ``[B, K]``.
        y: labels ``[B]``.
        temperature: T of the non-target term.
        gamma: weight γ of the non-target term.
    """
    t = float(temperature)
    idx = y.view(-1, 1)
    log_ps_gt = F.log_softmax(z_s, dim=1).gather(1, idx)
    pt_gt = F.softmax(z_t, dim=1).gather(1, idx).detach()
    target = -(pt_gt * log_ps_gt).mean()
    _, zs_non, _ = _split_target(z_s, y)
    _, zt_non, _ = _split_target(z_t, y)
    non = -(F.softmax(zt_non / t, dim=1) * F.log_softmax(zs_non / t, dim=1)).sum(dim=1).mean()
    return target, gamma * t * t * non


def nkd_loss(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, temperature: float = 1.0,
             gamma: float = 1.5) -> torch.Tensor:
    """``target + non_target`` of :func:`nkd_parts`."""
    target, non = nkd_parts(z_s, z_t, y, temperature, gamma)
    return target + non


def rank_min(scores: torch.Tensor) -> torch.Tensor:
    """1-based descending ranks per row, ties sharing the lowest rank (``scipy.stats.rankdata(-s, method='min')``).

    ``rank_k = 1 + #{j : s_j > s_k}``: ``[B, K]`` -> ``[B, K]`` (int64, no gradient).
    """
    s = scores.detach()
    asc = s.sort(dim=1).values.contiguous()
    above = s.shape[1] - torch.searchsorted(asc, s.contiguous(), right=True)
    return above + 1


def zipf_non_target(scores: torch.Tensor, y: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Zipf's LS soft labels over the K−1 non-target classes (Liang 2022, the authors' ``gen_pdf``).

    All K classes (the target included) are ranked by ``scores`` (:func:`rank_min`); class k gets mass
    ``rank_k^−power``; the target is dropped and the rest normalised. A top-1 target leaves the non-targets
    ``1/2, 1/3, …`` (normalised).

    Args:
        scores: ranking scores ``[B, K]``: the logits, or dense votes (:func:`dense_votes`).
        y: labels ``[B]``.
        power: Zipf exponent.

    Returns:
        ``[B, K−1]`` rows summing to one, non-target classes in index order (no gradient).
    """
    w = rank_min(scores).to(torch.float64).pow(-float(power))
    _, w_non, _ = _split_target(w, y)
    return (w_non / w_non.sum(dim=1, keepdim=True)).to(scores.dtype)


def dense_votes(location_logits: torch.Tensor) -> torch.Tensor:
    """Per-class vote counts of per-location predictions: ``[B, N, K]`` logits at N locations -> ``[B, K]``.

    Each location votes for its argmax class (the authors' dense ranking signal for Zipf's LS). No gradient.
    """
    b, _, k = location_logits.shape
    winners = location_logits.detach().argmax(dim=2)
    votes = torch.zeros(b, k, dtype=location_logits.dtype, device=location_logits.device)
    return votes.scatter_add_(1, winners, torch.ones_like(winners, dtype=votes.dtype))


def zipf_ls_loss(z: torch.Tensor, y: torch.Tensor, scores: torch.Tensor | None = None, power: float = 1.0
                 ) -> torch.Tensor:
    """Zipf's LS distillation term: ``mean_b KL(zipf ‖ softmax(z_non))`` over the K−1 non-target logits.

    The training objective of the authors' code is ``CE + λ · this``; the target probability is never pulled down
    (only the non-target logits enter the softmax).

    Args:
        z: the model's logits ``[B, K]``.
        y: labels ``[B]``.
        scores: ranking scores ``[B, K]`` (default: ``z``, detached); dense votes where the model has them.
        power: Zipf exponent.
    """
    target = zipf_non_target(z if scores is None else scores, y, power).to(z.dtype)
    _, z_non, _ = _split_target(z, y)
    log_q = F.log_softmax(z_non, dim=1)
    return (target * (torch.log(target) - log_q)).sum(dim=1).mean()


def uskd_zipf_non_target(z: torch.Tensor, y: torch.Tensor, weak_logits: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """tf-NKD / USKD non-target soft labels (Yang 2023, the authors' ``USKDLoss``), ``[B, K−1]``, no gradient.

    The ranking score over all K classes is ``log p_k / (1 − log p_y + 1e-6)`` (p = softmax(z)), plus
    ``w_k / (1 − w_y + 1e-6)`` with ``w = softmax(weak_logits)`` when the weak head is given; the class at
    0-based position r of the descending order gets ``1 / (r + 1)``; the target is dropped and the rest normalised
    (ties keep index order).
    """
    idx = y.view(-1, 1)
    log_p = F.log_softmax(z.detach(), dim=1)
    score = log_p / (1.0 - log_p.gather(1, idx) + 1e-6)
    if weak_logits is not None:
        w = F.softmax(weak_logits.detach(), dim=1)
        score = score + w / (1.0 - w.gather(1, idx) + 1e-6)
    order = score.argsort(dim=1, descending=True, stable=True)
    position = order.argsort(dim=1, stable=True)
    _, pos_non, _ = _split_target(position, y)
    w_non = 1.0 / (pos_non.to(z.dtype) + 1.0)
    return w_non / w_non.sum(dim=1, keepdim=True)


def tf_nkd_parts(z_s: torch.Tensor, y: torch.Tensor, weak_logits: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-free NKD (Yang 2023; the authors' USKD loss): ``(target, non_target, weak)`` from the student alone.

    * target: soft label ``p̃ = p_y² + 1 − mean_batch(p_y²)`` (detached), ``−mean_b p̃ · log p_y``;
    * non_target: ``−mean_b Σ_k zipf_k · log softmax(z_non)_k`` with :func:`uskd_zipf_non_target`;
    * weak: cross-entropy of the weak head on ``0.9 · onehot + 0.1 / K`` (0 when ``weak_logits`` is None).

    The authors' loss is ``α·target + β·non_target + μ·weak`` (added to CE).

    Args:
        z_s: student logits ``[B, K]``.
        y: labels ``[B]``.
        weak_logits: logits ``[B, K]`` of the weak head on mid-level features, or None.
    """
    idx = y.view(-1, 1)
    log_p = F.log_softmax(z_s, dim=1)
    p_gt = log_p.gather(1, idx).exp().detach()
    soft = (p_gt ** 2 + 1.0 - (p_gt ** 2).mean()).detach()
    target = -(soft * log_p.gather(1, idx)).mean()
    _, z_non, _ = _split_target(z_s, y)
    non = soft_cross_entropy(z_non, uskd_zipf_non_target(z_s, y, weak_logits))
    if weak_logits is None:
        weak = z_s.sum() * 0.0
    else:
        k = z_s.shape[1]
        smooth = 0.9 * F.one_hot(y, k).to(weak_logits.dtype) + 0.1 / k
        weak = soft_cross_entropy(weak_logits, smooth)
    return target, non, weak


def propagation_matrix(features: torch.Tensor, omega: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """BAKE (Ge 2021) propagation matrix ``W = (1 − ω)(I − ωA)⁻¹`` from batch features ``[B, ...]`` -> ``[B, B]``.

    ``A = softmax_j(⟨f̂_i, f̂_j⟩ / temperature)`` over ``j ≠ i`` (diagonal masked, f̂ L2-normalised). A is
    row-stochastic, so ``W = (1 − ω) Σ_n ωⁿ Aⁿ`` is too: its rows sum to one. Needs B >= 2; no gradient.
    """
    f = F.normalize(features.detach().flatten(1), dim=1)
    b = f.shape[0]
    eye = torch.eye(b, dtype=f.dtype, device=f.device)
    sim = (f @ f.t() / float(temperature)).masked_fill(eye.bool(), float("-inf"))
    a = F.softmax(sim, dim=1)
    return (1.0 - omega) * torch.linalg.inv(eye - omega * a)


def bake_targets(z: torch.Tensor, features: torch.Tensor, omega: float = 0.5, temperature: float = 4.0,
                 affinity_temperature: float = 1.0) -> torch.Tensor:
    """BAKE soft targets ``W · softmax(z / T)`` ``[B, K]`` (rows sum to one, no gradient).

    Args:
        z: the model's own logits ``[B, K]``.
        features: the model's own features ``[B, ...]`` (e.g. penultimate).
        omega: propagation strength ω in [0, 1).
        temperature: softmax temperature T of the logits.
        affinity_temperature: temperature of the feature affinities.
    """
    w = propagation_matrix(features, omega, affinity_temperature)
    return w.to(z.dtype) @ F.softmax(z.detach() / float(temperature), dim=1)


# --------------------------------------------------------------------------------------------- feature-based


def pool_to_common(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the spatially larger of two ``[B, C, H, W]`` maps to the other's ``H × W``."""
    hs, ht = f_s.shape[-2:], f_t.shape[-2:]
    if hs == ht:
        return f_s, f_t
    size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
    return (F.adaptive_avg_pool2d(f_s, size) if tuple(hs) != size else f_s,
            F.adaptive_avg_pool2d(f_t, size) if tuple(ht) != size else f_t)


def fitnet_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FitNet (Romero 2015) hint loss: mean squared error of (regressed) student and teacher features, same shape."""
    return F.mse_loss(f_s, f_t)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT attention vector: ``normalize(mean_c |f|^p)`` flattened: ``[B, C, H, W]`` -> ``[B, H·W]``."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko 2017): ``mean((q_s − q_t)²)`` of :func:`attention_map` (channels may differ).

    Args:
        f_s: student maps ``[B, Cs, H, W]``.
        f_t: teacher maps ``[B, Ct, H', W']`` (the larger map is average-pooled to the smaller size).
        p: exponent.
    """
    f_s, f_t = pool_to_common(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """SP Gram matrix ``normalize_rows(F Fᵀ)`` of flattened features ``[B, ...]`` -> ``[B, B]``."""
    f = f.flatten(1)
    return F.normalize(f @ f.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ``‖G_t − G_s‖²_F / B²`` (feature shapes may differ)."""
    b = f_s.shape[0]
    return (similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / (b * b)


def pairwise_distances(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix of rows ``[B, D]`` -> ``[B, B]`` (zero diagonal, gradient-safe)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(eps)
    if not squared:
        d = d.sqrt()
    return d * (1.0 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss (Park 2019): smooth-L1 between mean-normalised pairwise distance matrices."""
    def normed(f: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(f.flatten(1))
        pos = d[d > 0]
        return d / pos.mean() if pos.numel() else d

    return F.smooth_l1_loss(normed(f_s), normed(f_t))


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss: smooth-L1 between the cosines ``⟨e_ij, e_kj⟩`` of all triplets (``[B, B, B]``)."""
    def angles(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        diff = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(angles(f_s), angles(f_t))


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis 2018): KL between cosine-similarity distributions.

    Rows are scaled by ``1 / (‖f‖ + ε)`` (the authors' code); each row of ``(cos + 1) / 2`` is normalised to a
    distribution; loss = ``mean_ij t_ij log((t_ij+ε)/(s_ij+ε))``. Feature dims may differ (``[B, ...]`` each).
    """
    def cond_prob(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        s = (f @ f.t() + 1.0) / 2.0
        return s / s.sum(dim=1, keepdim=True)

    p_s, p_t = cond_prob(f_s), cond_prob(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def contrast_scores(anchor: torch.Tensor, bank_rows: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """CRD scores ``exp(⟨bank_row, anchor⟩ / τ)``: anchor ``[B, D]``, rows ``[B, K+1, D]`` -> ``[B, K+1]``.

    Column 0 is the positive. Divide by the normalisation constant Z before :func:`nce_loss`.
    """
    return torch.exp(torch.bmm(bank_rows, anchor.unsqueeze(2)).squeeze(2) / float(temperature))


def bank_contrast_scores(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor,
                         temperature: float = 0.07) -> torch.Tensor:
    """:func:`contrast_scores` of ``anchor`` ``[B, D]`` against the rows ``bank[idx]`` (bank ``[N, D]``, idx
    ``[B, K+1]``) -> ``[B, K+1]``, without materialising ``bank[idx]`` when that is the larger tensor.

    CRD draws ``K + 1 = 16385`` rows per sample: gathering them is ``B·(K+1)·D`` floats (1 GiB at B = 128,
    D = 128), while all ``N`` dot products ``anchor @ bankᵀ`` are ``B·N`` (23 MiB for CIFAR-10's 45,000). Where
    ``B·(K+1) > N`` the scores are taken from that product (the same dot products and the same gradient to
    ``anchor``; the bank is treated as a constant, as CRD detaches it); otherwise rows are gathered as the authors
    do. The product path keeps an ``N·D`` copy of the bank for the backward pass, so the caller may update the bank
    in place before calling ``backward`` (CRD does).
    """
    if idx.shape[0] * idx.shape[1] > bank.shape[0]:
        dots = (anchor @ bank.detach().clone().t()).gather(1, idx)
    else:
        dots = torch.bmm(bank[idx], anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / float(temperature))


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss on normalised scores ``[B, K+1]`` (column 0 positive, K noise samples, noise prob 1/N).

    ``−mean_b [log(P₀ / (P₀ + K/N)) + Σ_{k≥1} log((K/N) / (P_k + K/N))]``.
    """
    m = scores.shape[1] - 1
    noise = m / float(n_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


# ------------------------------------------------------------------------------------------------ multi-model


def ca_mkd_weights(head_logits: Sequence[torch.Tensor] | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CA-MKD confidence weights: ``w_k = (1 − softmax_k(CE(z^k, y))) / (M − 1)`` per sample (Zhang 2022).

    Args:
        head_logits: M teachers' logits (or, for the feature term, their heads on the student's transformed
            features), a sequence of ``[B, K]`` or a tensor ``[M, B, K]``. Not detached: as in the authors' code,
            the feature term's weights carry gradients.
        y: labels ``[B]``.

    Returns:
        ``[M, B]``, each column sums to one.

    Raises:
        ValueError: for fewer than two teachers (the formula divides by M − 1).
    """
    z = torch.stack(list(head_logits)) if not torch.is_tensor(head_logits) else head_logits
    m = z.shape[0]
    if m < 2:
        raise ValueError(f"CA-MKD needs at least 2 teachers, got {m}")
    ce = torch.stack([F.cross_entropy(zk, y, reduction="none") for zk in z])  # [M, B]
    return (1.0 - F.softmax(ce, dim=0)) / (m - 1)


def ca_mkd_loss(z_s: torch.Tensor, teacher_logits: Sequence[torch.Tensor], y: torch.Tensor,
                temperature: float = 4.0) -> torch.Tensor:
    """CA-MKD logit term: ``Σ_k Σ_b w_kb · T² KL(p_t^k ‖ p_s)_b / (B · M)`` (the authors' ``loops.py``).

    Args:
        z_s: student logits ``[B, K]``.
        teacher_logits: M >= 2 teachers' logits ``[B, K]`` (detached by the caller).
        y: labels ``[B]``.
        temperature: T.
    """
    w = ca_mkd_weights(teacher_logits, y)
    kls = torch.stack([kd_loss(z_s, zt, temperature, reduction="none") for zt in teacher_logits])
    return (w * kls).sum() / (z_s.shape[0] * len(teacher_logits))


def ca_mkd_feature_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                        head_logits: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """CA-MKD intermediate term: ``Σ_k Σ_b w_kb · mean(( f̃_s^k − f_t^k )²)_b / (B · M)``.

    Args:
        student_feats: the student's features transformed for each teacher, ``[B, ...]`` each.
        teacher_feats: each teacher's features (same shapes, detached).
        head_logits: each teacher's classifier head applied to the transformed student features ``[B, K]``;
            the weights :func:`ca_mkd_weights` come from their cross-entropy (with gradients, as in the authors' code).
        y: labels ``[B]``.
    """
    w = ca_mkd_weights(head_logits, y)
    b = y.shape[0]
    mse = torch.stack([(fs - ft).pow(2).reshape(b, -1).mean(dim=1) for fs, ft in zip(student_feats, teacher_feats)])
    return (w * mse).sum() / (b * len(student_feats))


def takd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """TAKD's distillation term (Mirzadeh 2020, the authors' ``train.py``): ``T² · nn.KLDivLoss()`` with the default
    element-wise mean, i.e. ``T² · Σ_{b,k} KL_bk / (B · K)`` = :func:`kd_loss` / K. Shapes as :func:`kd_loss`."""
    return kd_loss(z_s, z_t, temperature) / z_s.shape[1]


def std_kd_parts(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MIX-KD's losses (Choi 2023, the authors' ``MIXSTDLoss``): logits scaled by their own row standard deviation.

    ``σ = std(z, dim=1)`` (unbiased, not detached) replaces the temperature:
    ``ce = −mean_b Σ_k target_k · log softmax(z_s/σ_s)_k`` and
    ``kd = mean_b KL(softmax(z_t/σ_t) ‖ softmax(z_s/σ_s))`` (no T² factor).

    Args:
        z_s: student logits ``[B, K]`` (on the mixed batch).
        z_t: teacher logits ``[B, K]`` (same mixed batch, detached).
        target: mixed label distribution ``[B, K]``.

    Returns:
        ``(ce, kd)``.
    """
    log_p_s = F.log_softmax(z_s / z_s.std(dim=1, keepdim=True), dim=1)
    log_p_t = F.log_softmax(z_t / z_t.std(dim=1, keepdim=True), dim=1)
    ce = -(target * log_p_s).sum() / z_s.shape[0]
    return ce, kl_from_log(log_p_t, log_p_s).mean()


def balanced_kl_weights(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-wise forward / reverse KL weights of the BD-KD student from the entropy gap (Amara 2022).

    ``w_rev = H_s / (H_s + H_t)``, ``w_fwd = 1 − w_rev`` per sample (entropies at temperature T, detached), so
    ``w_rev − w_fwd = (H_s − H_t) / (H_s + H_t)``: a student less confident than its teacher (higher entropy) leans
    on the mode-seeking reverse KL, an over-confident one on the mass-covering forward KL. This normalised form is
    bsnn's reading of the paper's entropy-gap rule (no authors' code is public). Returns ``(w_fwd, w_rev)``, each
    ``[B]``, summing to one.
    """
    h_s = entropy(z_s.detach(), temperature)
    h_t = entropy(z_t.detach(), temperature)
    w_rev = h_s / (h_s + h_t).clamp_min(1e-12)
    return 1.0 - w_rev, w_rev


def balanced_kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BD-KD student term ``mean_b [w_fwd · T² KL(p_t ‖ p_s) + w_rev · T² KL(p_s ‖ p_t)]`` (:func:`balanced_kl_weights`;
    ``z_t`` detached by the caller)."""
    w_f, w_r = balanced_kl_weights(z_s, z_t, temperature)
    fwd = kd_loss(z_s, z_t, temperature, reduction="none")
    rev = reverse_kd_loss(z_s, z_t, temperature, reduction="none")
    return (w_f * fwd + w_r * rev).mean()


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024, the authors' ``normalize``): ``(z − mean) / (eps + std)`` per
    row, ``std`` unbiased (``torch.std``), ``[B, K]`` -> ``[B, K]``."""
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))


def ls_kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KD on standardised logits: :func:`kd_loss` of :func:`standardize_logits` of both (``T²`` included), the
    authors' ``kd_loss(..., logit_stand=True)``. Invariant to a per-sample shift and positive scale of either side's
    logits: the student matches the teacher's logit *relations*, not their magnitude."""
    return kd_loss(standardize_logits(z_s), standardize_logits(z_t), temperature)


def logit_mse_loss(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Logit regression (Ba & Caruana 2014, "Do deep nets really need to be deep?"): ``mean_b ½‖z_s − z_t‖²``.
    ``K ·`` :func:`logit_matching_loss`: its gradient is the ``T → ∞`` limit of ``K · T² ·`` :func:`kd_loss`'s for
    zero-mean logits (Hinton 2015, §2.1)."""
    return 0.5 * ((z_s - z_t) ** 2).sum(dim=1).mean()


def pool_to_square(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's dimension match (NST, VID): the map with the larger height is adaptive-average-pooled to the
    other's ``(H, H)`` (square maps assumed, as the authors do)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        return F.adaptive_avg_pool2d(f_s, (t_h, t_h)), f_t
    if s_h < t_h:
        return f_s, F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def vid_loss(pred_mean: torch.Tensor, f_t: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn et al. 2019), RepDistiller's ``VIDLoss``: the Gaussian negative
    log-likelihood ``mean ½((μ − t)² / σ² + log σ²)`` of the teacher map ``t [B, C, H, W]`` under the student's
    regressed mean ``μ`` and a per-channel variance ``σ² = softplus(log_scale) + eps`` (``log_scale [C]``)."""
    var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
    return (0.5 * ((pred_mean - f_t) ** 2 / var + torch.log(var))).mean()


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``k(a_i, b_j) = ⟨a_i, b_j⟩²`` for every channel pair: ``[B, C, N]`` x ``[B, C, N]`` -> ``[B, C, C]``
    (entry ``[:, j, i]`` pairs ``a_i`` with ``b_j``, as the authors' ``poly_kernel``)."""
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017), RepDistiller's ``NSTLoss``: the squared MMD with a
    degree-2 polynomial kernel between the channels' spatial maps, each L2-normalised over space::

        mean k(t, t) (detached) + mean k(s, s) − 2 mean k(s, t)

    Maps ``[B, C, H, W]`` (channel counts may differ); the larger map is adaptive-average-pooled to the smaller
    square size first (the authors pool to ``(H, H)``)."""
    f_s, f_t = pool_to_square(f_s, f_t)
    f_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return _poly_kernel(f_t, f_t).mean().detach() + _poly_kernel(f_s, f_s).mean() - 2 * _poly_kernel(f_s, f_t).mean()


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence (Peng et al. 2019), RepDistiller's ``Correlation``: with ``δ = |e_s − e_t|`` of the
    embedded features ``[B, D]``, ``mean_b Σ_d δ_b,d · δ_(b+1),d`` over consecutive samples of the batch."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()
