"""Reference integrate-and-fire math: the oracle every fast kernel is tested against.

Non-leaky integrate-and-fire with reset by subtraction, per timestep t::

    v[t] = v[t-1] + x[t]
    s[t] = 1  if v[t] >= theta  else 0
    v[t] = v[t] - s[t] * theta

Tensors are time-first: ``x`` is ``[T, B, ...]``; ``theta`` broadcasts against one timestep ``[B, ...]``
(a scalar, or per channel ``[C, 1, 1]`` / ``[C]``).

Two other firing rules, options of :class:`bsnn.convert.ConvertConfig` (``neuron``), have their oracles here too:

* **burst** (Li & Zeng, "Efficient and accurate conversion of spiking neural network with burst spikes", IJCAI
  2022; authors' code ``github.com/Brain-Cog-Lab/Conversion_Burst``, ``SNode.forward``): up to Γ spikes per
  timestep, ``s[t] = clamp(floor(v[t] / θ), 0, Γ)``, ``v[t] -= s[t]·θ``;
* **signed** (Wang, Zhang, Chen, Qu, "Signed neuron with memory", IJCAI 2022; authors' code
  ``github.com/ppppps/ANN2SNNConversion_SNM_NeuronNorm``, ``SPIKE_PosNeg_layer.forward``): a +1 spike when
  ``v >= θ``, a −1 spike when ``v <= −θ`` *and* the neuron's net output so far is positive (the memory), then
  ``v -= s·θ``: a spike fired too early is taken back, so the net count never goes below zero.

And one option of ``ConvertConfig.late_threshold``: **phased** thresholds (bsnn's two-phase case of a time-varying
threshold): θ for the first steps after a reset, k·θ after (k an integer), a spike then worth k — still {0, 1}
spikes on the wire.
"""

from __future__ import annotations

import torch


def if_step(v: torch.Tensor, x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One IF timestep. Returns ``(spike, v_next)``; ``spike`` is 0/1 in ``x``'s dtype."""
    v = v + x
    s = (v >= theta).to(x.dtype)
    return s, v - s * theta


def if_multistep(x_seq: torch.Tensor, theta: torch.Tensor | float, v0: torch.Tensor | float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run IF neurons over ``T`` timesteps (reference loop).

    Args:
        x_seq: input current ``[T, B, ...]``.
        theta: threshold, broadcastable to ``[B, ...]``; must be > 0.
        v0: initial membrane potential, broadcastable to ``[B, ...]``.

    Returns:
        ``(spikes [T, B, ...], v_final [B, ...])``.
    """
    theta = torch.as_tensor(theta, dtype=x_seq.dtype, device=x_seq.device)
    v = torch.zeros_like(x_seq[0]) + v0
    out = torch.empty_like(x_seq)
    for t in range(x_seq.shape[0]):
        out[t], v = if_step(v, x_seq[t], theta)
    return out, v


def phased_multistep(x_seq: torch.Tensor, late_gain: float, switch_steps: int, v0: torch.Tensor | float = 0.0,
                     switch_shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :class:`bsnn.snn.neuron.PhasedIFNeuron` in units of θ: ``x_seq [T, B, ...]`` (the current
    already times 1/θ) -> ``(outputs [T, B, ...], v_final)``; step t (0-based) fires when ``v >= g_t`` and
    subtracts ``g_t``, emitting ``g_t``, with ``g_t = 1`` for ``t < switch_steps`` and ``late_gain`` after. At the
    first late step (t = switch_steps) the membrane first gains ``(late_gain - 1) * switch_shift``: the late code's
    own start shift (the neuron passes its ``v_init_frac``, 0.5 for the θ/2 shift)."""
    v = torch.zeros_like(x_seq[0]) + v0
    out = torch.empty_like(x_seq)
    for t in range(x_seq.shape[0]):
        g = 1.0 if t < switch_steps else float(late_gain)
        if t == switch_steps:
            v = v + (float(late_gain) - 1.0) * switch_shift
        v = v + x_seq[t]
        out[t] = (v >= g).to(x_seq.dtype) * g
        v = v - out[t]
    return out, v


def burst_multistep(x_seq: torch.Tensor, theta: torch.Tensor | float, max_burst: int,
                    v0: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Burst neurons over ``T`` timesteps (reference loop): up to ``max_burst`` (Γ) spikes per step.

    Args:
        x_seq: input current ``[T, B, ...]``.
        theta: threshold, broadcastable to ``[B, ...]``; must be > 0.
        max_burst: Γ >= 1 (Γ = 1 is the IF neuron of :func:`if_multistep`).
        v0: initial membrane potential, broadcastable to ``[B, ...]``.

    Returns:
        ``(spikes [T, B, ...] in {0, ..., Γ}, v_final [B, ...])``.
    """
    theta = torch.as_tensor(theta, dtype=x_seq.dtype, device=x_seq.device)
    v = torch.zeros_like(x_seq[0]) + v0
    out = torch.empty_like(x_seq)
    for t in range(x_seq.shape[0]):
        v = v + x_seq[t]
        s = torch.floor(v / theta).clamp(0, max_burst)
        out[t], v = s, v - s * theta
    return out, v


def signed_multistep(x_seq: torch.Tensor, theta: torch.Tensor | float, v0: torch.Tensor | float = 0.0,
                     sent0: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed neurons with memory over ``T`` timesteps (reference loop).

    Args:
        x_seq: input current ``[T, B, ...]``.
        theta: threshold, broadcastable to ``[B, ...]``; must be > 0.
        v0: initial membrane potential, broadcastable to ``[B, ...]``.
        sent0: net spikes emitted before (the memory), broadcastable to ``[B, ...]``.

    Returns:
        ``(spikes [T, B, ...] in {-1, 0, 1}, v_final [B, ...], sent_final [B, ...])``.
    """
    theta = torch.as_tensor(theta, dtype=x_seq.dtype, device=x_seq.device)
    v = torch.zeros_like(x_seq[0]) + v0
    sent = torch.zeros_like(x_seq[0]) + sent0
    out = torch.empty_like(x_seq)
    for t in range(x_seq.shape[0]):
        v = v + x_seq[t]
        s = (v >= theta).to(x_seq.dtype) - ((v <= -theta) & (sent > 0)).to(x_seq.dtype)
        out[t], v, sent = s, v - s * theta, sent + s
    return out, v, sent


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` with its dims permuted into memory order (contiguous for any dense layout, e.g.
    channels-last), so reductions over trailing dims run without a layout copy. Leading dims whose stride
    order already matches (time, batch) stay first."""
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    return t.permute(order)


def per_sample_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """Spikes per sample ``[Tc, B]`` (float32, exact below 2^24) of spikes ``[Tc, B, ...]`` in any dense layout."""
    flat = memory_order(spikes)
    if flat.shape[:2] != spikes.shape[:2]:  # time/batch not outermost in memory: reduce in logical order
        return spikes.float().sum(dim=tuple(range(2, spikes.dim())))
    return flat.reshape(spikes.shape[0], spikes.shape[1], -1).float().sum(-1)
