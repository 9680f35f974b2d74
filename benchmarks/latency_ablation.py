"""Benchmark: latency-reduction techniques, each alone and combined, next to spikingjelly 2.0's best recipes.

For each dataset (mnist5k: the default pipeline's binary student; CIFAR-10: the binary VGG-7 of the conversion
benchmark's cache) every conversion-time technique is applied alone on top of plain layer-wise max-norm
conversion (membrane starting at 0), then in combinations, and the design-time techniques (QCFS- and
trainable-clip-trained ANNs) are converted with their learned clips. Every SNN is simulated on the same test
images; reported: accuracy (%) vs T, the ANN's accuracy on those images, and **T@1** — the smallest T of the grid
(powers of two) at which the SNN is within 1 point of its own ANN. spikingjelly 2.0's
``RateCodingRecipe(mode='99.9%', channel_wise=True, half_threshold=True)`` and ``LocalThresholdBalancingRecipe``
convert the same (materialised) ANN in the same run. Run-time: per-sample early exit (:mod:`bsnn.early_exit`)
on the default combination — accuracy vs *average* timesteps next to the fixed-T run.

Design-time models: mnist5k — a binary small CNN with QCFS (L = 8) or trainable-clip activations distilled from
the default teacher with the default student recipe; CIFAR-10 — the cached CE model fine-tuned for
``--finetune-epochs`` with QCFS / clip activations (λ initialised at each ReLU's 99.9th percentile), and, as the
control, the same fine-tuning with plain ReLUs. Models are cached in ``benchmarks/cache``.

Usage::

    python benchmarks/latency_ablation.py                       # mnist5k + CIFAR-10
    python benchmarks/latency_ablation.py --datasets mnist5k    # one dataset
    python benchmarks/latency_ablation.py --quick               # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, load_average, log, machine_info, machine_markdown,  # noqa: E402
                     markdown_table, now_iso, relu_model, write_results)

from bsnn.binary import materialize  # noqa: E402
from bsnn.config import BinaryConfig, ConvertConfig, DataConfig, SimConfig, TrainConfig, load_config  # noqa: E402
from bsnn.convert import Max, Percentile, convert  # noqa: E402
from bsnn.data import build_loaders, calibration_loader  # noqa: E402
from bsnn.early_exit import early_exit_curve, fixed_T_needed  # noqa: E402
from bsnn.pipeline import build_model, load_model, save_model  # noqa: E402
from bsnn.simulate import simulate  # noqa: E402
from bsnn.train import evaluate, set_seed, train_student, train_teacher  # noqa: E402

NAME = "latency_ablation"
GRID = [1, 2, 4, 8, 16, 32, 64]
EXTRA = [128, 256]
SEARCH = [99.0, 99.5, 99.9, 99.99, 100.0]


def plain(**kw) -> ConvertConfig:
    """Plain max-norm conversion (layer-wise, v0 = 0, no correction) with ``kw`` changed."""
    return dataclasses.replace(ConvertConfig(threshold=Max(), v_init=0.0, calib_samples=2048), **kw)


def conversion_methods(target_T: int) -> dict[str, ConvertConfig]:
    """Each conversion-time technique alone on top of plain max-norm, then combinations."""
    cal = {"snn_calibration_timesteps": target_T, "snn_calibration_samples": 256}
    search = {"search_percentiles": SEARCH, "search_timesteps": target_T, "search_samples": 512}
    return {
        "plain max-norm": plain(),
        "percentile 99.9": plain(threshold=Percentile(99.9)),
        "per-channel thresholds": plain(per_channel=True),
        "shift θ/2": plain(v_init=0.5),
        "threshold scale 0.9": plain(threshold_scale=0.9),
        f"percentile search @T={target_T}": plain(**search),
        f"bias calibration @T={target_T}": plain(snn_calibration="bias", **cal),
        f"potential calibration @T={target_T}": plain(snn_calibration="potential", **cal),
        "default (p99.9 + shift + bias cal.)": dataclasses.replace(
            load_config(ROOT / "configs" / "default.yaml").convert, calib_samples=2048),
        "search + shift + bias cal.": plain(v_init=0.5, snn_calibration="bias", **search, **cal),
        "search + shift + per-channel + bias cal.": plain(v_init=0.5, per_channel=True, snn_calibration="bias",
                                                          **search, **cal),
    }


# ----------------------------------------------------------------------------------------- models
def relu_percentiles(model: nn.Module, x: torch.Tensor, q: float = 0.999) -> dict[str, float]:
    """The ``q`` quantile of every ReLU module's output over ``x`` (initial λ of QCFS / clip fine-tuning)."""
    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, n=name: out.__setitem__(n, float(torch.quantile(o.flatten()[:2**24].float(), q)))))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def with_activation(model: nn.Module, arch: dict, kind: str, x_calib: torch.Tensor, levels: int = 8):
    """A copy of ``model`` with its ReLUs replaced by ``kind`` (λ initialised per layer at the p99.9)."""
    clips = relu_percentiles(model, x_calib)
    new_arch = {**arch, "activation": {"kind": kind, "clip": 1.0, "levels": levels}}
    new = build_model(new_arch)
    new.load_state_dict(model.state_dict(), strict=False)
    for name, m in new.named_modules():
        if name in clips and hasattr(m, "clip"):
            m.clip.data.fill_(max(clips[name], 1e-3))
    return new, new_arch


