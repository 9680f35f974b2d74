"""Simulate a spiking network over time and read its accuracy at every requested T from one run.

Time is folded into the batch: each call of the network processes a chunk of ``time_chunk`` timesteps as
``[Tc * B, ...]``, neurons keep their membrane across chunks, so peak memory depends on ``time_chunk``, not
on T. The output integrator's membrane after T steps is the prefix sum of the output currents; the
prediction at T is its argmax — identical to a separate run stopped at T, because the network is causal.
"""

from __future__ import annotations

import time
import weakref
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Iterator, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bsnn._validate import _check, from_dict
from bsnn.data import unpack_batch
from bsnn.distributed import all_gather_objects, all_reduce_tensor_sum, current_env, resolve_device
from bsnn.errors import ConfigError
from bsnn.snn.encode import get_encoder
from bsnn.snn.heap import retain_freed_memory
from bsnn.hardware.config import ConstraintConfig
from bsnn.snn.kernels import KERNELS, check_kernel, default_kernel
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.offset import latency_pre_steps, offset_correction
from bsnn.snn.synapse import SYNAPSE_MODES, bitpack_engine, eligible_layers, resolve_mode, synapse_mode


@dataclass
class SimConfig:
    """Simulation of the spiking network.

    Attributes:
        timesteps: every T at which accuracy is reported (one run to max(T)).
        time_chunk: timesteps folded into the batch per call (bounds peak memory; independent of T). 4 is the
            fastest measured on a 2-core CPU at batch 128 with the C++ IF kernel (small CNN, VGG-7, ResNet-20:
            1.2-1.5x faster than 1; longer chunks leave the caches).
        encoding: ``"direct"`` (the analog image every timestep) or ``"poisson"`` (rate-coded spikes).
        kernel: IF-scan backend (see :mod:`bsnn.snn.kernels`); ``auto`` = the fused Triton kernel on CUDA, the
            ``cpp`` kernel on CPU where its extension builds (compiled once, ~20 s), else the ``inductor`` one,
            else the in-place torch loop.
        synapse: arithmetic of binary layers fed by spikes (see :mod:`bsnn.snn.synapse`): ``float``, ``bf16``
            (bit-identical to float, faster), ``int`` (int8/int32 crossbar arithmetic, the integer oracle) or
            ``auto`` (bf16 on CUDA and on CPUs with native bf16, else float; on such a CPU with the ``bitpack``
            extension, the faster of ``bf16`` and ``bitpack`` for this network and batch shape, timed on the
            first batch: :func:`tune_synapse_mode`).
        max_samples: simulate only the first N test samples (None: all).
        record_predictions: keep every sample's prediction and logit margin at every step (``[T, N]``), the
            input of run-time early-exit analysis (:mod:`bsnn.early_exit`).
        constraints: in-memory hardware limits to simulate next to the ideal SNN (fields of
            :class:`bsnn.hardware.constraints.ConstraintConfig`: ``xbar_rows``, ``adc_bits``, ``membrane_bits``, ...);
            None = ideal only.
        retain_memory: keep the memory each time chunk frees inside the process for the next chunk (glibc's
            malloc thresholds, :mod:`bsnn.snn.heap`; process-wide, not undone): no page faults on the reuse,
            which otherwise made some runs 1.3-2.1x slower on 2-core CPUs. Results do not depend on it.
    """

    timesteps: list = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    time_chunk: int = 4
    encoding: str = "direct"
    kernel: str = "auto"
    synapse: str = "auto"
    max_samples: Union[int, None] = None
    record_predictions: bool = False
    constraints: Union[dict, None] = None
    retain_memory: bool = True

    def validate(self) -> None:
        _check(len(self.timesteps) > 0 and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                                               for t in self.timesteps),
               f"simulate.timesteps must be a list of positive integers (e.g. [1, 2, 4, 8]), got {self.timesteps!r}")
        _check(self.time_chunk >= 1, f"simulate.time_chunk must be >= 1, got {self.time_chunk}")
        _check(isinstance(self.retain_memory, bool),
               f"simulate.retain_memory must be true or false, got {self.retain_memory!r}")
        _check(self.constraints is None or isinstance(self.constraints, dict),
               f"simulate.constraints must be a mapping of constraint settings or null, got {self.constraints!r}")
        _check(self.max_samples is None or (isinstance(self.max_samples, int) and not isinstance(self.max_samples, bool)
                                            and self.max_samples >= 1),
               f"simulate.max_samples must be a positive number of samples or null (all), got {self.max_samples!r}")
        _check(self.encoding in ("direct", "poisson"),
               f"simulate.encoding must be 'direct' or 'poisson', got {self.encoding!r}")
        if self.kernel != "auto":
            KERNELS.get(self.kernel)
        if self.synapse != "auto":
            SYNAPSE_MODES.get(self.synapse)
        if self.constraints is not None:
            self.constraint_config()

    def constraint_config(self):
        """The :class:`bsnn.hardware.constraints.ConstraintConfig` of ``constraints`` (validated), or None."""
        if self.constraints is None:
            return None
        return from_dict(self.constraints, ConstraintConfig).validate()


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    Attributes:
        timesteps: the requested T values (sorted).
        accuracy: T -> top-1 accuracy (%).
        samples: number of samples simulated.
        spike_counts: IF layer -> spikes per timestep summed over all samples (length max T).
        neurons: IF layer -> neurons per sample.
        ann_accuracy: accuracy (%) of the source ANN on the same samples, when given.
        wall_time_s: simulation wall time.
        config: the simulation settings used.
        validation: the same network's sweep on the validation split, when one was made (``{"accuracy": {T: %},
            "ann_accuracy", "samples"}``): what choices (the cost's operating point) are made on.
        pre_steps: timesteps each sample ran before the T counted in ``accuracy`` (a run-time offset correction's
            pre-steps, :func:`bsnn.snn.offset.latency_pre_steps`; 0 without one): ``accuracy[T]`` takes
            ``pre_steps + T`` timesteps. ``spike_counts`` count the real steps only.
    """

    timesteps: list[int]
    accuracy: dict[int, float]
    samples: int
    spike_counts: dict[str, list[float]]
    neurons: dict[str, int]
    ann_accuracy: float | None = None
    wall_time_s: float = 0.0
    config: dict = field(default_factory=dict)
    predictions: torch.Tensor | None = field(default=None, repr=False)
    margins: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)
    validation: dict | None = None
    pre_steps: int = 0

    def firing_rates(self, T: int | None = None) -> dict[str, float]:
        """Mean spikes per neuron per timestep over the first ``T`` steps (default: all), per IF layer."""
        T = T or max(self.timesteps)
        return {n: sum(c[:T]) / max(1, self.neurons[n] * self.samples * T) for n, c in self.spike_counts.items()}

    def to_dict(self) -> dict:
        """JSON-ready summary (per-sample predictions are left out)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("predictions", "margins", "labels")}
        d["accuracy"] = {str(k): v for k, v in self.accuracy.items()}
        if self.validation is not None:
            d["validation"] = {**self.validation,
                               "accuracy": {str(k): v for k, v in self.validation["accuracy"].items()}}
        d["firing_rates"] = self.firing_rates()
        return d


