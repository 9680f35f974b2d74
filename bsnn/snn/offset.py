"""Run-time offset corrections with pre-steps: COS and SRP (Hao et al. 2023), per sample, inside the simulation.

Both run a few *pre-steps* of every input before the T reported timesteps, read each neuron's membrane, and change
the real run from that per-sample information. Spikes stay {0, 1} and weights stay ±1 (a binary SNN stays binary):
COS only sets initial membranes, SRP only gates a neuron's output spikes off. Membranes are in units of θ
(:class:`~bsnn.snn.neuron.IFNeuron`: spike when ``v >= 1``, then ``v -= 1``), as in the authors' code, which feeds
spikingjelly's ``IFNode(v_threshold=1, v_reset=None)`` with ``x / θ``.

``cos`` — "Bridging the Gap between ANNs and SNNs by Calibrating Offset Spikes" (Hao, Ding, Bu, Huang, Yu,
ICLR 2023); authors' code ``github.com/hzc1208/ANN2SNN_COS``, ``modules.py``, ``MPLayer.forward`` (SNN mode).
Layer by layer in graph order, each IF layer runs ρ pre-steps from its usual initial membrane ``v0`` on the first ρ
outputs of the layers before it (already corrected), then its membrane is **reset** and set to the shifted initial
membrane of :func:`cos_initial_membrane`; the real run starts at timestep 1 on the same inputs (the earlier layers'
outputs replayed from their step 1; the pre-steps' spikes are discarded and not counted). The authors' layer
receives all timesteps of its input at once; here the network runs ρ steps once per IF layer with the layers before
it corrected — the same inputs (the network is causal), so the same shifts.

``srp`` — "Reducing ANN-SNN Conversion Error through Residual Membrane Potential" (Hao, Bu, Ding, Huang, Yu,
AAAI 2023); authors' code ``github.com/hzc1208/ANN2SNN_SRP``, ``modules.py``, ``MPLayer.forward``. The whole
network runs τ pre-steps from the usual initial membranes; a neuron whose residual membrane after them is
``<= 1e-3`` (``v > 1e-3`` keeps it) is silenced for the whole real run (its spikes are multiplied by 0: the
"ANN output zero, SNN output positive" unevenness case); every membrane is reset to its initial value and the real
run starts at timestep 1. A silenced neuron still integrates and resets; only what it emits is zeroed (as the
authors multiply the ``IFNode``'s output), and the simulator's spike counts count what is emitted.

Differences from the authors' code (both):

* the pre-steps start from the network's own initial membrane ``v_init_frac + v_init_bias`` (θ/2 and any
  potential calibration), and the COS shift is taken from it; the authors' QCFS networks start at 0.5 (θ/2), which
  is the same value for ``ConvertConfig(v_init=0.5, snn_calibration="none")``;
* COS's "iterative" variant is dead code in the authors' file (``for opt_epoch in range(1)``): one round, as here;
* COS needs direct (analog) input encoding, where the pre-steps see exactly the inputs of the real run's first ρ
  steps (the authors' setting); SRP works with any encoding (its pre-steps are just earlier timesteps);
* max-pools, residual adds and the output integrator are bsnn's; the authors replace max-pools by average pools.

**Latency.** The reported T counts real steps only; :func:`latency_pre_steps` is what comes before them, and
:class:`bsnn.simulate.SimResult` reports it as ``pre_steps`` (the latency of ``accuracy[T]`` is ``pre_steps + T``).
SRP: τ (the paper's count: "64.32 % on ImageNet with 10 steps" is τ = 8 + T = 2). COS: L·ρ for L IF layers — layer
l can estimate its offset only from layer l−1's *corrected* output, so on hardware that steps all layers together
the real step 1 of the last layer comes after L·ρ steps (each layer still computes only ρ extra steps; the authors'
``mp_test`` reports accuracy per real step only). ``spike_counts`` cover the real steps only.

:func:`bsnn.convert` records the option in the network, so every simulation of it applies the correction, except its
own SNN calibration, which runs :func:`suspended` (calibrated potentials + COS: see ``docs/conversion.md``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch

from bsnn._registry import Registry
from bsnn.errors import ConfigError
from bsnn.snn.functional import per_sample_spikes
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.neuron import IFNeuron

Step = Callable[[int], torch.Tensor]
"""``step(tc)``: run the network's next ``tc`` timesteps of the current batch (time folded into the batch) and
return its output ``[tc * B, K]`` (the simulator's chunk runner, :func:`bsnn.simulate.iter_chunks`)."""

#: residual membrane (units of θ) at or below which SRP silences a neuron (authors' ``v > 1e-3``)
SRP_RESIDUAL = 1e-3


@dataclass(frozen=True)
class OffsetCorrection:
    """A registered run-time correction.

    Attributes:
        prepare: ``(snn, step, pre_steps) -> context``: runs the pre-steps of the current batch, resets the network
            and returns the context manager inside which the real run is corrected.
        latency: ``(snn, pre_steps) -> timesteps`` before real step 1 (see the module docstring).
        encodings: input encodings it supports.
        work: ``pre_steps -> extra timesteps every layer computes`` per input (COS: ρ, SRP: τ; what the cost
            model charges in energy, :func:`work_pre_steps`).
    """

    prepare: Callable[[SpikingNetwork, Step, int], ContextManager]
    latency: Callable[[SpikingNetwork, int], int]
    encodings: tuple[str, ...] = ("direct", "poisson")
    work: Callable[[int], int] = lambda n: n


OFFSET_CORRECTIONS: Registry[OffsetCorrection] = Registry("offset correction")


def cos_initial_membrane(v0: torch.Tensor, v_seq: torch.Tensor, s_seq: torch.Tensor) -> torch.Tensor:
    """COS's shifted initial membrane from ρ pre-steps (units of θ), per neuron.

    The authors' rule (``MPLayer.forward``, ``opt_epoch == 0``): a neuron that fired at least once and ends below 0
    fired one spike too many — its initial membrane goes down by ``val = max(1, m_fire - 0.999)``, ``m_fire`` its
    lowest pre-reset membrane on a spiking step; a neuron ending at ``>= 1`` fired one too few — it starts at
    ``v0 + val2``, ``val2 = max(1, 1.001 - m_quiet)``, ``m_quiet`` its highest membrane on a silent step. As in
    the authors' code a neuron that never spiked has ``m_fire = 1000`` (unused) and one that spiked on every step
    ``m_quiet = -1000``, so a neuron saturated on every pre-step and still ``>= 1`` starts ``1001.001`` higher.

    Args:
        v0: initial membrane the pre-steps started from ``[B, ...]``.
        v_seq: membrane after each pre-step (after the reset by subtraction) ``[ρ, B, ...]``.
        s_seq: spikes of each pre-step, 0/1, ``[ρ, B, ...]``.

    Returns:
        The initial membrane of the real run ``[B, ...]`` (float32, like ``v0``).
    """
    fired = s_seq > 0
    v_end = v_seq[-1]
    m_fire = torch.where(fired, v_seq + 1.0, 1000.0).amin(0)  # lowest membrane before a reset
    m_quiet = torch.where(fired, -1000.0, v_seq).amax(0)  # highest membrane that did not fire
    lower = torch.where(v_end < 0, (s_seq.sum(0) > 1e-3).to(v0.dtype), 0.0)
    val = torch.where(m_fire - 0.999 > 1.0, m_fire - 0.999, 1.0)
    val2 = torch.where(1.001 - m_quiet > 1.0, 1.001 - m_quiet, 1.0)
    return torch.where(v_end >= 1.0, v0 + val2, v0 - lower * val)


def srp_keep(v_end: torch.Tensor) -> torch.Tensor:
    """SRP's gate from the residual membrane after τ pre-steps ``[B, ...]`` (units of θ): True keeps the neuron's
    spikes, False silences it for the real run (authors: ``v > 1e-3``)."""
    return v_end > SRP_RESIDUAL


@contextmanager
def initial_membranes(snn: SpikingNetwork, v0: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the context, the named IF layers start each run (their first call after a reset) from the given
    per-sample membranes ``v0[name] [B, ...]`` (units of θ) instead of ``v_init_frac + v_init_bias``; the buffers are
    swapped only during that first call and restored right after it (also on an error)."""
    neurons = snn.neurons()
    with ExitStack() as stack:
        for name, v in v0.items():
            saved: dict[str, torch.Tensor] = {}

            def swap(m, _args, v=v, saved=saved) -> None:
                if m.v is None:  # first call after a reset: initial_potential() reads the swapped buffers
                    saved.update(frac=m.v_init_frac, bias=m.v_init_bias)
                    m.v_init_frac, m.v_init_bias = torch.zeros_like(m.v_init_frac), v

            def restore(m, _args, _out, saved=saved) -> None:
                if saved:
                    m.v_init_frac, m.v_init_bias = saved.pop("frac"), saved.pop("bias")

            stack.callback(neurons[name].register_forward_pre_hook(swap).remove)
            stack.callback(neurons[name].register_forward_hook(restore, always_call=True).remove)
        yield


@contextmanager
def silenced(snn: SpikingNetwork, keep: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the context, the spikes of the named IF layers are multiplied by ``keep[name] [B, ...]`` (0/1) at every
    timestep, and their recorded spike counts count only what passes."""
    neurons = snn.neurons()
    with ExitStack() as stack:
        for name, k in keep.items():
            def gate(m, _args, out, k=k) -> None:
                tc = m.time_chunk
                seq = out.unflatten(0, (tc, -1))
                seq.mul_(k.to(out.dtype))  # in place: the spikes keep their memory layout
                if m.record:
                    m.record_counts(per_sample_spikes(seq).double().sum(1), replace_last=True)

            stack.callback(neurons[name].register_forward_hook(gate).remove)
        yield


class _LayerDone(Exception):
    """Ends a COS pre-step once the IF layer being estimated has run."""


@torch.no_grad()
def cos_pre_steps(snn: SpikingNetwork, step: Step, pre_steps: int) -> dict[str, torch.Tensor]:
    """Run COS's ρ pre-steps layer by layer; return every IF layer's initial membrane for the real run ``[B, ...]``.

    For IF layer l (graph order) the network runs ρ single steps from a reset, each stopped once l has run, the
    layers before l starting from their shifted membranes; l's membranes and spikes give its shift
    (:func:`cos_initial_membrane`). The network is left reset.
    """
    shifted: dict[str, torch.Tensor] = {}
    for name, neuron in snn.neurons().items():
        spikes: list[torch.Tensor] = []

        def record(_m, _a, out) -> None:  # the layers after this one are not needed: stop the step here
            spikes.append(out.float())
            raise _LayerDone

        handle = neuron.register_forward_hook(record)
        vs: list[torch.Tensor] = []
        try:
            snn.reset()
            with initial_membranes(snn, shifted):
                for _ in range(pre_steps):
                    try:
                        step(1)
                    except _LayerDone:
                        pass
                    vs.append(neuron.v.clone())
        finally:
            handle.remove()
        v_seq = torch.stack(vs)
        shifted[name] = cos_initial_membrane(neuron.initial_potential(vs[0]), v_seq,
                                             torch.stack(spikes).reshape(v_seq.shape))
    snn.reset()
    return shifted


@torch.no_grad()
def srp_pre_steps(snn: SpikingNetwork, step: Step, pre_steps: int) -> dict[str, torch.Tensor]:
    """Run SRP's τ pre-steps (the whole network, usual initial membranes); return every IF layer's gate
    ``[B, ...]`` (:func:`srp_keep` of its residual membrane). The network is left reset."""
    snn.reset()
    step(pre_steps)
    keep = {name: srp_keep(n.v) for name, n in snn.neurons().items()}
    snn.reset()
    return keep


OFFSET_CORRECTIONS.register("none")(OffsetCorrection(prepare=lambda _snn, _step, _n: ExitStack(),
                                                     latency=lambda _snn, _n: 0, work=lambda _n: 0))
OFFSET_CORRECTIONS.register("cos")(OffsetCorrection(
    prepare=lambda snn, step, n: initial_membranes(snn, cos_pre_steps(snn, step, n)),
    latency=lambda snn, n: n * len(snn.neuron_names), encodings=("direct",)))
OFFSET_CORRECTIONS.register("srp")(OffsetCorrection(
    prepare=lambda snn, step, n: silenced(snn, srp_pre_steps(snn, step, n)),
    latency=lambda _snn, n: n))


def check_offset_correction(method: str, pre_steps: int, where: str = "convert") -> None:
    """Raise :class:`~bsnn.errors.ConfigError` unless ``method`` is registered and ``pre_steps >= 1``."""
    if method not in OFFSET_CORRECTIONS:
        raise ConfigError(f"{where}.offset_correction must be one of {', '.join(OFFSET_CORRECTIONS.names())}, "
                          f"got {method!r}")
    if isinstance(pre_steps, bool) or not isinstance(pre_steps, int) or pre_steps < 1:
        raise ConfigError(f"{where}.offset_pre_steps must be a positive number of timesteps (the authors use 4), "
                          f"got {pre_steps!r}")


def network_correction(snn: SpikingNetwork) -> tuple[str, int]:
    """``(method, pre_steps)`` of the network's run-time offset correction, from its conversion record
    (``ConvertConfig.offset_correction`` / ``offset_pre_steps``); ``("none", 0)`` for networks without one."""
    record = snn.meta.get("convert", {})
    method = str(record.get("offset_correction", "none")).lower()
    return (method, int(record.get("offset_pre_steps", 4))) if method != "none" else ("none", 0)


def set_offset_correction_(snn: SpikingNetwork, method: str, pre_steps: int = 4) -> SpikingNetwork:
    """Switch the run-time offset correction of a converted network (its conversion record is updated, so the
    choice is saved with it). Returns ``snn``."""
    check_offset_correction(method, pre_steps)
    snn.meta.setdefault("convert", {}).update(offset_correction=method.lower(), offset_pre_steps=pre_steps)
    return snn


@contextmanager
def suspended(snn: SpikingNetwork) -> Iterator[None]:
    """Simulate ``snn`` without its offset correction inside the context (conversion's SNN calibration runs so:
    calibrating the initial potentials while COS shifts them per sample collapsed the CIFAR-10 network, see
    ``docs/conversion.md``); the choice is restored on exit."""
    record = snn.meta.setdefault("convert", {})
    saved = {k: record[k] for k in ("offset_correction", "offset_pre_steps") if k in record}
    record["offset_correction"] = "none"
    try:
        yield
    finally:
        record.pop("offset_correction")
        record.update(saved)


def latency_pre_steps(snn: SpikingNetwork) -> int:
    """Timesteps each input runs before real step 1 under the network's correction (0 without one)."""
    method, n = network_correction(snn)
    return OFFSET_CORRECTIONS.get(method).latency(snn, n)


def work_pre_steps(snn: SpikingNetwork) -> int:
    """Extra timesteps every layer computes per input under the network's correction (0 without one): the
    pre-steps' share of the energy (:func:`bsnn.hardware.cost.estimate`)."""
    method, n = network_correction(snn)
    return OFFSET_CORRECTIONS.get(method).work(n)


@contextmanager
def offset_correction(snn: SpikingNetwork, step: Step, encoding: str = "direct") -> Iterator[None]:
    """Run the pre-steps of the network's offset correction for the current batch (if it has one) and correct the
    real run inside the context. ``snn`` must be freshly reset; it is reset again before the real run."""
    method, n = network_correction(snn)
    if method == "none":
        yield
        return
    corr = OFFSET_CORRECTIONS.get(method)
    other = [f"{k} ({type(m).__name__})" for k, m in snn.neurons().items()
             if type(m).forward is not IFNeuron.forward or m.firing != "if"]
    if other:  # e.g. hardware constraints' fixed-point neurons hold their membrane in input units, not θ
        raise ConfigError(f"offset correction {method!r} reads the membranes of bsnn's ideal IF neurons (units of "
                          f"θ); these layers are other neurons: {', '.join(other[:3])}; simulate the correction "
                          "without constraints.membrane_bits, or convert with offset_correction 'none'")
    if encoding not in corr.encodings:
        raise ConfigError(f"offset correction {method!r} needs {' or '.join(corr.encodings)} input encoding (its "
                          f"pre-steps must see the real run's inputs), got simulate.encoding={encoding!r}; use "
                          "encoding 'direct' or convert with offset_correction 'srp' / 'none'")
    with corr.prepare(snn, step, n):
        yield