def design_time_models(name: str, ctx: dict, args) -> dict[str, tuple[nn.Module, str]]:
    """``{label: (model, how it was obtained)}`` of the QCFS / clip (and control) ANNs, trained or cached."""
    cache = ROOT / args.cache
    out = {}
    x_cal = next(iter(ctx["calib"]))[0]
    levels = [int(v) for v in str(args.qcfs_levels).split(",")]
    kinds = [("qcfs", L) for L in levels] + [("clip", 8)] + ([("relu", 8)] if name == "cifar10" else [])
    for kind, L in kinds:
        label = {"qcfs": f"QCFS L={L} ANN", "clip": "trainable-clip ANN", "relu": "ReLU ANN, same fine-tuning"}[kind]
        tag = f"_L{L}" if kind == "qcfs" and L != 8 else ""
        path = cache / f"latency_{name}_{kind}{tag}{'_quick' if args.quick else ''}.pt"
        if path.is_file():
            model, rec = load_model(path)
            out[label] = (model.eval(), rec.get("how", "cached"))
            continue
        set_seed(0)
        if name == "mnist5k":
            cfg = load_config(ROOT / "configs" / "default.yaml")
            arch = {**ctx["arch"], "activation": {"kind": kind, "clip": 4.0, "levels": L}}
            model = build_model(arch)
            epochs = 1 if args.quick else cfg.student.epochs
            how = (f"binary small CNN with {kind} activations (L={L}) distilled from the default teacher by the default "
                   f"student recipe (KD, {epochs} epochs)")
            log(f"{name}: training {label}")
            train_student(model, ctx["teacher"], ctx["train"], cfg.distill,
                          dataclasses.replace(cfg.student, epochs=epochs), quiet=True)
        else:
            model, arch = with_activation(ctx["model"], ctx["arch"], kind, x_cal, levels=L)
            epochs = 1 if args.quick else args.finetune_epochs
            how = (f"the cached CE model fine-tuned {epochs} epoch(s) on {len(ctx['train'].dataset)} images with "
                   f"{kind} activations{f' (L={L})' if kind == 'qcfs' else ''} (λ from each ReLU's p99.9), Adam lr "
                   "5e-4 cosine")
            log(f"{name}: fine-tuning {label}")
            train_teacher(model, ctx["train"], TrainConfig(epochs=epochs, optimizer="adam", lr=5e-4, weight_decay=0.0,
                                                           schedule="cosine"), quiet=True)
        save_model(path, model.eval(), arch, {"how": how, "trained_at": now_iso()})
        out[label] = (model.eval(), how)
    return out