def _resolve_device(device: str | torch.device) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else device


TUNING_MARGIN = 0.95
"""``bitpack`` replaces ``bf16`` only when its probe takes less than this fraction of bf16's time (timing noise)."""

TUNING_ROUNDS = 2

_TUNED: "weakref.WeakKeyDictionary[SpikingNetwork, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def tune_synapse_mode(snn: SpikingNetwork, x: torch.Tensor, time_chunk: int, encoding: str, mode: str
                      ) -> tuple[str, dict]:
    """The faster of the exact ``bf16`` and ``bitpack`` synapse modes for ``snn`` on batches shaped like ``x``.

    Both modes give the same bits (:mod:`bsnn.snn.synapse`), so the choice changes only the speed: which one is
    faster depends on the network and the machine (``benchmarks/simulation_speed.py``, a 2-core AVX-512 Xeon:
    bitpack ran 1.3-1.45x faster than bf16 on the zoo's 64-256-channel airbench student, 0.36-0.57x on narrow
    16-64-channel networks). Measured like ``torch.backends.cudnn.benchmark``: one chunk of
    ``time_chunk`` steps of ``x`` in each mode, :data:`TUNING_ROUNDS` interleaved rounds (the first also packs the
    weights and builds oneDNN's primitives), min per mode; the probe's outputs are discarded (the state is reset
    before every batch). The choice is cached for ``snn`` per batch shape, device, chunk and encoding, so only the
    first simulation of a shape pays (a few chunks of one batch). Only where ``mode`` (the resolved ``auto``) is
    ``bf16`` on a CPU with the bitpack extension and ``snn`` has layers fed by spikes, and no module of ``snn``
    has hooks (they would see the probe's activations); otherwise ``(mode, {})``.

    Returns:
        ``(chosen mode, {"bf16_s": .., "bitpack_s": ..}`` (seconds of one probe chunk; empty when not timed)``)``.
    """
    if mode != "bf16" or x.device.type != "cpu" or bitpack_engine("cpu") is None or not eligible_layers(snn):
        return mode, {}
    if any(m._forward_hooks or m._forward_pre_hooks for m in snn.modules()):
        return mode, {}
    cache = _TUNED.setdefault(snn, {})
    key = (tuple(x.shape), str(x.device), time_chunk, encoding)
    if key not in cache:
        times: dict[str, list[float]] = {"bf16": [], "bitpack": []}
        gen = torch.Generator(device=x.device)
        for _ in range(TUNING_ROUNDS):
            for m in times:
                gen.manual_seed(0)
                with synapse_mode(snn, m):
                    t0 = time.perf_counter()
                    for _chunk in iter_chunks(snn, x, time_chunk, time_chunk, encoding, gen):
                        pass
                    times[m].append(time.perf_counter() - t0)
        best = {m: min(v) for m, v in times.items()}
        choice = "bitpack" if best["bitpack"] < TUNING_MARGIN * best["bf16"] else "bf16"
        cache[key] = (choice, {f"{m}_s": round(v, 6) for m, v in best.items()})
    return cache[key]


