"""Benchmark: simulation throughput of the same converted networks in bsnn and spikingjelly 2.0, vs the dense limit.

Networks (binary weights, first/last layer full precision, converted from the same trained ANN by each library):

* **small CNN, 28x28x1** — a ReLU binary student of the default recipe (``runs/default/student.pt`` if ReLU, else the
  conversion benchmark's cached copy, else a freshly initialised one: throughput does not depend on training);
* **VGG-7, 32x32x3** — the binary VGG-7 (width 0.25) of the conversion benchmark's CIFAR-10 cache, else a freshly
  initialised one; input: CIFAR-10 test images when ``../shared/data/cifar10.npz`` exists, else random images;
* **ResNet-20, 32x32x3** — a binary ``resnet20_cifar`` (residual adds, strided convolutions), freshly initialised
  with its BN statistics settled on the calibration images: a ResNet-class network the kernels were not tuned on;
* **airbench student, 32x32x3** (``--networks ...,airbench``) — the zoo's trained binary ReLU student
  ``cifar10_airbench_binary_v2`` (airbench layout, 87.9 % on CIFAR-10), on the test images of its own split:
  a trained VGG-class network the kernels were not tuned on (needs ``../shared/data/cifar10.npz``).

For batch 128 and each T in {8, 32, 128} (direct encoding, accuracy bookkeeping included):

* **bsnn** = ``bsnn.simulate.simulate`` with its defaults (kernel ``auto`` -> the C++ IF kernel on CPU,
  synapse ``auto`` -> exact bf16 binary layers where the CPU has native bf16, first layer once per batch);
* **bsnn fp32** = the same with ``synapse='float'`` and the eager ``torch`` IF kernel (the previous engine);
* **bsnn bf16** / **bsnn bitpack** = the default engine with the synapse mode fixed to ``bf16`` (exact bf16
  convolutions, oneDNN) or ``bitpack`` (spikes and ±1 weights packed 64 per word, AND + popcount in the C++
  extension of ``bsnn.snn.kernels.bitpack``: AVX-512 VPOPCNTDQ where the CPU has it), the two candidates of the
  automatic choice;
* **spikingjelly** = ``ann2snn.Converter(RateCodingRecipe(..., mode='99.9%'))``, multi-step mode (the whole T
  folded into the batch, its registered CPU IF operator) and single-step mode; the faster of the two is the
  reference ("its fastest backend available on the machine");
* **dense limit** = T forward passes of the plain (materialised) ANN in fp32 on the same batch, timed in the same
  rounds.

Each timing is the median of ``--reps`` rounds after one warm-up run (which also triggers compilation); within a
round the four simulators run in turn, so load changes on the machine hit all of them alike. Peak memory
is the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each measurement)
minus the resident size before it. bsnn's ``simulate`` keeps freed memory mapped for reuse (``SimConfig.retain_memory``,
glibc's malloc, process-wide: :mod:`bsnn.snn.heap`); the benchmark sets it before the first timing, so spikingjelly
and the dense limit run under the same allocator settings. Writes ``<out>/simulation_speed.{json,md}``.

Usage::

    python benchmarks/simulation_speed.py                 # the three networks, T = 8, 32, 128
    python benchmarks/simulation_speed.py --quick         # smoke run: T = 4, 8, one rep
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, command_line, load_average, log, machine_info, machine_markdown,  # noqa: E402
                     markdown_table, now_iso, relu_model, write_results)
from _zoo import available as zoo_available, load_network  # noqa: E402

from bsnn.binary import materialize  # noqa: E402
from bsnn.config import BinaryConfig, ConvertConfig, DataConfig, SimConfig, load_config  # noqa: E402
from bsnn.convert import Percentile, convert  # noqa: E402
from bsnn.data import build_loaders  # noqa: E402
from bsnn.pipeline import build_model, load_model  # noqa: E402
from bsnn.simulate import simulate  # noqa: E402
from bsnn.snn.heap import retain_freed_memory  # noqa: E402
from bsnn.snn.kernels import bitpack  # noqa: E402

NAME = "simulation_speed"


# ----------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak() -> int | None:
    """Reset the RSS high-water mark (Linux) and return the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_growth_mib(base_kib: int | None) -> float | None:
    hwm = _status_kib("VmHWM")
    return None if base_kib is None or hwm is None else round((hwm - base_kib) / 1024, 1)