def prepare(name: str, args) -> dict | None:
    if name == "mnist5k":
        cfg = load_config(ROOT / "configs" / "default.yaml")
        loaders = build_loaders(cfg.data, seed=cfg.run.seed)
        s = loaders.splits
        path = relu_model(ROOT / "runs/default/student.pt", ROOT / args.cache / "mnist5k_default_student.pt")
        tpath = next((p for p in (ROOT / "runs/default/teacher.pt", ROOT / args.cache / "distill_mnist5k_teacher_e8.pt")
                      if p.is_file()), None)
        if path is None or tpath is None:
            log("mnist5k: no trained default student/teacher; run `make demo` (or bsnn run) first — skipping")
            return None
        model, rec = load_model(path)
        teacher, _ = load_model(tpath)
        arch = {k: rec["arch"][k] for k in rec["arch"]} if "arch" in rec else None
        n_test = 200 if args.quick else len(s.test)
        return {"model": model.eval(), "arch": arch or {"name": "small_cnn", "num_classes": 10, "in_channels": 1,
                                                        "kwargs": {}, "binary": dataclasses.asdict(BinaryConfig())},
                "teacher": teacher.eval(), "train": loaders.train, "source": str(path.relative_to(ROOT)),
                "calib": calibration_loader(s, cfg.data, 2048),
                "test": DataLoader(Subset(s.test, range(n_test)), batch_size=128),
                "test_desc": f"first {n_test} of the {len(s.test)} mnist5k test images", "target_T": 4}
    npz = Path(args.cifar_npz)
    npz = npz if npz.is_absolute() else ROOT / npz
    path = ROOT / args.cache / "cifar10_vgg7_w0.25_h256_e5_n20000_b128_lr0.002.pt"
    if not npz.is_file() or not path.is_file():
        log(f"cifar10: needs {npz} and {path.relative_to(ROOT)} (python benchmarks/conversion_vs_spikingjelly.py "
            "--datasets cifar10 trains it) — skipping")
        return None
    dcfg = DataConfig(name=f"npz:{npz}", batch_size=128, eval_batch_size=500, val_fraction=0.0, augment=True,
                      limit_train=2000 if args.quick else args.finetune_train, seed=0)
    s = build_loaders(dcfg, seed=0).splits
    loaders = build_loaders(dcfg, seed=0)
    model, rec = load_model(path)
    n_test = 200 if args.quick else args.cifar_test
    return {"model": model.eval(), "arch": rec["arch"], "teacher": None, "train": loaders.train,
            "source": str(path.relative_to(ROOT)), "calib": calibration_loader(s, dcfg, 2048),
            "test": DataLoader(Subset(s.test, range(n_test)), batch_size=128),
            "test_desc": f"first {n_test} of the 10000 CIFAR-10 test images", "target_T": 16}


# ----------------------------------------------------------------------------------------- measuring
def t_at_1(acc: dict[int, float], ann: float) -> int | None:
    return next((t for t in sorted(acc) if acc[t] >= ann - 1.0), None)


def sim_curve(snn, test, ann_acc: float, quick: bool, record: bool = False) -> tuple[dict[int, float], object]:
    """Accuracy on the grid; extended to 128/256 only when T@1 is not reached by 64."""
    grid = [1, 4, 16] if quick else GRID
    res = simulate(snn, test, grid, SimConfig(timesteps=grid, record_predictions=record), quiet=True)
    acc = dict(res.accuracy)
    if t_at_1(acc, ann_acc) is None and not quick:
        more = simulate(snn, test, EXTRA, SimConfig(timesteps=EXTRA), quiet=True)
        acc.update(more.accuracy)
    return acc, res


def run_sj(model, calib, test, recipe: str, ts: list[int]) -> dict[int, float]:
    from spikingjelly.activation_based import ann2snn
    from conversion_vs_spikingjelly import sj_simulate

    ann = materialize(model).eval()
    rec = (ann2snn.RateCodingRecipe(calib, mode="99.9%", channel_wise=True, half_threshold=True)
           if recipe == "rate" else ann2snn.LocalThresholdBalancingRecipe(calib))
    net = ann2snn.Converter(rec).convert(ann).eval()
    correct, n = sj_simulate(net, test, ts, "s", 1)
    return {t: 100.0 * c / n for t, c in correct.items()}