def _dataset_size(loader) -> int | None:
    """Samples in ``loader.dataset`` when the loader has a sized dataset (a torch DataLoader), else None."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def iter_chunks(snn: SpikingNetwork, x: torch.Tensor, timesteps: int, time_chunk: int = 16, encoding: str = "direct",
                generator: torch.Generator | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Simulate one batch chunk by chunk, yielding ``(first_step, membrane [Tc, B, K])``.

    With direct encoding the input-only part of the network (the first synaptic layer) runs once per batch and
    its output is repeated over the chunk's timesteps.

    ``membrane[i]`` is the output integrator's membrane after step ``first_step + i + 1``. Only one chunk of
    activations is alive at a time, so memory does not grow with ``timesteps``. The state is reset first. A
    network converted with a run-time offset correction (:mod:`bsnn.snn.offset`: COS, SRP) first runs its
    pre-steps on the batch; the steps yielded are the real ones after them.
    """
    snn.reset()
    enc = get_encoder(encoding)
    static = None
    if encoding == "direct":  # same input every step: run the input-only prefix (first layer) once per batch
        prefix, suffix_once, once, readers = snn.split_static_constant()
        # channels-last from here on: faster convolutions and pooling, and no layout copies downstream
        static = tuple(v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in prefix(x))
    plain: list = []  # the unfused suffix, built only if a reader has hooks (suffix_once is it when nothing fused)

    def step(tc: int) -> torch.Tensor:  # the network's next tc timesteps of this batch, [tc * B, K]
        snn.set_time_chunk(tc)
        if static is None:
            return snn(enc(x, tc, generator))
        if not any(once):
            return suffix_once(*(enc(v, tc) for v in static))
        if not any(m._forward_hooks or m._forward_pre_hooks for m in readers):
            # the neurons reading the prefix get its output once per chunk, not repeated tc times
            return suffix_once(*(v if o else enc(v, tc) for v, o in zip(static, once)))
        if not plain:
            plain.append(snn.split_static()[1])
        return plain[0](*(enc(v, tc) for v in static))

    acc = None
    with offset_correction(snn, step, encoding):
        for start in range(0, timesteps, time_chunk):
            tc = min(time_chunk, timesteps - start)
            cur = step(tc).reshape(tc, x.shape[0], -1)
            cum = cur.cumsum(0) if acc is None else cur.cumsum(0).add_(acc)
            acc = cum[-1].clone()
            yield start, cum


