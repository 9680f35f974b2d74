"""Stateful spiking modules used inside converted networks.

Inside the simulator every tensor flows with time folded into the batch, ``[Tc * B, ...]`` for a chunk of
``Tc`` timesteps; a neuron unfolds it to ``[Tc, B, ...]``, scans over time and folds it back. The membrane
potential persists across chunks until :meth:`IFNeuron.reset`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from bsnn._registry import Registry
from bsnn.snn.functional import (burst_multistep, memory_order, per_sample_spikes, phased_multistep,  # noqa: F401
                                 signed_multistep)
from bsnn.snn.kernels import counted, get_kernel, prescale
from bsnn.snn.kernels.cpp_if import if_scan_cpp


@dataclass(frozen=True)
class ExactnessCheck:
    """A check the bf16 synapse hands to the IF neuron consuming its sums (:func:`bsnn.snn.synapse.bf16_mode`):
    the C++ kernel reads the sums anyway, so it also takes their max ``|x|`` on the way; at or above ``limit`` the
    sums were not exact in bf16, and the neuron runs the chunk again from ``recompute()`` (the float32 sums)."""

    limit: float
    recompute: Callable[[], torch.Tensor]
    synapse: nn.Module


class IFNeuron(nn.Module):
    """Integrate-and-fire neurons, reset by subtraction, threshold per layer or per channel.

    The membrane is kept in units of the threshold: each timestep ``v += x / θ``, a spike when ``v >= 1``,
    then ``v -= 1`` — the same dynamics as ``v += x; v >= θ; v -= θ`` in the input's units, written so that
    spikingjelly's scalar-threshold ``IFNode`` fed with ``x · (1/θ)`` reproduces it bit for bit.

    Buffers (saved in ``state_dict``):
        threshold: θ > 0 in the layer's *stored* input domain, shape ``[]``, ``[C]`` or ``[C, 1, 1]``.
        v_init_frac: initial membrane as a fraction of θ (0 = plain conversion, 0.5 = the θ/2 shift).
        v_init_bias: extra initial membrane in units of θ (set by post-conversion calibration), per channel
            (``channel_shape``: ``[C, 1, 1]`` or ``[F]``).
        i_bias: extra input current per timestep in units of θ (bias calibration), per channel.
        i_bias_steps: number of timesteps after each reset during which ``i_bias`` flows (int64 scalar); 0 = every
            timestep. Bias calibration sets it to the T it was calibrated for, so the correction's total charge is
            bounded and its effect on the firing rate vanishes as ``1/T``: the SNN still converges to the ANN.

    Attributes:
        time_chunk: number of timesteps folded into the batch of the current call (set by the simulator).
        spike_count: spikes emitted per timestep since the last reset (floats, summed over the batch; a burst of k
            spikes counts k, a −1 spike counts 1: every spike is one event).
        record: whether to keep ``spike_count``.

    The firing rule (subclasses change it): ``firing`` (its registered name, see :data:`FIRING_RULES`),
    ``spike_min`` / :attr:`spike_max` (one timestep's output: integers in that range), :attr:`levels` (spikes one
    step can carry) and :attr:`input_passes` (crossbar passes per timestep a layer fed by these spikes needs).
    """

    firing = "if"
    spike_min = 0.0

    def __init__(self, threshold: torch.Tensor | float = 1.0, v_init_frac: float = 0.0, name: str = "",
                 channel_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).clone())
        self.register_buffer("v_init_frac", torch.tensor(float(v_init_frac)))
        per_channel = torch.zeros(channel_shape) if channel_shape is not None else torch.zeros_like(self.threshold)
        self.register_buffer("v_init_bias", per_channel.clone())
        self.register_buffer("i_bias", per_channel.clone())
        self.register_buffer("i_bias_steps", torch.tensor(0, dtype=torch.int64))
        self.name = name
        self.time_chunk = 1
        self.kernel = "torch"
        self.record = True
        self.pre_bias: torch.Tensor | None = None  # synaptic bias deferred into the neuron (bsnn.snn.synapse)
        self.exactness: ExactnessCheck | None = None  # the producing bf16 synapse's check, for the next call only
        self.spike_dtype: torch.dtype | None = None  # dtype of emitted spikes (None: the input's)
        self.v: torch.Tensor | None = None
        self.t = 0  # timesteps run since the last reset
        self._spike_count: list[float] = []
        self._pending: list[torch.Tensor] = []  # per-step counts still on the device (CUDA), read at the end
        self.neurons_per_sample = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # networks saved before ``i_bias_steps`` existed had a bias current on every timestep (0 = no window)
        state_dict.setdefault(prefix + "i_bias_steps", torch.tensor(0, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def spike_max(self) -> float:
        """Largest value of one timestep's output (1 for {0, 1} spikes)."""
        return 1.0

    @property
    def input_passes(self) -> int:
        """Crossbar passes per timestep for a layer fed by these spikes: 1 for {0, 1} spikes (one read with the
        spikes on the word lines); bit-serial inputs of more levels need more (:mod:`bsnn.hardware.cost`)."""
        return 1

    @property
    def levels(self) -> int:
        """Spikes one timestep can carry (1; burst: Γ): one spike stands for λ / levels, λ the balanced statistic
        recorded in ``SpikingNetwork.meta["thresholds"]``."""
        return 1

    def reset(self) -> None:
        """Forget the membrane potential and the spike record (call before each new input batch)."""
        self.v = None
        self.t = 0
        self._spike_count = []
        self._pending = []
        self.exactness = None

    @property
    def spike_count(self) -> list[float]:
        """Spikes emitted per timestep since the last reset, summed over the batch (the list itself: callers may
        extend or overwrite it). Counts kept on a CUDA device are read here, once, not at every timestep."""
        if self._pending:
            self._spike_count.extend(torch.cat(self._pending).tolist())
            self._pending = []
        return self._spike_count

    def record_counts(self, per_step: torch.Tensor, replace_last: bool = False) -> None:
        """Append the batch's spike counts of the steps of one call, ``per_step [tc]`` (float64), or overwrite
        the last call's (``replace_last``: a gate applied after firing). On CPU they become python floats at once
        (no small long-lived tensors pinning the heap as T grows); on CUDA they stay on the device until
        :attr:`spike_count` is read, so the simulation does not wait for the host at every step."""
        if per_step.is_cuda:
            if replace_last and not self._pending:  # the last call was already read: overwrite its floats
                self._spike_count[-per_step.numel():] = per_step.tolist()
                return
            if replace_last:
                self._pending[-1] = per_step
            else:
                self._pending.append(per_step)
            return
        values = per_step.tolist()
        if replace_last:
            self._spike_count[-len(values):] = values
        else:
            self._spike_count.extend(values)

    def _scan(self, x_seq: torch.Tensor, bias: torch.Tensor | None, counts: list | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``x_seq [Tc, B, ...]`` (gain, ``bias`` and the deferred synaptic bias applied) from ``self.v``
        and fire; returns ``(spikes [Tc, B, ...], v_next [B, ...])``, appending per-sample spike counts to
        ``counts``. The IF rule runs on the selected kernel (:mod:`bsnn.snn.kernels`)."""
        return get_kernel(self.kernel)(x_seq, self._one, self.v, self._gain, bias, self.pre_bias, self.spike_dtype,
                                       counts)

    def _scan_residual(self, x_seq: torch.Tensor, bias: torch.Tensor | None, counts: list | None,
                       residual: torch.Tensor, residual_scale: tuple[torch.Tensor, torch.dtype] | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_scan` with a residual current (``residual`` times ``residual_scale = (scale, dtype)``, if given,
        multiplied in that dtype) added after the deferred synaptic bias (C++ kernel)."""
        return if_scan_cpp(x_seq, self._one, self.v, self._gain, bias, self.pre_bias, self.spike_dtype, counts,
                           residual=residual, **_scale_kwargs(residual_scale))

    def gain(self) -> torch.Tensor:
        """Input gain ``1/θ`` (same shape as ``threshold``)."""
        return 1.0 / self.threshold

    def initial_potential(self, like: torch.Tensor) -> torch.Tensor:
        """Initial membrane (units of θ, float32) ``v_init_frac + v_init_bias`` broadcast to one timestep
        ``[B, ...]`` (in ``like``'s memory layout)."""
        return torch.zeros_like(like, dtype=torch.float32) + (self.v_init_frac + self.v_init_bias).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: input current ``[Tc * B, ...]`` -> spikes ``[Tc * B, ...]`` (0/1) in ``x``'s layout and in
        ``spike_dtype`` (default: float32, or ``x``'s dtype when that is a 32-bit float)."""
        tc = self.time_chunk
        return self._run(x.reshape(tc, x.shape[0] // tc, *x.shape[1:])).reshape(x.shape)

    def forward_constant(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: one timestep's input current ``[B, ...]``, the same at each of the chunk's ``time_chunk`` steps
        (direct encoding's first layer) -> spikes ``[Tc * B, ...]``: ``forward`` of ``x`` repeated ``Tc`` times,
        without materialising the repeat (the C++ kernel reads each current once per chunk). Hooks do not run:
        the simulator calls it only on neurons that have none (:meth:`SpikingNetwork.split_static`)."""
        tc = self.time_chunk
        return self._run(x.unsqueeze(0).expand(tc, *x.shape)).reshape(tc * x.shape[0], *x.shape[1:])

    def forward_residual(self, y: torch.Tensor, r: torch.Tensor, align: ChannelScale | None = None,
                         spikes: bool = False) -> torch.Tensor:
        """IF of a residual block's sum: ``y`` the synaptic layer's output without its bias (deferred into
        :attr:`pre_bias`), ``r`` the shortcut current — or, with ``align`` (a bias-free :class:`ChannelScale`), the
        shortcut's input, whose current is ``align(r)`` —, all ``[Tc * B, ...]`` -> spikes ``[Tc * B, ...]``;
        equal to ``forward((y + pre_bias) + align(r).float())`` (the unfused graph's operations, in its order and
        dtypes). The C++ kernel scales and adds the shortcut inside its pass (no separate scale, bias, add and cast
        passes over the layer); another kernel, or a neuron with hooks (calibration, offset corrections), gets the
        unfused sum through ``__call__`` (:func:`bsnn.snn.synapse.synapse_mode` rewrites the graph to call this).
        ``spikes``: ``r`` holds {0, 1} spikes stored in bfloat16 in place of the float32 graph's float32 spikes, so
        they are scaled in float32, as that graph scales them."""
        fused = self.kernel == "cpp" and not (self._forward_hooks or self._forward_pre_hooks)
        product = torch.float32 if spikes else r.dtype  # the dtype the graph multiplies the shortcut in
        if align is not None and not (fused and align.bias is None and r.dtype in (torch.float32, torch.bfloat16)):
            r, align = align(r.to(product)), None
        if not fused:
            r = r.float()
            x = (y.float() if self.pre_bias is None else y.float() + self.pre_bias) + r
            saved, self.pre_bias = self.pre_bias, None
            try:
                return self(x)
            finally:
                self.pre_bias = saved
        if r.dtype not in (torch.float32, torch.bfloat16):
            r = r.float()
        tc = self.time_chunk
        shape = (tc, y.shape[0] // tc, *y.shape[1:])
        scale = None if align is None else (align.scale, product)
        return self._run(y.reshape(shape), r.reshape(shape), scale).reshape(y.shape)

    def forward_pooled(self, x: torch.Tensor, pool: nn.AvgPool2d, constant: bool = False) -> torch.Tensor:
        """``pool(self(x))`` for a 2x2, stride-2 average pooling (:func:`pools_2x2`): ``x [Tc * B, C, H, W]`` ->
        pooled spikes ``[Tc * B, C, H // 2, W // 2]``; with ``constant``, ``x [B, C, H, W]`` is one timestep's
        current, the same at every step of the chunk (``pool(self.forward_constant(x))``). The C++ kernel pools
        inside its pass (the full-resolution spikes are never written nor read back: sums of four {0, 1} spikes
        times 0.25 are exact, so the result is the unfused one bit for bit); another kernel, a neuron with hooks
        (they must see the spikes), or a pooling of another shape runs the two modules
        (:func:`bsnn.snn.synapse.synapse_mode` rewrites the graph to call this)."""
        if (self.kernel != "cpp" or self._forward_hooks or self._forward_pre_hooks or not pools_2x2(pool)
                or x.dim() != 4 or min(x.shape[-2:]) < 2):
            return pool(self.forward_constant(x) if constant else self(x))
        tc = self.time_chunk
        x_seq = x.unsqueeze(0).expand(tc, *x.shape) if constant else x.reshape(tc, x.shape[0] // tc, *x.shape[1:])
        pooled = self._run(x_seq, pool=True)
        return pooled.reshape(-1, *pooled.shape[2:])

    def _run(self, x_seq: torch.Tensor, residual: torch.Tensor | None = None,
             residual_scale: tuple[torch.Tensor, torch.dtype] | None = None, pool: bool = False) -> torch.Tensor:
        """Integrate and fire over ``x_seq [Tc, B, ...]`` (plus the residual current ``[Tc, B, ...]``, if given,
        times ``residual_scale = (scale, dtype)`` multiplied in that dtype) from the current membranes -> spikes
        ``[Tc, B, ...]`` (with ``pool``, C++ kernel only: their 2x2 average pooling ``[Tc, B, C, H/2, W/2]``)."""
        tc = x_seq.shape[0]
        if self.v is None:  # first call after reset: the per-batch constants, not recomputed every timestep
            self.v = self.initial_potential(x_seq[0])
            self.neurons_per_sample = x_seq[0, 0].numel()
            self._one = torch.ones((), dtype=torch.float32, device=x_seq.device)
            self._gain = self.gain()
            self._bias = self.i_bias if bool(self.i_bias.any()) else None
            self._bias_steps = int(self.i_bias_steps)
        counts: list[torch.Tensor] | None = [] if self.record else None
        # the bias current flows during the first i_bias_steps timesteps only: split the chunk where it stops
        split = tc if self._bias is None or not self._bias_steps else min(tc, max(0, self._bias_steps - self.t))
        check, self.exactness = self.exactness, None

        def scan(lo: int, hi: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            xs = x_seq if (lo, hi) == (0, tc) else x_seq[lo:hi]
            if pool:
                return if_scan_cpp(xs, self._one, self.v, self._gain, bias, self.pre_bias, self.spike_dtype, counts,
                                   pool=True)
            if residual is None:
                return self._scan(xs, bias, counts)
            return self._scan_residual(xs, bias, counts, residual if (lo, hi) == (0, tc) else residual[lo:hi],
                                       residual_scale)

        def exact(x: torch.Tensor) -> torch.Tensor:  # the float32 sums of a chunk whose bf16 sums were not exact
            check.synapse.fallbacks += 1
            return check.recompute().reshape(x.shape)

        if check is not None and split in (0, tc):  # one pass: fire and take max |x| for the synapse's check
            bias = self._bias if split else None
            spikes, v, amax = if_scan_cpp(x_seq, self._one, self.v, self._gain, bias, self.pre_bias,
                                          self.spike_dtype, counts, residual=residual, absmax=True,
                                          pool=pool, **_scale_kwargs(residual_scale))
            if amax >= check.limit:  # not exact: this chunk again from the float32 sums
                if counts is not None:
                    counts.clear()
                x_seq = exact(x_seq)
                spikes, v = scan(0, tc, bias)
            self.v = v
        elif split in (0, tc):  # the usual case: one kernel call for the whole chunk
            spikes, self.v = scan(0, tc, self._bias if split else None)
        else:  # the bias window ends inside this chunk
            if check is not None and float(x_seq.abs().max()) >= check.limit:
                x_seq = exact(x_seq)
            head, self.v = scan(0, split, self._bias)
            tail, self.v = scan(split, tc, None)
            spikes = torch.cat((head, tail))
        self.t += tc
        if counts:  # per-sample counts are exact in float32 (< 2^24), the sum over samples in float64
            self.record_counts(torch.stack(counts).double().sum(1))
        return spikes

    def extra_repr(self) -> str:
        th = self.threshold
        return f"threshold={'per-channel' if th.numel() > 1 else round(th.item(), 4)}, name={self.name!r}"


class BurstNeuron(IFNeuron):
    """IF neurons that fire bursts: up to Γ = ``max_burst`` spikes per timestep, ``s = clamp(floor(v), 0, Γ)``,
    ``v -= s`` (units of θ; :func:`bsnn.snn.functional.burst_multistep`, Li & Zeng IJCAI 2022).

    The converter gives a burst layer the threshold θ = λ/Γ (λ: the balanced activation statistic), so one step
    still spans ``[0, λ]`` and resolves it in Γ + 1 levels instead of 2: the rate code of T steps has the
    resolution of Γ·T IF steps, and the average output still converges to ``clip(x, 0, λ)``. A layer fed by bursts
    reads its crossbar bit-serially, ``ceil(log2(Γ + 1))`` passes per timestep (:attr:`input_passes`), which the
    cost model charges. The scan is a torch loop (the fused IF kernels implement the single-spike rule only).
    """

    firing = "burst"

    def __init__(self, threshold: torch.Tensor | float = 1.0, v_init_frac: float = 0.0, name: str = "",
                 channel_shape: tuple[int, ...] | None = None, max_burst: int = 2) -> None:
        super().__init__(threshold, v_init_frac, name, channel_shape)
        if isinstance(max_burst, bool) or not isinstance(max_burst, int) or max_burst < 1:
            raise ValueError(f"BurstNeuron: max_burst must be an integer >= 1, got {max_burst!r}")
        self.max_burst = max_burst

    @property
    def spike_max(self) -> float:
        return float(self.max_burst)

    @property
    def input_passes(self) -> int:
        return max(1, math.ceil(math.log2(self.max_burst + 1)))

    @property
    def levels(self) -> int:
        return self.max_burst

    def _scan(self, x_seq, bias, counts):
        x = prescale(x_seq, self._gain, bias, self.pre_bias)
        s, v = burst_multistep(x, 1.0, self.max_burst, self.v)
        return counted(s.to(self.spike_dtype or s.dtype), counts), v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_burst={self.max_burst}"


class SignedNeuron(IFNeuron):
    """Signed IF neurons with memory (Wang et al. IJCAI 2022): +1 when ``v >= 1``, −1 when ``v <= −1`` while the
    net output since the reset is positive, then ``v -= s`` (units of θ; :func:`bsnn.snn.functional.signed_multistep`).

    A −1 spike takes back a spike fired too early (the "unevenness" error of a neuron whose input turns negative
    late), so the net count never goes below zero and the average output converges to ``clip(x, 0, λ)`` as with
    IF. A layer fed by signed spikes needs two crossbar passes per timestep (the +1 and the −1 inputs: word lines
    carry one polarity at a time), which the cost model charges; each ±1 spike counts as one event.
    """

    firing = "signed"
    spike_min = -1.0

    def __init__(self, threshold: torch.Tensor | float = 1.0, v_init_frac: float = 0.0, name: str = "",
                 channel_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(threshold, v_init_frac, name, channel_shape)
        self.sent: torch.Tensor | None = None  # net spikes since the reset, per neuron

    @property
    def input_passes(self) -> int:
        return 2

    def reset(self) -> None:
        super().reset()
        self.sent = None

    def _scan(self, x_seq, bias, counts):
        x = prescale(x_seq, self._gain, bias, self.pre_bias)
        if self.sent is None:
            self.sent = torch.zeros_like(self.v)
        s, v, self.sent = signed_multistep(x, 1.0, self.v, self.sent)
        if counts is not None:
            counts.extend(per_sample_spikes(s.abs()).unbind(0))
        return s.to(self.spike_dtype or s.dtype), v


class PhasedIFNeuron(IFNeuron):
    """IF neurons whose threshold rises once: θ for the first ``switch_steps`` timesteps after a reset, then
    ``k·θ`` (``late_gain``, an integer k >= 1 per layer), one spike then standing for k — still {0, 1} spikes.

    θ is a short code's threshold (e.g. ``mse:4``: clips hard, resolves small T well) and k·θ a long code's (little
    clipping): the first ``switch_steps`` steps are exactly those of the IF network with thresholds θ, and from then
    on the neurons release, at up to k per step, the charge the short code clipped and kept in the membrane (reset
    by subtraction loses none). At the switch the membrane gains ``(k - 1)·v_init_frac·θ``: the late code's own
    start shift (θ/2 of k·θ where the network uses the θ/2 shift), so its rounding error stays centred — without
    it a neuron arrives at the larger threshold from a membrane in [0, θ) and under-fires for a while (the plain-ReLU
    VGG of ``benchmarks/default_recipe.py``, validation, late p99.99 after T = 8: 73.4 % at T = 16, below its
    75.4 % at T = 8; with it 78.8 %). The average output therefore converges to ``clip(x, 0, k·θ)``, the long code's
    limit, instead of ``clip(x, 0, θ)``: the fast start of a small threshold without its large-T clipping error
    (``ConvertConfig.late_threshold``; bsnn's own rule, not a published method). In hardware a spike of a late
    step is a 1 on the word line like any other; the consuming layer multiplies its column sums by k (a per-layer
    digital scale after the ADC, one crossbar pass: :attr:`input_passes` = 1). Emitted values are {0, 1} before
    the switch and {0, k} after (:attr:`spike_max` = k); each spike counts one event. The scan runs the selected IF
    kernel twice around the switch (threshold 1, then k, in units of θ).

    Buffers (besides :class:`IFNeuron`'s): ``late_gain`` (float32 scalar holding the integer k) and
    ``switch_steps`` (int64 scalar).
    """

    firing = "phased"

    def __init__(self, threshold: torch.Tensor | float = 1.0, v_init_frac: float = 0.0, name: str = "",
                 channel_shape: tuple[int, ...] | None = None, late_gain: int = 1, switch_steps: int = 8) -> None:
        super().__init__(threshold, v_init_frac, name, channel_shape)
        if isinstance(late_gain, bool) or int(late_gain) != late_gain or late_gain < 1:
            raise ValueError(f"PhasedIFNeuron: late_gain must be an integer >= 1, got {late_gain!r}")
        if isinstance(switch_steps, bool) or not isinstance(switch_steps, int) or switch_steps < 1:
            raise ValueError(f"PhasedIFNeuron: switch_steps must be an integer >= 1, got {switch_steps!r}")
        self.register_buffer("late_gain", torch.tensor(float(late_gain)))
        self.register_buffer("switch_steps", torch.tensor(switch_steps, dtype=torch.int64))
        self._scanned = 0  # timesteps scanned since the last reset (a chunk may be scanned in two parts)

    @classmethod
    def from_if(cls, m: IFNeuron, late_gain: int, switch_steps: int) -> "PhasedIFNeuron":
        """A phased neuron with ``m``'s threshold, membrane settings, calibration buffers and name."""
        out = cls(m.threshold, float(m.v_init_frac), m.name, tuple(m.v_init_bias.shape), late_gain, switch_steps)
        out.load_state_dict({**m.state_dict(), "late_gain": out.late_gain, "switch_steps": out.switch_steps})
        out.kernel, out.record = m.kernel, m.record
        return out

    @property
    def spike_max(self) -> float:
        return float(self.late_gain)

    def reset(self) -> None:
        super().reset()
        self._scanned = 0

    def _scan(self, x_seq, bias, counts):
        kernel, tc = get_kernel(self.kernel), x_seq.shape[0]
        start = self._scanned
        head = min(tc, max(0, int(self.switch_steps) - start))  # steps still before the switch
        self._scanned += tc
        parts = []
        if head:
            s, self.v = kernel(x_seq[:head], self._one, self.v, self._gain, bias, self.pre_bias, self.spike_dtype,
                               counts)
            parts.append(s)
        if head < tc:
            k = self.late_gain.to(self._one.device)
            if start + head == int(self.switch_steps):  # the first late step: the late code's own θ/2 shift
                self.v = self.v + (k - 1) * self.v_init_frac.to(self.v.device)
            s, self.v = kernel(x_seq[head:], k, self.v, self._gain, bias, self.pre_bias, self.spike_dtype, counts)
            parts.append(s * k.to(s.dtype))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), self.v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, late_gain={int(self.late_gain)}, switch_steps={int(self.switch_steps)}"


@dataclass(frozen=True)
class FiringRule:
    """A registered firing rule for the converter (``ConvertConfig.neuron``).

    Attributes:
        build: ``(threshold, v_init_frac, name, channel_shape, max_burst) -> IFNeuron``.
        levels: ``max_burst -> spikes one timestep can carry``: the converter divides the balanced statistic λ by
            it to get the threshold (IF, signed: 1; burst: Γ).
    """

    build: Callable[..., IFNeuron]
    levels: Callable[[int], int]


FIRING_RULES: Registry[FiringRule] = Registry("neuron")
FIRING_RULES.register("if")(FiringRule(
    build=lambda th, v0, name, ch, _g: IFNeuron(th, v0, name=name, channel_shape=ch), levels=lambda _g: 1))
FIRING_RULES.register("burst")(FiringRule(
    build=lambda th, v0, name, ch, g: BurstNeuron(th, v0, name=name, channel_shape=ch, max_burst=g),
    levels=lambda g: g))
FIRING_RULES.register("signed")(FiringRule(
    build=lambda th, v0, name, ch, _g: SignedNeuron(th, v0, name=name, channel_shape=ch), levels=lambda _g: 1))


def pools_2x2(pool: nn.Module) -> bool:
    """``pool`` is a plain 2x2, stride-2 average pooling without padding (what :meth:`IFNeuron.forward_pooled`
    fuses into the IF kernel)."""
    def pair(v) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(pool) is nn.AvgPool2d and pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2)
            and pair(pool.padding) == (0, 0) and not pool.ceil_mode and pool.divisor_override is None)


def _scale_kwargs(residual_scale: tuple[torch.Tensor, torch.dtype] | None) -> dict:
    """:func:`~bsnn.snn.kernels.cpp_if.if_scan_cpp`'s keywords for a shortcut scale ``(scale, product dtype)``."""
    if residual_scale is None:
        return {}
    return {"residual_scale": residual_scale[0], "residual_dtype": residual_scale[1]}


class ChannelScale(nn.Module):
    """Fixed per-channel (or scalar) affine map ``x * scale (+ bias)``; aligns residual branches, maps the output
    layer's stored values back to logits, and carries IF input gains in exported networks."""

    def __init__(self, scale: torch.Tensor | float, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone())
        self.register_buffer("bias", None if bias is None else torch.as_tensor(bias, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype)
        return x if self.bias is None else x + self.bias.to(x.dtype)


class Integrator(nn.Module):
    """Marks the network output: the non-spiking last layer whose membrane accumulates the input current.

    It is the identity per timestep; the simulator accumulates its outputs over time (prefix sums), which
    is the membrane potential of a non-spiking integrator neuron.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