def run_dataset(name: str, args, payload: dict, save) -> None:
    ctx = prepare(name, args)
    if ctx is None:
        return
    d = payload["datasets"].setdefault(name, {"rows": {}})
    d.update(source=ctx["source"], test=ctx["test_desc"], target_T=ctx["target_T"])
    ann_acc = evaluate(ctx["model"], ctx["test"])["accuracy"]
    d["ann_accuracy"] = ann_acc
    log(f"{name}: ANN {ann_acc:.2f} % on {d['test']}")

    def record(label: str, acc: dict, ann: float, kind: str, note: str = "", seconds: float = 0.0) -> None:
        d["rows"][label] = {"accuracy": {str(k): v for k, v in sorted(acc.items())}, "ann": ann,
                            "t_at_1": t_at_1(acc, ann), "kind": kind, "note": note, "seconds": round(seconds, 1)}
        log(f"  {label}: T@1 = {d['rows'][label]['t_at_1']} "
            + " ".join(f"{k}:{v:.1f}" for k, v in sorted(acc.items())))
        save()

    default_label = None
    for label, cfg in conversion_methods(ctx["target_T"]).items():
        if label in d["rows"]:
            continue
        with Timer() as t:
            snn = convert(ctx["model"], ctx["calib"], cfg)
            is_default = label.startswith("default")
            acc, res = sim_curve(snn, ctx["test"], ann_acc, args.quick, record=is_default)
        record(label, acc, ann_acc, "conversion", seconds=t.s)
        if is_default:
            default_label = label
            d["early_exit"] = early_exit_rows(res)
            save()
    sj_ts = sorted(set((GRID if not args.quick else [1, 4, 16]) + ([] if args.quick else EXTRA)))
    for recipe, label in (("rate", "spikingjelly RateCoding 99.9% channel-wise + half threshold"),
                          ("ltb", "spikingjelly LocalThresholdBalancing")):
        if label not in d["rows"]:
            with Timer() as t:
                acc = run_sj(ctx["model"], ctx["calib"], ctx["test"], recipe, sj_ts)
            record(label, acc, ann_acc, "spikingjelly", seconds=t.s)
    for label, (model, how) in design_time_models(name, ctx, args).items():
        own = evaluate(model, ctx["test"])["accuracy"]
        for suffix, cfg in (("", ConvertConfig(calib_samples=2048, threshold=Max())),
                            (" + bias cal.", ConvertConfig(calib_samples=2048, threshold=Max(), v_init=0.5,
                                                           snn_calibration="bias",
                                                           snn_calibration_timesteps=ctx["target_T"]))):
            full = label + suffix
            if full in d["rows"]:
                continue
            with Timer() as t:
                snn = convert(model, ctx["calib"], cfg)
                acc, _ = sim_curve(snn, ctx["test"], own, args.quick)
            record(full, acc, own, "design-time", note=how, seconds=t.s)
    if default_label is None and "early_exit" not in d:
        log("  (early exit skipped: the default row was cached from an earlier run)")
    save()


def early_exit_only(name: str, args, payload: dict, save) -> None:
    """Re-run the default combination with recorded predictions and refresh its early-exit table."""
    ctx = prepare(name, args)
    if ctx is None:
        return
    label, cfg = next((k, v) for k, v in conversion_methods(ctx["target_T"]).items() if k.startswith("default"))
    snn = convert(ctx["model"], ctx["calib"], cfg)
    grid = [1, 4, 16] if args.quick else GRID
    res = simulate(snn, ctx["test"], grid, SimConfig(timesteps=grid, record_predictions=True), quiet=True)
    d = payload["datasets"].setdefault(name, {"rows": {}})
    d["early_exit"] = early_exit_rows(res)
    log(f"{name}: early exit of '{label}': " + ", ".join(f"{r['accuracy']:.1f} % @ {r['mean_timesteps']:.2f}"
                                                         for r in d["early_exit"]))
    save()


def early_exit_rows(res) -> list[dict]:
    """Pareto-optimal early-exit rules (patience x margin grid) with the fixed T reaching the same accuracy."""
    rows = []
    for r in early_exit_curve(res):
        fixed = fixed_T_needed(res, r["accuracy"])
        rows.append({**r, "fixed_T_for_same_accuracy": fixed})
    return rows