@torch.no_grad()
def run_batch(snn: SpikingNetwork, x: torch.Tensor, timesteps: int, time_chunk: int = 16, encoding: str = "direct",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Simulate one batch for ``timesteps`` steps; return the output membrane after every step.

    Args:
        snn: the spiking network (its state is reset first).
        x: analog input ``[B, C, H, W]``.
        timesteps: T.
        time_chunk: timesteps folded into the batch per call.
        encoding: registered input encoder.

    Returns:
        Accumulated output membrane ``[T, B, K]`` (prefix sums of the output currents).
    """
    return torch.cat([cum for _, cum in iter_chunks(snn, x, timesteps, time_chunk, encoding, generator)], 0)


@torch.no_grad()
def simulate(snn: SpikingNetwork, loader, timesteps: list[int] | None = None, cfg: SimConfig | None = None, *,
             device: str | torch.device = "cpu", ann: nn.Module | None = None, quiet: bool = False,
             seed: int = 0, shard: bool = True) -> SimResult:
    """Accuracy of ``snn`` at every T in ``timesteps`` from one run to ``max(timesteps)``.

    Under ``torchrun`` (``shard``, the default) the batches are dealt to the ranks (batch i to rank i mod N), and
    the correct counts, spike counts, ANN accuracy and recorded predictions are reduced over the ranks: every rank
    returns exactly the single-process result (integer counts; predictions in the single process's order).

    Args:
        snn: converted network.
        loader: yields ``(x [B, C, H, W], y [B])``.
        timesteps: the T values to report (overrides ``cfg.timesteps``).
        cfg: simulation settings (chunk size, encoding, kernel, sample limit).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        ann: optional source ANN, evaluated on the same samples for reference.
        quiet: no progress bar.
        seed: seed of stochastic encoders (each batch's encoder is seeded from ``seed`` and its index, so the
            result does not depend on how batches are dealt to ranks).
        shard: split the batches over the ranks of a torchrun job (False: every rank simulates everything).

    Returns:
        :class:`SimResult` with accuracies, per-layer spike counts per timestep and neuron counts.
    """
    cfg = cfg or SimConfig()
    if timesteps is not None:
        cfg = SimConfig(**{**asdict(cfg), "timesteps": list(timesteps)})
    cfg.validate()
    ts = sorted(set(int(t) for t in cfg.timesteps))
    t_max = ts[-1]
    dev = _resolve_device(device)
    kernel = default_kernel(dev) if cfg.kernel == "auto" else cfg.kernel
    check_kernel(kernel, dev)
    if cfg.retain_memory and dev.type == "cpu":
        retain_freed_memory()
    snn = snn.to(dev).eval()
    snn.set_kernel(kernel)
    if ann is not None:
        ann = ann.to(dev).eval()
    gen = torch.Generator(device=dev)
    env = current_env()
    rank, world = (env.rank, env.world_size) if shard else (0, 1)
    correct = {t: 0 for t in ts}
    preds, margins, labels = [], [], []
    ann_correct, n = 0, 0
    counts = {name: torch.zeros(t_max, dtype=torch.float64) for name in snn.neuron_names}
    neurons: dict[str, int] = {}
    t0 = time.perf_counter()
    total = _dataset_size(loader)  # None (no known size: a bar without total) for loaders without a dataset
    if cfg.max_samples is not None:
        total = cfg.max_samples if total is None else min(cfg.max_samples, total)
    bar = tqdm(total=total, desc=f"simulate T<={t_max}", unit="sample", disable=quiet or None)
    mode = resolve_mode(cfg.synapse, dev)
    tuning: dict = {}
    seen = 0  # samples of all ranks' batches so far (max_samples counts the whole job's samples)
    exact_layers = None  # entered at this rank's first batch (the automatic choice times that batch)
    with ExitStack() as stack:
        for step, batch in enumerate(loader):
            x, y, _ = unpack_batch(batch, "simulate", step)  # NaN inputs, dict batches: a clear error
            if cfg.max_samples is not None:
                x, y = x[: cfg.max_samples - seen], y[: cfg.max_samples - seen]
            seen += y.numel()
            if x.shape[0] == 0:
                break
            if step % world != rank:
                bar.update(y.numel())
                continue
            x, y = x.to(dev), y.to(dev)
            if exact_layers is None:
                if cfg.synapse == "auto":
                    mode, tuning = tune_synapse_mode(snn, x, min(cfg.time_chunk, t_max), cfg.encoding, mode)
                exact_layers = stack.enter_context(synapse_mode(snn, mode))
            gen.manual_seed(seed * 1_000_003 + step)
            batch_preds, batch_margins, hits = [], [], {}
            for start, membrane in iter_chunks(snn, x, t_max, min(cfg.time_chunk, t_max), cfg.encoding, gen):
                for t in ts:  # counted on the device: the host reads them once per batch, not every step
                    if start < t <= start + membrane.shape[0]:
                        hits[t] = (membrane[t - start - 1].argmax(1) == y).sum()
                if cfg.record_predictions:
                    top2 = membrane.topk(2, dim=-1).values if membrane.shape[-1] > 1 else membrane.repeat(1, 1, 2)
                    steps = torch.arange(start + 1, start + membrane.shape[0] + 1, device=dev).view(-1, 1)
                    batch_preds.append(membrane.argmax(-1).to(torch.int16))
                    batch_margins.append((top2[..., 0] - top2[..., 1]) / steps)
            for t, h in zip(hits, torch.stack(list(hits.values())).tolist()):
                correct[t] += int(h)
            if cfg.record_predictions:
                preds.append((step, torch.cat(batch_preds).cpu()))
                margins.append((step, torch.cat(batch_margins).cpu()))
                labels.append((step, y.cpu()))
            for name, m in snn.neurons().items():
                if m.record:  # a neuron with recording off contributes no counts (its rates read as 0)
                    counts[name] += torch.tensor(m.spike_count, dtype=torch.float64)
                neurons[name] = m.neurons_per_sample
            if ann is not None:
                ann_correct += (ann(x).argmax(1) == y).sum().item()
            n += y.numel()
            bar.update(y.numel())
            if cfg.max_samples is not None and seen >= cfg.max_samples:
                break
    bar.close()
    if world > 1:  # integer counts summed over the ranks: exactly the single-process totals
        names = list(counts)
        flat = torch.tensor([n, ann_correct, *[correct[t] for t in ts]], dtype=torch.float64)
        flat = all_reduce_tensor_sum(flat)
        n, ann_correct = int(flat[0]), int(flat[1])
        correct = {t: int(v) for t, v in zip(ts, flat[2:].tolist())}
        if names:
            stacked = all_reduce_tensor_sum(torch.stack([counts[k] for k in names]))
            counts = dict(zip(names, stacked))
        neurons = {k: v for part in all_gather_objects(neurons) for k, v in part.items()}
        if cfg.record_predictions:
            preds, margins, labels = ([item for part in all_gather_objects(lst) for item in part]
                                      for lst in (preds, margins, labels))
    order = sorted(range(len(preds)), key=lambda i: preds[i][0])
    preds, margins, labels = ([lst[i][1] for i in order] for lst in (preds, margins, labels))
    if n == 0:
        raise ConfigError("simulate: the loader yielded no samples")
    return SimResult(timesteps=ts, accuracy={t: 100.0 * c / n for t, c in correct.items()}, samples=n,
                     spike_counts={k: v.tolist() for k, v in counts.items()}, neurons=neurons,
                     ann_accuracy=100.0 * ann_correct / n if ann is not None else None,
                     wall_time_s=time.perf_counter() - t0,
                     pre_steps=latency_pre_steps(snn),
                     config={**asdict(cfg), "synapse_resolved": mode, "synapse_tuning": tuning,
                             "exact_layers": sorted(eligible_layers(snn) if exact_layers is None else exact_layers)},
                     predictions=torch.cat(preds, 1) if preds else None,
                     margins=torch.cat(margins, 1) if margins else None, labels=torch.cat(labels) if labels else None)
