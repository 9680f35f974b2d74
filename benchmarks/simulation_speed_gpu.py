"""Benchmark (GPU): simulation throughput of bsnn and spikingjelly 2.0 on CUDA, memory against T, the dense limit.

The one short timing script for a session that is lent a GPU (``python benchmarks/simulation_speed_gpu.py``, a few
minutes on one device); on a machine without CUDA it stops with a message (``--device cpu --quick`` runs the same
code on the CPU as a smoke test).

Networks (binary weights, first / last layer full precision), each converted once by bsnn (``ConvertConfig()``)
and once by spikingjelly (``RateCodingRecipe(mode='99.9%')``) from the same ANN, calibrated on the same images:

* ``cifar10_vgg_binary`` — the zoo's binary plain_vgg8 (width 64), weights from ``bsnn/zoo``;
* ``resnet20_cifar`` (binarised, freshly initialised, BN statistics settled on the calibration images) — a
  ResNet-class network the kernels were not tuned on (throughput does not depend on training);
* ``vgg15_snn`` width 0.5 (binarised, fresh) — the binary-SNN paper's VGG-15, no BN, average pooling.

Inputs: CIFAR-10 test images when ``../shared/data/cifar10.npz`` exists, else random normal images. For each T in
``--timesteps`` and batch ``--batch`` (direct encoding, accuracy bookkeeping included):

* **bsnn** = ``bsnn.simulate`` with its CUDA defaults (the fused Triton IF kernel, exact bf16 binary layers, the
  first layer once per batch, spike counts kept on the device);
* **spikingjelly** multi-step (``[T, B, ...]`` at once) and single-step, on the same device; sj 2.0 picks its
  registered CUDA implementation by the input's device; the faster is the reference;
* **dense limit** = T fp32 forward passes of the plain (materialised) ANN on the batch.

Each timing is the median of ``--reps`` rounds after a warm-up (compilation), the simulators interleaved within
a round, every call closed by ``torch.cuda.synchronize()``; peak memory = ``torch.cuda.max_memory_allocated``
growth during the call. Reported: seconds, samples·steps/s, bsnn's speed-up over spikingjelly's faster mode,
bsnn's time as a fraction of the dense limit, and peak memory at every T (flat in T: bsnn folds only
``time_chunk`` steps into the batch). Writes ``<out>/simulation_speed_gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, command_line, load_average, log, machine_info, machine_markdown,  # noqa: E402
                     markdown_table, now_iso, write_results)
from simulation_speed import ann_runner, settle_bn, sj_network, sj_runner  # noqa: E402

import bsnn  # noqa: E402
from bsnn.binary import materialize  # noqa: E402
from bsnn.config import BinaryConfig, DataConfig, SimConfig  # noqa: E402
from bsnn.data import build_loaders  # noqa: E402
from bsnn.pipeline import build_model  # noqa: E402
from bsnn.simulate import simulate  # noqa: E402

NAME = "simulation_speed_gpu"


def images(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(calibration [512, 3, 32, 32], test batch [B, 3, 32, 32], description)``."""
    cifar = Path(args.cifar_npz)
    cifar = cifar if cifar.is_absolute() else ROOT / cifar
    if cifar.is_file():
        s = build_loaders(DataConfig(name=f"npz:{cifar}", val_fraction=0.0, augment=False), seed=0).splits
        calib = torch.stack([s.train[i][0] for i in range(512)])
        return calib, torch.stack([s.test[i][0] for i in range(args.batch)]), "CIFAR-10 test images (JPEG copy)"
    g = torch.Generator().manual_seed(0)
    return (torch.randn(512, 3, 32, 32, generator=g), torch.randn(args.batch, 3, 32, 32, generator=g),
            "random normal images (CIFAR-10 archive absent)")


def networks(calib: torch.Tensor) -> list[tuple[str, torch.nn.Module, str]]:
    """``(name, ANN, source)`` of the benchmark networks."""
    out = []
    model, card = bsnn.zoo.load("cifar10_vgg_binary")
    out.append(("cifar10_vgg_binary (plain_vgg8 w64)", model.eval(), f"zoo, {card['ann']['test_acc']:.2f} % test"))
    binary = dataclasses.asdict(BinaryConfig())
    for name, kwargs in (("resnet20_cifar", {}), ("vgg15_snn", {"width": 0.5})):
        torch.manual_seed(0)
        m = build_model({"name": name, "num_classes": 10, "in_channels": 3, "kwargs": kwargs, "binary": binary})
        out.append((f"{name} {kwargs or ''}".strip(), settle_bn(m, calib), "freshly initialised"))
    return out