def timed(fn, reps: int) -> tuple[float, list[float], float | None]:
    """One warm-up call, then ``reps`` timed calls; returns ``(median s, all s, peak RSS growth MiB)``."""
    return timed_interleaved({"fn": fn}, reps)["fn"]


def timed_interleaved(fns: dict, reps: int) -> dict[str, tuple[float, list[float], float | None]]:
    """Warm up every function, then time them in turn, ``reps`` rounds (so that a change in the machine's load
    hits all of them alike); returns name -> ``(median s, all s, peak RSS growth MiB)``."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float | None] = {k: None for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            base = reset_peak()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            g = peak_growth_mib(base)
            peaks[k] = g if peaks[k] is None or (g is not None and g > peaks[k]) else peaks[k]
    return {k: (statistics.median(v), v, peaks[k]) for k, v in times.items()}


# ----------------------------------------------------------------------------------------- networks
def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def networks(args) -> list[dict]:
    """The benchmark networks named in ``args.networks``, each with a calibration batch and a test batch of
    ``args.batch`` images."""
    out = []
    cfg = load_config(ROOT / "configs" / "default.yaml")
    mn = build_loaders(cfg.data, seed=0).splits
    path = relu_model(ROOT / "runs/default/student.pt", ROOT / args.cache / "mnist5k_default_student.pt")
    if path is not None:
        model, _ = load_model(path)
        src = str(path.relative_to(ROOT))
    else:
        model = build_model({"name": "small_cnn", "num_classes": 10, "in_channels": 1, "kwargs": {},
                             "binary": dataclasses.asdict(BinaryConfig())})
        src = "freshly initialised (no trained student found; throughput does not depend on training)"
    xs = torch.stack([mn.test[i][0] for i in range(args.batch)])
    calib = torch.stack([mn.train[i][0] for i in range(512)])
    out.append({"name": "small CNN 28x28x1", "model": model.eval(), "source": src, "x": xs, "calib": calib,
                "data": "mnist5k test split"})

    cifar = Path(args.cifar_npz)
    cifar = cifar if cifar.is_absolute() else ROOT / cifar
    path = _first_existing(ROOT / args.cache / "cifar10_vgg7_w0.25_h256_e5_n20000_b128_lr0.002.pt")
    if path is not None:
        model, _ = load_model(path)
        src = str(path.relative_to(ROOT))
    else:
        model = build_model({"name": "vgg7_cifar", "num_classes": 10, "in_channels": 3,
                             "kwargs": {"width": 0.25, "hidden": 256}, "binary": dataclasses.asdict(BinaryConfig())})
        src = "freshly initialised (no cached CIFAR-10 model; throughput does not depend on training)"
    if cifar.is_file():
        s = build_loaders(DataConfig(name=f"npz:{cifar}", val_fraction=0.0, augment=False), seed=0).splits
        xs = torch.stack([s.test[i][0] for i in range(args.batch)])
        calib = torch.stack([s.train[i][0] for i in range(512)])
        data = "CIFAR-10 test images"
    else:
        g = torch.Generator().manual_seed(0)
        xs, calib = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randn(512, 3, 32, 32, generator=g)
        data = "random normal images (CIFAR-10 archive absent)"
    out.append({"name": "VGG-7 (width 0.25) 32x32x3", "model": model.eval(), "source": src, "x": xs,
                "calib": calib, "data": data})
    # a ResNet-class network the kernels were not tuned on (fresh: throughput does not depend on training)
    torch.manual_seed(0)
    model = build_model({"name": "resnet20_cifar", "num_classes": 10, "in_channels": 3, "kwargs": {},
                         "binary": dataclasses.asdict(BinaryConfig())})
    out.append({"name": "ResNet-20 32x32x3", "model": settle_bn(model, calib), "x": xs, "calib": calib,
                "source": "freshly initialised, BN statistics settled on the calibration images (throughput does not "
                          "depend on training)", "data": data})
    keys = ["small_cnn", "vgg7", "resnet20"]
    wanted = args.networks.split(",")
    if "airbench" in wanted and zoo_available():
        z = load_network("cifar10_airbench_binary_v2")
        out.append({"name": "airbench student 32x32x3 (zoo)", "model": z.model, "x": torch.stack(
            [z.test[i][0] for i in range(args.batch)]), "calib": torch.cat([xb for xb, _ in z.calib])[:512],
                    "source": "the zoo's trained `cifar10_airbench_binary_v2` (87.9 % CIFAR-10 test; the kernels were "
                              "not tuned on it)", "data": "CIFAR-10 test images of its split"})
        keys.append("airbench")
    elif "airbench" in wanted:
        log("airbench: needs ../shared/data/cifar10.npz — skipping")
    return [n for n, key in zip(out, keys) if key in wanted]


@torch.no_grad()
def settle_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BN running statistics of a fresh network set on ``x`` (so that its activations, and spikes, are sane)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    for xb in x.split(128):
        model(xb)
    return model.eval()




# ----------------------------------------------------------------------------------------- runners
def bsnn_runner(snn, x: torch.Tensor, T: int, **sim):
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=len(x))
    cfg = SimConfig(timesteps=[T], **sim)
    return lambda: simulate(snn, loader, [T], cfg, quiet=True)


def sj_network(model, calib: torch.Tensor):
    from spikingjelly.activation_based import ann2snn

    loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=128)
    net = ann2snn.Converter(ann2snn.RateCodingRecipe(loader, mode="99.9%")).convert(materialize(model).eval())
    return net.eval()


def sj_runner(net, x: torch.Tensor, T: int, step_mode: str):
    from spikingjelly.activation_based import functional

    @torch.no_grad()
    def run():
        functional.set_step_mode(net, step_mode)  # the network is shared by the multi- and single-step runners
        functional.reset_net(net)
        if step_mode == "m":
            out = net(x.unsqueeze(0).expand(T, *x.shape)).sum(0)
        else:
            out = net(x)
            for _ in range(T - 1):
                out = out + net(x)
        functional.reset_net(net)
        return out.argmax(1)
    return run


def ann_runner(ann, x: torch.Tensor, T: int = 1):
    """T forward passes of the plain ANN on the batch: the dense limit of a T-step simulation."""
    @torch.no_grad()
    def run():
        for _ in range(T):
            out = ann(x)
        return out
    return run


# ----------------------------------------------------------------------------------------- main
def build_markdown(payload: dict) -> str:
    lines = [f"# Simulation speed: bsnn vs spikingjelly {payload['machine'].get('spikingjelly')}", "",
             f"Machine: {machine_markdown(payload['machine'])}", "",
             f"Command: `{payload['command']}` ({payload['started']}); batch {payload['batch']}, direct encoding, "
             f"median of {payload['reps']} interleaved rounds (bsnn, bsnn fp32, bsnn bf16, bsnn bitpack, sj multi-step, "
             "sj single-step in turn) after a warm-up run. Throughput in sample·timesteps/s; "
             "ratio = bsnn / spikingjelly (fastest of its multi- and single-step modes); dense = T x one fp32 "
             "forward of the plain ANN (lower ratio = faster than the dense limit). Peak = resident-memory growth "
             "during one simulation (MiB). bitpack / bf16 = throughput ratio of the two synapse modes the automatic "
             "choice (`synapse='auto'`: both timed on the first batch, the faster kept) picks from "
             f"(bitpack C++ paths on this CPU: {payload.get('bitpack_paths') or 'unavailable'}). "
             + ("Freed memory kept mapped for reuse (glibc malloc thresholds, `bsnn.snn.heap`) for every runner, "
                "as bsnn's simulate sets it." if payload.get("malloc_retained") else
                "glibc's malloc defaults (freed buffers returned to the OS)."),
             ""]
    for net in payload["networks"]:
        lines += [f"## {net['name']}", "", f"Model: {net['source']}; input: {net['data']}. bsnn exact bf16 "
                  f"layers: {', '.join(net['exact_layers']) or 'none'}; spikingjelly's faster mode per T is "
                  "marked.", ""]
        rows = []
        for r in net["rows"]:
            sj_best = max(r["sj_m_tput"], r["sj_s_tput"])
            rows.append([r["T"], f"{r['bsnn_tput']:,.0f}", f"{r['bsnn_fp32_tput']:,.0f}",
                         f"{r['bsnn_bf16_tput']:,.0f}", f"{r['bsnn_bitpack_tput']:,.0f}",
                         f"{r['bsnn_bitpack_tput'] / r['bsnn_bf16_tput']:.2f}",
                         f"{r['sj_m_tput']:,.0f}" + (" *" if r["sj_m_tput"] >= r["sj_s_tput"] else ""),
                         f"{r['sj_s_tput']:,.0f}" + (" *" if r["sj_s_tput"] > r["sj_m_tput"] else ""),
                         f"{r['bsnn_tput'] / sj_best:.2f}x", f"{r['bsnn_s'] / r['dense_s']:.2f}",
                         f"{r['dense_s']:.3f}", r["bsnn_peak_mib"], r["sj_m_peak_mib"], r.get("synapse", "")])
        lines += [markdown_table(["T", "bsnn", "bsnn fp32 (eager)", "bsnn bf16", "bsnn bitpack", "bitpack / bf16",
                                  "sj multi-step", "sj single-step",
                                  "bsnn / sj", "bsnn / dense", "dense s", "bsnn peak MiB", "sj-m peak MiB",
                                  "bsnn's synapse mode (auto)"], rows),
                  ""]
        if net.get("layers"):
            lines += ["Binary layers one by one (input of the first timestep, process CPU time on one thread, min of "
                      "the rounds): "
                      "bf16 vs bitpack synapse mode; quantum < 1 = average-pooled input, computed by bitpack as "
                      "bit planes of the counts. Alone, a bf16 layer also checks its sums and adds its bias in "
                      "separate passes, which in a simulation the consuming C++ IF kernel does while reading them: "
                      "whole simulations (above) decide, not this table.", "",
                      markdown_table(["layer", "input", "quantum", "bf16 ms", "bitpack ms", "bitpack speed-up"],
                                     [[r["layer"], "x".join(map(str, r["input"])), f"{r['quantum']:g}",
                                       f"{r['bf16_ms']:.2f}", f"{r['bitpack_ms']:.2f}",
                                       f"{r['bitpack_speedup']:.2f}x"] for r in net["layers"]]), ""]
        if net.get("profile_T32"):
            lines += ["Where bsnn's time goes (torch.profiler, one T = 32 simulation, share of CPU time): "
                      + ", ".join(f"{k} {v:.0f} %" for k, v in net["profile_T32"].items()) + ".", ""]
    if payload.get("integer"):
        lines += ["## Integer-exact mode", "",
                  "The same VGG simulated with `synapse='int'` (int8 counts x ±1 int8 weights, int32 accumulation "
                  "through `torch._int_mm`, convolutions via im2col) — the crossbar's arithmetic —, with the "
                  "exact bf16 mode and with the bit-packed popcount mode; spikes and output membranes are "
                  "bit-identical (checked here and in the tests).",
                  "", markdown_table(["T", "int s", "bf16 s", "bitpack s", "float s", "outputs identical"],
                                     [[r["T"], f"{r['int_s']:.3f}", f"{r['bf16_s']:.3f}", f"{r['bitpack_s']:.3f}",
                                       f"{r['float_s']:.3f}", r["identical"]] for r in payload["integer"]]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timesteps", default="8,32,128")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--networks", default="small_cnn,vgg7,resnet20", help="comma-separated among small_cnn, vgg7, "
                   "resnet20, airbench")
    p.add_argument("--cifar-npz", default="../shared/data/cifar10.npz")
    p.add_argument("--cache", default="benchmarks/cache")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--malloc-defaults", action="store_true", help="leave glibc's malloc at its defaults (bsnn with "
                   "SimConfig(retain_memory=False)): the A/B of bsnn.snn.heap, in a process of its own")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # what bsnn's simulate sets anyway; here before any runner, for all of them
    retained = False if args.malloc_defaults else retain_freed_memory()
    sim = {"retain_memory": not args.malloc_defaults}
    ts = [4, 8] if args.quick else [int(t) for t in args.timesteps.split(",")]
    reps = 1 if args.quick else args.reps
    payload = {"command": command_line(), "machine": machine_info(), "started": now_iso(), "batch": args.batch,
               "reps": reps, "networks": [], "malloc_retained": retained, "bitpack_paths": list(bitpack.extension_paths() or [])}
    for net in networks(args):
        log(f"{net['name']}: converting ({net['source']})")
        calib = DataLoader(TensorDataset(net["calib"], torch.zeros(len(net["calib"]), dtype=torch.long)),
                           batch_size=128)
        snn = convert(net["model"], calib, ConvertConfig(threshold=Percentile(99.9), calib_samples=512))
        sj = sj_network(net["model"], net["calib"])
        ann = materialize(net["model"]).eval()
        x = net["x"]
        entry = {k: net[k] for k in ("name", "source", "data")}
        entry.update(rows=[])
        for T in ts:
            n = len(x) * T
            tm = timed_interleaved({"bsnn": bsnn_runner(snn, x, T, **sim),
                                    "fp32": bsnn_runner(snn, x, T, kernel="torch", synapse="float", **sim),
                                    "bf16": bsnn_runner(snn, x, T, synapse="bf16", **sim),
                                    "bitpack": bsnn_runner(snn, x, T, synapse="bitpack", **sim),
                                    "sj_m": sj_runner(sj, x, T, "m"), "sj_s": sj_runner(sj, x, T, "s"),
                                    "dense": ann_runner(ann, x, T)}, reps)
            (b_s, b_all, b_peak), (f_s, _, _) = tm["bsnn"], tm["fp32"]
            bf_s, bp_s = tm["bf16"][0], tm["bitpack"][0]
            (m_s, _, m_peak), (s_s, _, _) = tm["sj_m"], tm["sj_s"]
            dense_T = tm["dense"][0]
            res = bsnn_runner(snn, x, T, **sim)()
            entry["exact_layers"] = res.config.get("exact_layers", [])
            row = {"T": T, "bsnn_s": b_s, "bsnn_all_s": b_all, "bsnn_fp32_s": f_s, "sj_m_s": m_s, "sj_s_s": s_s,
                   "dense_s": dense_T, "bsnn_tput": n / b_s, "bsnn_fp32_tput": n / f_s, "sj_m_tput": n / m_s,
                   "bsnn_bf16_s": bf_s, "bsnn_bitpack_s": bp_s, "bsnn_bf16_tput": n / bf_s,
                   "bsnn_bitpack_tput": n / bp_s,
                   "sj_s_tput": n / s_s, "bsnn_peak_mib": b_peak, "sj_m_peak_mib": m_peak,
                   "kernel": res.config.get("kernel"), "synapse": res.config.get("synapse_resolved")}
            log(f"  T={T}: bsnn {b_s:.3f} s (fp32 eager {f_s:.3f}, bf16 {bf_s:.3f}, bitpack {bp_s:.3f}), "
                f"sj multi {m_s:.3f} single {s_s:.3f}, "
                f"dense {dense_T:.3f} s -> x{min(m_s, s_s) / b_s:.2f} vs sj, {b_s / dense_T:.2f} of dense")
            entry["rows"].append(row)
        payload["networks"].append(entry)
        if args.malloc_defaults:  # the A/B needs the timings only (the extras would run with the memory retained)
            payload["malloc_tuned_meanwhile"] = retain_freed_memory.cache_info().currsize > 0  # must stay False
            write_results(ROOT / args.out, NAME, payload, build_markdown(payload))
            continue
        entry["profile_T32"] = profile_shares(snn, x, 8 if args.quick else 32)
        entry["layers"] = layer_speeds(snn, x, reps) if bitpack.extension_paths() else []
        if "VGG" in net["name"]:
            payload["integer"] = integer_check(snn, x, ts[:2], reps)
        payload["machine"]["load_average_at_end"] = load_average()
        write_results(ROOT / args.out, NAME + ("_quick" if args.quick else ""), payload, build_markdown(payload))
    log(f"wrote {ROOT / args.out / NAME}.md")


def profile_shares(snn, x: torch.Tensor, T: int = 32) -> dict[str, float]:
    """Share (%) of bsnn's CPU time per kind of operation in one default simulation (torch.profiler)."""
    from torch.profiler import profile

    run = bsnn_runner(snn, x, T)
    run()
    with profile() as prof:
        run()
    groups: dict[str, float] = {}
    for e in prof.key_averages():
        n = e.key
        g = ("bit-packed popcount layers" if "bsnn_bitpack" in n else
             "convolutions (bf16 exact / fp32)" if "convolution" in n else
             "IF kernel (C++, one pass per time chunk; 2x2 average pooling fused)" if "bsnn_if" in n else
             "IF kernel (fused, compiled)" if "CompiledFxGraph" in n else "pooling" if "pool" in n else
             "bf16 exactness check" if "aminmax" in n else "linear layers" if n in ("aten::mm", "aten::addmm")
             else "other (dispatch, bookkeeping, copies)")
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total
    total = sum(groups.values()) or 1.0
    return {k: round(100.0 * v / total, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def layer_speeds(snn, x: torch.Tensor, reps: int) -> list[dict]:
    """Each eligible binary layer in the ``bf16`` and the ``bitpack`` synapse modes, on the input it receives at the
    first timestep of a simulation of ``x``: process CPU time on one thread (robust to other processes' load, and
    no idle threads spinning), min of the rounds."""
    from bsnn.simulate import run_batch
    from bsnn.snn.synapse import SYNAPSE_MODES, BinarySynapse, synapse_mode

    inputs: dict[str, torch.Tensor] = {}
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with synapse_mode(snn, "bitpack") as layers:
        syns = {n: m for n, m in snn.graph_module.named_modules() if isinstance(m, BinarySynapse)}
        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, a[0].detach().clone()))
                 for n, m in syns.items()]
        run_batch(snn, x, 1, 1)
        for h in hooks:
            h.remove()
        for name, syn in syns.items():
            xin, row = inputs[name], {"layer": name, "input": list(inputs[name].shape), "quantum": layers[name]}
            for mode in ("bf16", "bitpack"):
                fn = SYNAPSE_MODES.get(mode)
                fn(syn, xin)
                ts = []
                for _ in range(max(5, reps)):
                    t0 = time.process_time()
                    fn(syn, xin)
                    ts.append(time.process_time() - t0)
                row[f"{mode}_ms"] = 1e3 * min(ts)
            row["bitpack_speedup"] = row["bf16_ms"] / max(row["bitpack_ms"], 1e-9)
            log(f"  layer {name} {row['input']} q={row['quantum']:g}: bf16 {row['bf16_ms']:.2f} ms, "
                f"bitpack {row['bitpack_ms']:.2f} ms (x{row['bitpack_speedup']:.2f})")
            rows.append(row)
    torch.set_num_threads(threads)
    return rows


def integer_check(snn, x: torch.Tensor, ts: list[int], reps: int) -> list[dict]:
    """Time the integer, bf16, bitpack and float synapse modes and check they give identical outputs."""
    from bsnn.simulate import run_batch
    from bsnn.snn.synapse import synapse_mode

    rows = []
    for T in ts:
        r = {"T": T}
        outs = {}
        for mode in ("int", "bf16", "bitpack", "float"):
            with synapse_mode(snn, mode):
                r[f"{mode}_s"] = timed(lambda: run_batch(snn, x, T, 1), reps)[0]
                outs[mode] = run_batch(snn, x, T, 1)
        r["identical"] = all(torch.equal(outs["float"], outs[m]) for m in ("int", "bf16", "bitpack"))
        log(f"  integer mode T={T}: int {r['int_s']:.3f} s, bf16 {r['bf16_s']:.3f} s, bitpack {r['bitpack_s']:.3f} s, "
            f"float {r['float_s']:.3f} s, "
            f"identical {r['identical']}")
        rows.append(r)
    return rows


if __name__ == "__main__":
    main()
