"""Pure distillation loss functions (no modules, no state).

Shapes: ``z_s``, ``z_t`` are student / teacher logits ``[B, K]``; ``y`` integer labels ``[B]``.
All losses are batch means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, averaged over the batch.

    Args:
        z_s: student logits ``[B, K]``.
        z_t: teacher logits ``[B, K]`` (detached by the caller).
        temperature: softmax temperature T > 0.

    Returns:
        Scalar loss.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    log_p_t = F.log_softmax(z_t / t, dim=1)
    return (t * t) * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