def timed_cuda(fns: dict, reps: int, device: torch.device) -> dict[str, dict]:
    """Warm up each, then ``reps`` interleaved rounds; name -> ``{"s": median, "all": [...], "peak_mib": ...}``."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
        sync()
    times = {k: [] for k in fns}
    peaks = {k: 0.0 for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
            if cuda:
                peaks[k] = max(peaks[k], (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20)
    return {k: {"s": statistics.median(v), "all": v, "peak_mib": peaks[k] if cuda else None}
            for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timesteps", default="8,32,128")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: T = 4, 8, batch 16, one rep, 64 calibration images")
    p.add_argument("--cifar-npz", default="../shared/data/cifar10.npz")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    convert_cfg = bsnn.ConvertConfig()
    if args.quick:
        args.timesteps, args.batch, args.reps = "4,8", 16, 1
        convert_cfg = bsnn.ConvertConfig(calib_samples=64, snn_calibration_samples=32)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("simulation_speed_gpu: no CUDA device here; run it on a GPU machine (or --device cpu "
                         "--quick for a smoke run of the same code)")
    ts = [int(t) for t in args.timesteps.split(",")]
    started, load0 = now_iso(), load_average()
    calib, x, data = images(args)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=len(x))
    calib_loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=128)
    rows, results = [], []
    for name, ann, source in networks(calib):
        log(f"{name}: converting (bsnn, spikingjelly)")
        snn = bsnn.convert(ann, calib_loader, convert_cfg).to(dev)
        sj = sj_network(ann, calib[:convert_cfg.calib_samples]).to(dev)
        dense_ann = materialize(copy.deepcopy(ann)).eval().to(dev)
        xd = x.to(dev)
        for T in ts:
            cfg = SimConfig(timesteps=[T])
            fns = {"bsnn": lambda T=T, cfg=cfg: simulate(snn, loader, [T], cfg, device=dev, quiet=True),
                   "spikingjelly multi-step": sj_runner(sj, xd, T, "m"),
                   "spikingjelly single-step": sj_runner(sj, xd, T, "s"),
                   "dense limit (T fp32 ANN passes)": ann_runner(dense_ann, xd, T)}
            r = timed_cuda(fns, args.reps, dev)
            sj_best = min(r["spikingjelly multi-step"]["s"], r["spikingjelly single-step"]["s"])
            rate = {k: len(x) * T / v["s"] for k, v in r.items()}
            rec = {"network": name, "source": source, "T": T, "batch": len(x), "timings": r,
                   "samples_steps_per_s": rate, "speedup_vs_spikingjelly": sj_best / r["bsnn"]["s"],
                   "fraction_of_dense": r["bsnn"]["s"] / r["dense limit (T fp32 ANN passes)"]["s"]}
            results.append(rec)
            rows.append([name, T, f"{r['bsnn']['s'] * 1e3:.1f}", f"{sj_best * 1e3:.1f}",
                         f"{r['dense limit (T fp32 ANN passes)']['s'] * 1e3:.1f}", f"{rate['bsnn']:.3g}",
                         f"{rec['speedup_vs_spikingjelly']:.2f}x", f"{rec['fraction_of_dense']:.2f}",
                         "—" if r["bsnn"]["peak_mib"] is None else f"{r['bsnn']['peak_mib']:.0f}",
                         "—" if r["spikingjelly multi-step"]["peak_mib"] is None else
                         f"{r['spikingjelly multi-step']['peak_mib']:.0f}"])
            log(f"  T={T}: bsnn {r['bsnn']['s'] * 1e3:.1f} ms, spikingjelly {sj_best * 1e3:.1f} ms "
                f"({rec['speedup_vs_spikingjelly']:.2f}x), dense {rec['fraction_of_dense']:.2f}")
    info = machine_info()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    payload = {"command": command_line(), "started": started, "finished": now_iso(), "machine": info,
               "device": str(dev), "data": data, "load_average": {"start": load0, "end": load_average()},
               "results": results}
    md = [f"# Simulation speed on {info.get('gpu', str(dev))}: bsnn vs spikingjelly 2.0", "",
          machine_markdown(info), "", f"Command: `{payload['command']}` (started {started}).", "",
          f"Data: {data}; batch {len(x)}; direct encoding; medians of {args.reps} interleaved rounds after a warm-up.",
          "", markdown_table(["network", "T", "bsnn ms", "spikingjelly best ms", "dense limit ms",
                              "bsnn samples·steps/s", "bsnn speed-up", "bsnn / dense", "bsnn peak MiB",
                              "sj multi-step peak MiB"], rows)]
    paths = write_results(args.out, NAME + ("_quick" if args.quick else ""), payload, "\n".join(md))
    log(f"wrote {paths['md']}")


if __name__ == "__main__":
    main()
