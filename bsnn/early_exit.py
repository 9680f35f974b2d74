"""Run-time latency reduction: per-sample early exit.

Rule (documented default): a sample stops at the first timestep t >= ``min_timesteps`` at which its prediction
(argmax of the output integrator's membrane) has been the same for the last ``patience`` consecutive steps
and the time-averaged logit margin (top-1 minus top-2 of membrane / t) is at least ``margin``. Samples that
never satisfy the rule run to the last simulated step. The network is causal, so evaluating the rule on
recorded per-step predictions gives exactly what a simulator that drops exited samples would report; the
reported latency is the *average* number of timesteps used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bsnn.errors import ConfigError


@dataclass(frozen=True)
class EarlyExit:
    """Early-exit rule: stable prediction for ``patience`` steps, margin >= ``margin``, t >= ``min_timesteps``."""

    patience: int = 4
    margin: float = 0.0
    min_timesteps: int = 1

    def __post_init__(self) -> None:
        if self.patience < 1 or self.min_timesteps < 1 or self.margin < 0:
            raise ConfigError(f"early exit needs patience >= 1, min_timesteps >= 1, margin >= 0; got {self}")


def stable_run_length(predictions: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` predictions -> ``[T, N]`` number of consecutive steps (ending at t) with the same prediction."""
    run = torch.ones_like(predictions, dtype=torch.int32)
    for t in range(1, predictions.shape[0]):
        run[t] = torch.where(predictions[t] == predictions[t - 1], run[t - 1] + 1, 1)
    return run


def apply_early_exit(predictions: torch.Tensor, margins: torch.Tensor, labels: torch.Tensor, rule: EarlyExit
                     ) -> dict:
    """Evaluate ``rule`` on recorded per-step predictions.

    Args:
        predictions: ``[T, N]`` argmax of the membrane after each step.
        margins: ``[T, N]`` time-averaged top-1 minus top-2 logit after each step.
        labels: ``[N]``.
        rule: the exit rule.

    Returns:
        ``{"accuracy": %, "mean_timesteps": float, "exit_timesteps": LongTensor [N]}``.
    """
    T = predictions.shape[0]
    steps = torch.arange(1, T + 1).view(-1, 1)
    ok = (stable_run_length(predictions) >= rule.patience) & (margins >= rule.margin) & (steps >= rule.min_timesteps)
    ok[-1] = True  # everyone stops at the last simulated step
    exit_idx = ok.int().argmax(0)  # first True
    pred = predictions.gather(0, exit_idx.view(1, -1)).squeeze(0)
    return {"accuracy": 100.0 * (pred.long() == labels).float().mean().item(),
            "mean_timesteps": (exit_idx + 1).float().mean().item(), "exit_timesteps": exit_idx + 1}


PATIENCES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MARGINS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def early_exit_curve(result, patiences: tuple[int, ...] = PATIENCES, margins: tuple[float, ...] = MARGINS,
                     min_timesteps: int = 1) -> list[dict]:
    """Accuracy vs average timesteps of the early-exit rules on the grid ``patiences x margins``, keeping the
    Pareto-optimal ones (no other rule is as accurate with fewer average timesteps), sorted by average T.

    Args:
        result: a :class:`~bsnn.simulate.SimResult` recorded with ``SimConfig(record_predictions=True)``.
        patiences, margins: the rule grid (``margins=(0.0,)`` gives the stability-only rule).
        min_timesteps: earliest exit step of every rule.

    Returns:
        ``[{"patience", "margin", "accuracy", "mean_timesteps"}, ...]``.
    """
    if result.predictions is None:
        raise ConfigError("early-exit analysis needs simulate(..., SimConfig(record_predictions=True))")
    rows = []
    for p in patiences:
        for m in margins:
            r = apply_early_exit(result.predictions, result.margins, result.labels, EarlyExit(p, m, min_timesteps))
            rows.append({"patience": p, "margin": m, "accuracy": r["accuracy"], "mean_timesteps": r["mean_timesteps"]})
    rows.sort(key=lambda r: (r["mean_timesteps"], -r["accuracy"]))
    front, best = [], -1.0
    for r in rows:  # ascending cost: keep a rule only if it is more accurate than every cheaper one
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def fixed_T_needed(result, accuracy: float) -> int | None:
    """Smallest recorded T whose fixed-T accuracy reaches ``accuracy`` (None if none does)."""
    preds, labels = result.predictions, result.labels
    acc = (preds.long() == labels.view(1, -1)).float().mean(1) * 100
    hit = (acc >= accuracy - 1e-9).nonzero()
    return int(hit[0].item()) + 1 if len(hit) else None


def validated_early_exit(val_result, test_result, ann_val_accuracy: float | None = None, tolerance: float = 1.0,
                         patiences: tuple[int, ...] = PATIENCES, margins: tuple[float, ...] = MARGINS,
                         min_timesteps: int = 1) -> dict:
    """Early-exit rules chosen on a validation split, reported on the test split.

    The Pareto front of the rule grid is computed on ``val_result`` (validation labels only); each rule of it is
    then applied, unchanged, to ``test_result``. The *chosen* rule is the cheapest one (fewest average timesteps on
    validation) whose validation accuracy is within ``tolerance`` points of the ANN's validation accuracy
    (``ann_val_accuracy``; default: of the SNN at the last simulated step).

    Returns:
        ``{"rows": [{patience, margin, val_accuracy, val_mean_timesteps, accuracy, mean_timesteps}], "chosen": the
        chosen row or None, "target": validation accuracy the choice aimed at}``.
    """
    front = early_exit_curve(val_result, patiences, margins, min_timesteps)
    last = (val_result.predictions[-1].long() == val_result.labels).float().mean().item() * 100.0
    target = (ann_val_accuracy if ann_val_accuracy is not None else last) - tolerance
    rows = []
    for r in front:
        t = apply_early_exit(test_result.predictions, test_result.margins, test_result.labels,
                             EarlyExit(r["patience"], r["margin"], min_timesteps))
        rows.append({"patience": r["patience"], "margin": r["margin"], "val_accuracy": r["accuracy"],
                     "val_mean_timesteps": r["mean_timesteps"], "accuracy": t["accuracy"],
                     "mean_timesteps": t["mean_timesteps"]})
    chosen = next((r for r in rows if r["val_accuracy"] >= target - 1e-9), None)
    return {"rows": rows, "chosen": chosen, "target": target}