# ----------------------------------------------------------------------------------------- report
def plot(payload: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, d in payload["datasets"].items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for label, r in d["rows"].items():
            ts = [int(t) for t in r["accuracy"]]
            style = "--" if r["kind"] == "spikingjelly" else (":" if r["kind"] == "design-time" else "-")
            axes[0].plot(ts, list(r["accuracy"].values()), style, marker="o", ms=3, label=label)
        axes[0].axhline(d["ann_accuracy"], color="k", lw=0.8, label="ANN")
        axes[0].set(xscale="log", xlabel="timesteps T", ylabel="accuracy (%)", title=f"{name}: accuracy vs T")
        axes[0].legend(fontsize=6)
        ee = d.get("early_exit") or []
        if ee:
            dflt = next(r for label, r in d["rows"].items() if label.startswith("default"))
            ts = [int(t) for t in dflt["accuracy"]]
            axes[1].plot(ts, list(dflt["accuracy"].values()), "-o", label="fixed T (default combination)")
            axes[1].plot([r["mean_timesteps"] for r in ee], [r["accuracy"] for r in ee], "-s",
                         label="early exit (average T)")
            axes[1].set(xscale="log", xlabel="timesteps (average for early exit)", ylabel="accuracy (%)",
                        title="run-time early exit")
            axes[1].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{NAME}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def build_markdown(payload: dict) -> str:
    lines = [f"# Latency reduction ablation (spikingjelly {payload['machine'].get('spikingjelly')} alongside)", "",
             f"Machine: {machine_markdown(payload['machine'])}", "",
             f"Command: `{payload['command']}` ({payload['started']}).", "",
             "T@1 = smallest T of the grid (1, 2, 4, ..., 64, then 128, 256 where needed) with SNN accuracy ≥ its "
             "own ANN's − 1 point, on the same test images. Every conversion-time row is ONE technique added to "
             "plain layer-wise max-norm (v0 = 0) unless it says +; design-time rows are differently trained ANNs "
             "(their own ANN accuracy is the reference). '—' = not reached by 256.", ""]
    for name, d in payload["datasets"].items():
        rows_ = d["rows"]
        plain_t = (rows_.get("plain max-norm") or {}).get("t_at_1")
        lines += [f"## {name}", "", f"ANN: {d['source']}, {d['ann_accuracy']:.2f} % on the {d['test']}; "
                  f"calibration/search target T = {d['target_T']}.", ""]
        ts = sorted({int(t) for r in rows_.values() for t in r["accuracy"]})
        table = []
        for label, r in rows_.items():
            acc = r["accuracy"]
            t1 = r["t_at_1"]
            gain = (f"{plain_t / t1:.1f}x" if plain_t and t1 else ("> " + f"{256 / t1:.0f}x" if t1 else ""))
            table.append([label, f"{r['ann']:.2f}", t1 if t1 else "—", gain]
                         + [f"{acc[str(t)]:.1f}" if str(t) in acc else "" for t in ts])
        lines += [markdown_table(["method", "ANN %", "T@1", "vs plain"] + [f"T={t}" for t in ts], table), ""]
        notes = {r["note"] for r in rows_.values() if r["note"]}
        if notes:
            lines += ["Design-time models: " + "; ".join(sorted(notes)) + ".", ""]
        ee = d.get("early_exit")
        if ee:
            lines += ["Early exit on the default combination (rule: stop when the prediction has been stable for "
                      "`patience` steps and the time-averaged top-1 − top-2 logit margin is ≥ `margin`; the "
                      "Pareto-optimal rules of the grid; simulated to T = 64; the fixed-T column uses every T "
                      "from 1 to 64):", "",
                      markdown_table(["patience", "margin", "accuracy %", "average T",
                                      "fixed T needed for that accuracy"],
                                     [[r["patience"], r.get("margin", 0.0), f"{r['accuracy']:.2f}",
                                       f"{r['mean_timesteps']:.2f}", r["fixed_T_for_same_accuracy"] or "not reached"]
                                      for r in ee]), ""]
        if payload.get("plots"):
            png = f"{NAME}_{name}.png"
            if png in payload["plots"]:
                lines += [f"![{name}]({png})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mnist5k,cifar10")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fresh", action="store_true", help="recompute rows found in the results file")
    p.add_argument("--early-exit-only", action="store_true",
                   help="only (re)compute the early-exit analysis of the default combination")
    p.add_argument("--cifar-npz", default="../shared/data/cifar10.npz")
    p.add_argument("--cifar-test", type=int, default=1000)
    p.add_argument("--finetune-train", type=int, default=10000)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--qcfs-levels", default="8", help="comma-separated QCFS levels L of the design-time models")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="benchmarks/cache")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = ROOT / args.out
    stem = NAME + ("_quick" if args.quick else "")
    import json

    old = out / f"{stem}.json"
    payload = json.loads(old.read_text()) if old.is_file() and not args.fresh else {}
    payload.update(command=command_line(), machine=machine_info(), started=payload.get("started", now_iso()))
    payload.setdefault("datasets", {})

    def save() -> None:
        payload["machine"]["load_average_at_end"] = load_average()
        payload["plots"] = plot(payload, out)
        write_results(out, stem, payload, build_markdown(payload))

    for name in args.datasets.split(","):
        if args.early_exit_only:
            early_exit_only(name, args, payload, save)
        else:
            run_dataset(name, args, payload, save)
    log(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
