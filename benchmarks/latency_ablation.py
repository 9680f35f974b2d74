"""Benchmark: latency reduction on the CIFAR-10 zoo networks, each technique alone and combined, next to
spikingjelly 2.0's post-training recipes converting the same ANN in the same run.

Networks (``bsnn/zoo``; data: CIFAR-10, the JPEG copy ``../shared/data/cifar10.npz``):

* ``cifar10_vgg_binary`` — bsnn's ReLU binary student (plain_vgg8 w64, KD from the zoo teacher by ``bsnn run``);
* ``cifar10_plain_bvgg`` — a binary VGG trained with plain ReLU by a plain PyTorch loop, outside bsnn's recipes;
* ``cifar10_vgg_qcfs`` — the design-time network: the QCFS (L = 4) binary student (when released);
* ``cifar10_airbench_binary`` / ``cifar10_airbench_qcfs`` — the ReLU / QCFS binary airbench_snn students of
  ``configs/cifar10.yaml`` (KD from the airbench94 teacher);
* ``cifar10_airbench_binary_v2`` / ``cifar10_airbench_qcfs_v2`` — the same students distilled from the v2 teacher
  (the authors' airbench94 recipe), the zoo's most accurate binary networks.

Every row is simulated on the first ``--n-val`` validation and ``--n-test`` test images of the network's own
splits. Choices are made on validation only: the *best combination* is the candidate with the smallest validation
T@1 (ties: higher mean validation accuracy over T ≤ 8), and the early-exit rule is chosen on validation
(:func:`bsnn.early_exit.validated_early_exit`) and reported on test. T@1 / T@0.3 = the smallest T of the grid with
test accuracy ≥ the ANN's (same images) − 1 / − 0.3 points. Calibration time = the wall time of the conversion
(threshold statistics, searches and SNN-calibration corrections), not of the simulation.

Results are cached per (network, row) in the JSON, so a re-run only adds rows that are missing (``--fresh``
recomputes). Usage::

    python benchmarks/latency_ablation.py --threads 1                      # every network, every row
    python benchmarks/latency_ablation.py --networks cifar10_plain_bvgg    # one network
    python benchmarks/latency_ablation.py --quick                          # smoke run (few images, T <= 16)
    python benchmarks/latency_ablation.py --rows "late MSE" --long-rows "late MSE"  # some rows, also to T = 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, load_average, log, machine_info, machine_markdown,  # noqa: E402
                     markdown_table, now_iso, write_results)
from _zoo import available, first, load_network  # noqa: E402

import bsnn  # noqa: E402
from bsnn.binary import materialize  # noqa: E402
from bsnn.config import SimConfig  # noqa: E402
from bsnn.convert import MSE, ConvertConfig, Max, Percentile  # noqa: E402
from bsnn.early_exit import validated_early_exit  # noqa: E402
from bsnn.hardware.mapping import resolve_layers  # noqa: E402

NAME = "latency_ablation"
GRID = [1, 2, 4, 8, 16, 32, 64]
LONG = GRID + [128, 256]  # rows whose convergence is checked to T = 256
NETWORKS = ["cifar10_airbench_binary_v2", "cifar10_airbench_qcfs_v2", "cifar10_plain_bvgg", "cifar10_vgg_binary",
            "cifar10_vgg_qcfs", "cifar10_airbench_binary", "cifar10_airbench_qcfs"]
PUBLISHED = [  # (method, network, ANN %, SNN % at T, source) — ../shared/REFERENCE.md §2
    ("QCFS (design-time, L levels, v0 = θ/2)", "VGG-16, CIFAR-10", "95.52", "90.94 @ T=2, 94.01 @ T=4, 95.01 @ T=8",
     "Bu et al., ICLR 2022"),
    ("SNN Calibration, T = 16 (post-training)", "VGG-16, CIFAR-10", "95.76",
     "none 64.52, light 93.30, advanced 93.65", "Li et al., ICML 2021"),
    ("COS (offset spikes, + 8 pre-steps)", "ResNet-34, ImageNet", "—", "69.11 @ T=1, 73.81 @ T=4, 74.17 @ T=8 (+8)",
     "Hao et al., ICLR 2023"),
    ("ECL", "ResNet-18, CIFAR-10", "—", "94.75 @ T=2", "as quoted in issue #16"),
    ("spikingjelly 2.0, local threshold balancing", "ResNet-18, ImageNet", "69.76",
     "65.47 (plain 99.9 % at T=32: 12.46)", "spikingjelly 2.0 documentation"),
]


def plain(**kw) -> ConvertConfig:
    """Plain layer-wise max-norm conversion (v0 = 0, no correction, one threshold for all T) with ``kw`` changed."""
    return dataclasses.replace(ConvertConfig(threshold=Max(), per_channel=False, v_init=0.0,
                                             snn_calibration="none", late_threshold=None), **kw)


PREVIOUS_DEFAULT = ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                 snn_calibration="potential", snn_calibration_timesteps=8, late_threshold=None)
"""bsnn's default until 2026-12-04 (p99.99 per channel, θ/2 shift, potential calibration @T=8): the base of the
'previous default' rows, each field spelt out so that they do not change with ``ConvertConfig``'s defaults."""


DEFAULT_LABEL = "default ConvertConfig() (MSE @T=4 + ch + shift + potential @T=4, late MSE @T=16 after T=8)"


def conversion_rows() -> dict[str, tuple[str, ConvertConfig]]:
    """``label -> (kind, config)``: each technique alone on plain max-norm, then the default and combinations."""
    cal = {"snn_calibration_timesteps": 8}
    default = PREVIOUS_DEFAULT
    return {
        "plain max-norm": ("alone", plain()),
        "percentile 99.99": ("alone", plain(threshold=Percentile(99.99))),
        "per-channel thresholds": ("alone", plain(per_channel=True)),
        "shift θ/2": ("alone", plain(v_init=0.5)),
        "bias calibration @T=8": ("alone", plain(snn_calibration="bias", **cal)),
        "potential calibration @T=8": ("alone", plain(snn_calibration="potential", **cal)),
        "MSE thresholds @T=8 (SNN Calibration's search)": ("alone", plain(threshold=MSE(8))),
        DEFAULT_LABEL: (
            "candidate", ConvertConfig()),
        "previous default (p99.99 + ch + shift + potential @T=8)": ("candidate", default),
        "previous default + percentile search @T=4": ("candidate", dataclasses.replace(
            default, search_percentiles=[99.9, 99.99, 99.999, 100.0], search_timesteps=4, search_samples=512)),
        "previous default, potential calibration @T=4": ("candidate", dataclasses.replace(
            default, snn_calibration_timesteps=4)),
        "previous default without potential calibration": ("candidate", dataclasses.replace(
            default, snn_calibration="none")),
        "previous default, MSE thresholds @T=8": ("candidate", dataclasses.replace(default, threshold=MSE(8))),
        "previous default, MSE thresholds @T=4, potential calibration @T=4": ("candidate", dataclasses.replace(
            default, threshold=MSE(4), snn_calibration_timesteps=4)),
        # thresholds fitted for a longer code clip less (closer to the ANN as T grows), the potentials for T = 4
        "previous default, MSE thresholds @T=8, potential calibration @T=4": ("candidate", dataclasses.replace(
            default, threshold=MSE(8), snn_calibration_timesteps=4)),
        "previous default, MSE thresholds @T=16, potential calibration @T=4": ("candidate", dataclasses.replace(
            default, threshold=MSE(16), snn_calibration_timesteps=4)),
        # one initial charge fitted to several T (the least-squares charge over T = 2, 4, 8; an option)
        "previous default, joint potential calibration @T=2,4,8": ("candidate", dataclasses.replace(
            default, snn_calibration_joint_timesteps=[2, 4, 8])),
        "previous default, MSE thresholds @T=4, joint potential calibration @T=2,4,8": (
            "candidate", dataclasses.replace(default, threshold=MSE(4), snn_calibration_joint_timesteps=[2, 4, 8])),
        # thresholds for a longer code (less clipping: the large-T limit stays near the ANN) with the joint charge
        "previous default, MSE thresholds @T=8, joint potential calibration @T=2,4,8": (
            "candidate", dataclasses.replace(default, threshold=MSE(8), snn_calibration_joint_timesteps=[2, 4, 8])),
        "previous default, MSE thresholds @T=16, joint potential calibration @T=2,4,8": (
            "candidate", dataclasses.replace(default, threshold=MSE(16), snn_calibration_joint_timesteps=[2, 4, 8])),
        # two-phase thresholds (convert.late_threshold): the short code's (MSE @T=4) first, then the long code's (k·θ,
        # k = ceil(MSE@16 / θ)); only meaningful on a clipping threshold, so no 'alone' row on max-norm
        "previous default, MSE thresholds @T=4 then late MSE @T=16 after T=8, joint potential calibration @T=2,4,8"
        : (
            "candidate", dataclasses.replace(default, threshold=MSE(4), snn_calibration_joint_timesteps=[2, 4, 8],
                                             late_threshold=MSE(16), late_threshold_after=8)),
        "previous default, MSE thresholds @T=4 then late MSE @T=16 after T=16, joint potential calibration @T=2,4,8"
        : (
            "candidate", dataclasses.replace(default, threshold=MSE(4), snn_calibration_joint_timesteps=[2, 4, 8],
                                             late_threshold=MSE(16), late_threshold_after=16)),
    }


SJ_ROWS = {
    "spikingjelly RateCoding max": dict(mode="max"),
    "spikingjelly RateCoding 99.9%": dict(mode="99.9%"),
    "spikingjelly RateCoding 99.9% channel-wise + half threshold": dict(mode="99.9%", channel_wise=True,
                                                                         half_threshold=True),
    "spikingjelly LocalThresholdBalancing (8 calibration batches)": dict(ltb_batch_size=None),
    # LTB's λ grows by one gradient step per batch (≈ μ·ln(2k + 1) after k): the authors' recipe needs many small
    # batches, so spikingjelly's recipe also gets the same 2,048 images re-cut into 64 batches of 32
    "spikingjelly LocalThresholdBalancing (64 calibration batches of 32)": dict(ltb_batch_size=32),
}


# ----------------------------------------------------------------------------------------- measuring
def t_within(acc: dict, ann: float, points: float) -> int | None:
    return next((int(t) for t in sorted(acc, key=int) if acc[t] >= ann - points - 1e-9), None)


def curves(snn, net, ts: list[int], n_val: int, n_test: int, record: bool = False) -> dict:
    cfg = SimConfig(timesteps=ts, record_predictions=record)
    val = bsnn.simulate(snn, first(net.val, n_val), ts, cfg, ann=net.model, quiet=True)
    test = bsnn.simulate(snn, first(net.test, n_test), ts, cfg, ann=net.model, quiet=True)
    return {"val": val, "test": test}


def crossbar_passes(snn) -> int:
    """Crossbar passes per timestep of the network's spiking layers (1 for {0, 1} spikes; burst / signed more)."""
    return max([s.input_passes for s in resolve_layers(snn) if not s.analog_input], default=1)


def row_record(kind: str, res: dict, seconds: float, note: str = "", passes: int = 1) -> dict:
    val, test = res["val"], res["test"]
    acc = {str(t): test.accuracy[t] for t in sorted(test.accuracy)}
    vacc = {str(t): val.accuracy[t] for t in sorted(val.accuracy)}
    return {"kind": kind, "accuracy": acc, "val_accuracy": vacc, "ann": test.ann_accuracy,
            "val_ann": val.ann_accuracy, "t_at_1": t_within(acc, test.ann_accuracy, 1.0),
            "t_at_03": t_within(acc, test.ann_accuracy, 0.3),
            "val_t_at_1": t_within(vacc, val.ann_accuracy, 1.0), "calibration_s": round(seconds, 1), "note": note,
            "pre_steps": int(getattr(test, "pre_steps", 0)), "passes": passes}


def run_sj(net, spec: dict, ts: list[int], n_test: int) -> tuple[dict, float]:
    """spikingjelly 2.0 converts the materialised ANN; accuracy on the test images, conversion seconds."""
    from spikingjelly.activation_based import ann2snn
    from conversion_vs_spikingjelly import sj_simulate

    ann = materialize(net.model).eval()
    with Timer() as t:
        if "ltb_batch_size" in spec:  # one LTB step per batch of the loader it is given
            b = spec["ltb_batch_size"]
            loader = net.calib if b is None else DataLoader(net.calib.dataset, batch_size=b, shuffle=False)
            recipe = ann2snn.LocalThresholdBalancingRecipe(loader)
        else:
            recipe = ann2snn.RateCodingRecipe(net.calib, **spec)
        sj = ann2snn.Converter(recipe).convert(ann).eval()
    with torch.no_grad():
        correct, n = sj_simulate(sj, first(net.test, n_test), ts, "s", 1)
    return {str(k): 100.0 * c / n for k, c in correct.items()}, t.s


def selected(label: str, patterns: str) -> bool:
    """``label`` contains one of the ``|``-separated substrings of ``patterns``."""
    return any(p.strip() and p.strip() in label for p in patterns.split("|"))


def choose_best(rows: dict) -> str:
    """Among the candidates that end (at the largest simulated T) within 0.3 points of the best candidate's final
    validation accuracy — a faster start must not cost the converged accuracy — the one with the smallest
    validation T@1 (ties: best mean validation accuracy over T ≤ 8)."""
    cands = [k for k, r in rows.items() if r["kind"] == "candidate"]
    final = {k: rows[k]["val_accuracy"][max(rows[k]["val_accuracy"], key=int)] for k in cands}
    cands = [k for k in cands if final[k] >= max(final.values()) - 0.3]

    def key(k):
        r = rows[k]
        early = [v for t, v in r["val_accuracy"].items() if int(t) <= 8]
        return (r["val_t_at_1"] or 10 ** 6, -sum(early) / max(len(early), 1))

    return min(cands, key=key)


def run_network(name: str, args, payload: dict, save: Callable[[], None], extra: dict) -> None:
    try:
        net = load_network(name)
    except KeyError as e:
        log(f"{name}: not in the zoo ({e}); skipping")
        return
    d = payload["networks"].setdefault(name, {"rows": {}})
    done = {k: d[k] for k in ("n_val", "n_test") if k in d and d["rows"]}
    if done and done != {"n_val": args.n_val, "n_test": args.n_test}:  # never mix rows measured on other images
        raise SystemExit(f"{name}: the results file holds rows on n_val={done.get('n_val')}, n_test="
                         f"{done.get('n_test')} images; re-run with --n-val {done.get('n_val')} --n-test "
                         f"{done.get('n_test')}, or --fresh to start this network over")
    d.update(description=net.card["description"], data=net.data_note, ann_test_full=net.card["ann"]["test_acc"],
             n_val=args.n_val, n_test=args.n_test)
    ts = [1, 2, 4, 8, 16] if args.quick else GRID
    design_time = "qcfs" in name
    rows = {**conversion_rows(), **extra}
    if args.rows:  # keep the rows whose label contains one of the given substrings (plain max-norm always)
        rows = {k: v for k, v in rows.items() if k == "plain max-norm" or selected(k, args.rows)}
    if design_time:  # a differently trained ANN: the default and the candidates only
        rows = {k: v for k, v in rows.items() if v[0] == "candidate"}
    for label, (kind, cfg) in rows.items():
        if label in d["rows"]:
            continue
        log(f"{name}: {label}")
        with Timer() as t:
            snn = bsnn.convert(net.model, net.calib, cfg)
        d["rows"][label] = row_record(kind, curves(snn, net, ts, args.n_val, args.n_test), t.s,
                                      passes=crossbar_passes(snn))
        r = d["rows"][label]
        log(f"  T@1 {r['t_at_1']} (val {r['val_t_at_1']}); " + " ".join(f"{k}:{v:.1f}" for k, v in r["accuracy"].items()))
        save()
    best = choose_best(d["rows"])
    d["best"] = best
    if args.no_long:
        log(f"{name}: best combination on validation = {best} (not re-run to T=256: --no-long)")
    elif "best_long" not in d or d["best_long"].get("label") != best:
        log(f"{name}: best combination on validation = {best}; to T=256 with recorded predictions")
        long_ts = [1, 2, 4, 8, 16] if args.quick else LONG
        with Timer() as t:
            snn = bsnn.convert(net.model, net.calib, rows[best][1] if best in rows else conversion_rows()[best][1])
        res = curves(snn, net, long_ts, args.n_val, args.n_test, record=True)
        rec = row_record("best", res, t.s, passes=crossbar_passes(snn))
        ee = validated_early_exit(res["val"], res["test"], ann_val_accuracy=res["val"].ann_accuracy)
        d["best_long"] = {"label": best, **rec, "early_exit": ee}
        save()
    for label in [k for k in rows if args.long_rows and selected(k, args.long_rows)]:
        if "early_exit" in d.setdefault("long", {}).get(label, {}) or label == d.get("best_long", {}).get("label"):
            continue  # rows run before long rows got their early exit are run again
        log(f"{name}: {label}, to T=256 with recorded predictions")
        with Timer() as t:
            snn = bsnn.convert(net.model, net.calib, rows[label][1])
        res = curves(snn, net, LONG, args.n_val, args.n_test, record=True)
        d["long"][label] = {**row_record(rows[label][0], res, t.s, passes=crossbar_passes(snn)),
                            "early_exit": validated_early_exit(res["val"], res["test"],
                                                               ann_val_accuracy=res["val"].ann_accuracy)}
        save()
    if design_time or args.no_sj:
        return
    sj_ts = [1, 2, 4, 8, 16] if args.quick else GRID
    for label, spec in SJ_ROWS.items():
        if label in d["rows"] or (args.rows and not selected(label, args.rows)):
            continue
        log(f"{name}: {label}")
        acc, secs = run_sj(net, spec, sj_ts, args.n_test)
        ann = d["rows"]["plain max-norm"]["ann"]
        d["rows"][label] = {"kind": "spikingjelly", "accuracy": acc, "val_accuracy": {}, "ann": ann, "val_ann": None,
                            "t_at_1": t_within(acc, ann, 1.0), "t_at_03": t_within(acc, ann, 0.3),
                            "val_t_at_1": None, "calibration_s": round(secs, 1), "note": ""}
        save()


# ----------------------------------------------------------------------------------------- report
def plot(payload: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, d in payload["networks"].items():
        if not d["rows"]:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        ann = next(iter(d["rows"].values()))["ann"]
        for label, r in d["rows"].items():
            ts = [int(t) for t in r["accuracy"]]
            style = "--" if r["kind"] == "spikingjelly" else ("-" if r["kind"] == "candidate" else ":")
            axes[0].plot(ts, list(r["accuracy"].values()), style, marker="o", ms=3, label=label)
        axes[0].axhline(ann, color="k", lw=0.8, label="ANN (same images)")
        axes[0].set(xscale="log", xlabel="timesteps T", ylabel="test accuracy (%)", title=f"{name}: accuracy vs T")
        axes[0].legend(fontsize=6)
        b = d.get("best_long")
        if b:
            ts = [int(t) for t in b["accuracy"]]
            axes[1].plot(ts, list(b["accuracy"].values()), "-o", label=f"fixed T ({b['label']})")
            ee = b["early_exit"]["rows"]
            axes[1].plot([r["mean_timesteps"] for r in ee], [r["accuracy"] for r in ee], "-s",
                         label="early exit, rules from validation (average T)")
            axes[1].axhline(b["ann"], color="k", lw=0.8)
            axes[1].set(xscale="log", xlabel="timesteps (average for early exit)", ylabel="test accuracy (%)",
                        title="best combination: fixed T vs early exit")
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{NAME}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def _fmt_t(t) -> str:
    return str(t) if t else "—"


def _early_exit_cell(r: dict) -> str:
    """'patience p, margin m → acc @ avg T' of a row's chosen early-exit rule ('' if none was recorded)."""
    c = (r.get("early_exit") or {}).get("chosen")
    if not r.get("early_exit"):
        return ""
    return "none within 1 point" if not c else (f"p {c['patience']}, m {c['margin']} → {c['accuracy']:.1f} @ "
                                                f"{c['mean_timesteps']:.2f}")


def build_markdown(payload: dict) -> str:
    lines = [f"# Latency reduction on the CIFAR-10 zoo networks (spikingjelly "
             f"{payload['machine'].get('spikingjelly')} alongside)", "",
             f"Machine: {machine_markdown(payload['machine'])}", "",
             f"Commands (rows are kept between runs, so each was computed by one of these; the last ran most "
             f"recently): {'; '.join(f'`{c}`' for c in payload.get('commands', [payload['command']]))} (first started "
             f"{payload['started']}).", "",
             "Data: CIFAR-10, JPEG copy (`../shared/data/cifar10.npz`). Accuracy (%) on the first n test images; "
             "T@1 / T@0.3 = smallest T with test accuracy ≥ ANN − 1 / − 0.3 points on the same images ('—': not "
             "within 64). 'alone' rows add ONE technique to plain layer-wise max-norm (v0 = 0); 'candidate' rows are "
             "full recipes, the best chosen on the validation images (the smallest 'val T@1' among those ending within "
             "0.3 points of the best final validation accuracy); pre-steps = run-time "
             "steps each input runs before the T counted (COS, SRP: its latency is pre-steps + T); passes/step = crossbar "
             "reads per timestep of a spiking layer (1 for {0, 1} spikes; burst neurons ceil(log2(Γ + 1)) bit-serial "
             "passes, signed neurons 2: the cost model charges them); calibration s = conversion "
             "wall time on this machine (2 cores shared with other jobs: compare within a table only).", "",
             "Row labels: 'previous default …' rows are built on bsnn's default until 2026-12-04 (p99.99 per "
             "channel, θ/2 shift, potential calibration @T=8: `PREVIOUS_DEFAULT`; the commands before that date "
             "named them 'default …'); 'default ConvertConfig() (…)' is the current default; '[switch not "
             "re-centred …]' marks two-phase rows measured before phased neurons re-centred their membrane at the "
             "switch.", ""]
    for name, d in payload["networks"].items():
        rows_ = d["rows"]
        if not rows_:
            continue
        ann = next(iter(rows_.values()))["ann"]
        lines += [f"## {name}", "", f"{d['description']}. ANN {d['ann_test_full']:.2f} % on the 10,000 test images, "
                  f"{ann:.2f} % on the first {d['n_test']} (validation: first {d['n_val']}).", ""]
        ts = sorted({int(t) for r in rows_.values() for t in r["accuracy"]})
        table = [[label, r["kind"], _fmt_t(r["t_at_1"]), _fmt_t(r["t_at_03"]), _fmt_t(r["val_t_at_1"]),
                  r.get("pre_steps", 0), r.get("passes", 1), f"{r['calibration_s']:.0f}"]
                 + [f"{r['accuracy'][str(t)]:.1f}" if str(t) in r["accuracy"] else "" for t in ts]
                 for label, r in rows_.items()]
        lines += [markdown_table(["method", "kind", "T@1", "T@0.3", "val T@1", "pre-steps", "passes/step",
                                  "calibration s"]
                                 + [f"T={t}" for t in ts], table), ""]
        b = d.get("best_long")
        if b and b["label"] != d.get("best"):
            b = None
        if not b and d.get("best"):
            lines += [f"**Best combination (chosen on validation): {d['best']}** (not re-run to T = 256).", ""]
        if b:
            lts = list(b["accuracy"])
            lines += [f"**Best combination (chosen on validation): {b['label']}** — to T = {lts[-1]}: "
                      + ", ".join(f"T={t}: {b['accuracy'][t]:.1f}" for t in lts)
                      + f" (ANN {b['ann']:.2f}); T@1 {_fmt_t(b['t_at_1'])}, T@0.3 {_fmt_t(b['t_at_03'])}; lowest "
                      f"accuracy at T ≥ 64: {min(v for t, v in b['accuracy'].items() if int(t) >= 64):.1f}.", ""]
            ee = b["early_exit"]
            if ee["rows"]:
                lines += ["Run-time early exit (stop when the prediction has been stable for `patience` steps and the "
                          "time-averaged top-1 − top-2 margin ≥ `margin`; Pareto rules found on validation, applied "
                          "unchanged to test):", "",
                          markdown_table(["patience", "margin", "val acc %", "val avg T", "test acc %",
                                          "test avg T"],
                                         [[r["patience"], r["margin"], f"{r['val_accuracy']:.1f}",
                                           f"{r['val_mean_timesteps']:.2f}", f"{r['accuracy']:.1f}",
                                           f"{r['mean_timesteps']:.2f}"] for r in ee["rows"]]), ""]
                c = ee.get("chosen")
                if c:
                    lines += [f"Chosen rule (cheapest within 1 point of the ANN on validation): patience "
                              f"{c['patience']}, margin {c['margin']} → test {c['accuracy']:.1f} % at average T "
                              f"{c['mean_timesteps']:.2f}.", ""]
        if d.get("long"):
            lts = [str(t) for t in LONG if t >= 16]
            lines += ["Rows also run to T = 256 (`--long-rows`; the convergence law: accuracy at T ≥ 64 against the "
                      "ANN's on the same images; early exit: the rule chosen on validation as above, its test "
                      "accuracy at its average T — '' where the row was run before long rows recorded predictions):",
                      "",
                      markdown_table(["method", "T@1", "T@0.3", "lowest test at T ≥ 64 (ANN)", "lowest val at T ≥ 64 "
                                      "(ANN)"] + [f"T={t}" for t in lts] + ["early exit: rule → test % @ avg T"],
                                     [[label, _fmt_t(r["t_at_1"]), _fmt_t(r["t_at_03"]),
                                       f"{min(v for t, v in r['accuracy'].items() if int(t) >= 64):.1f} "
                                       f"({r['ann']:.1f})",
                                       f"{min(v for t, v in r['val_accuracy'].items() if int(t) >= 64):.1f} "
                                       f"({r['val_ann']:.1f})"]
                                      + [f"{r['accuracy'][t]:.1f}" for t in lts] + [_early_exit_cell(r)]
                                      for label, r in d["long"].items()]),
                      ""]
        png = f"{NAME}_{name}.png"
        if png in (payload.get("plots") or []):
            lines += [f"![{name}]({png})", ""]
    lines += ["## Published numbers (their networks, full precision, not re-run here)", "",
              markdown_table(["method", "network", "ANN %", "SNN %", "source"], [list(p) for p in PUBLISHED]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fresh", action="store_true", help="recompute rows found in the results file")
    p.add_argument("--no-sj", action="store_true", help="skip the spikingjelly rows")
    p.add_argument("--no-long", action="store_true", help="do not re-run the best combination to T=256")
    p.add_argument("--drop-rows", default="", help="|-separated row labels to forget from the results file")
    p.add_argument("--rows", default="", help="|-separated substrings: only rows whose label contains one")
    p.add_argument("--long-rows", default="", help="|-separated substrings: also run these rows to T=256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not available():
        log("needs ../shared/data/cifar10.npz; skipping")
        return
    if args.quick:
        args.n_val, args.n_test = min(args.n_val, 100), min(args.n_test, 100)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = NAME + ("_quick" if args.quick else "")
    old = out / f"{stem}.json"
    payload = json.loads(old.read_text()) if old.is_file() and not args.fresh else {}
    if "networks" not in payload:  # results of the earlier (mnist5k / VGG-7) version are not comparable
        payload = {}
    history = payload.get("commands") or ([payload["command"]] if payload.get("command") else [])
    payload.update(command=command_line(), machine=machine_info(), started=payload.get("started", now_iso()),
                   commands=[*[c for c in history if c != command_line()], command_line()])
    payload.setdefault("networks", {})
    for d in payload["networks"].values():  # rows measured with an earlier definition
        for label in [k for k in d["rows"] if k in set(args.drop_rows.split("|"))]:
            del d["rows"][label]

    def save() -> None:
        payload["machine"]["load_average_at_end"] = load_average()
        payload["plots"] = plot(payload, out)
        write_results(out, stem, payload, build_markdown(payload))

    for name in args.networks.split(","):
        run_network(name, args, payload, save, extra_rows())
    save()  # also when every row was already there: the tables and plots follow the file's rows
    log(f"wrote {out / stem}.md")


def extra_rows() -> dict[str, tuple[str, ConvertConfig]]:
    """Rows of optional corrections present in this checkout's ConvertConfig (LTB, advanced SNN calibration,
    offset-spike corrections), each alone on plain max-norm and added to the default recipe as a candidate."""
    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    out: dict[str, tuple[str, ConvertConfig]] = {}
    # (change, label, base of the 'alone' row, base of the candidate). COS / SRP are the authors' corrections of a
    # θ/2-shifted network without other initial charge (their QCFS networks start at θ/2): COS's rule assumes the
    # initial membrane is below θ (a neuron still >= θ after firing on every pre-step is raised by 1001 θ), so
    # it is paired with the θ/2 shift and without potential calibration (whose initial charge is several θ).
    no_cal = {"snn_calibration": "none"}
    options = [({"threshold_opt": "ltb"}, "LTB threshold optimisation", {}, {}),
               ({"snn_calibration": "advanced"}, "SNN Calibration advanced (potential + weights)", {}, {}),
               ({"offset_correction": "cos", "offset_pre_steps": 4}, "COS offset spikes, ρ = 4",
                {"v_init": 0.5}, no_cal),
               ({"offset_correction": "srp", "offset_pre_steps": 4}, "SRP residual membrane, τ = 4",
                {"v_init": 0.5}, no_cal),
               ({"neuron": "burst", "max_burst": 2}, "burst neurons, Γ = 2", {}, {}),
               ({"neuron": "burst", "max_burst": 4}, "burst neurons, Γ = 4", {}, {}),
               ({"neuron": "burst", "max_burst": 8}, "burst neurons, Γ = 8", {}, {}),
               ({"neuron": "signed"}, "signed neurons with memory", {}, {}),
               # bursts resolve a wide range in few steps, so the max (no clipping: the limit is the ANN itself)
               # may beat the percentile there; candidate only (plain max-norm + bursts is the row above)
               ({"neuron": "burst", "max_burst": 4}, "burst neurons, Γ = 4, max thresholds", None,
                {"threshold": Max()}),
               ({"neuron": "burst", "max_burst": 8}, "burst neurons, Γ = 8, max thresholds", None,
                {"threshold": Max()})]
    for change, label, alone_base, cand_base in options:
        if not set(change) <= fields:
            continue
        try:
            alone = plain(**(alone_base or {}), **change)
            alone.validate()
        except Exception:  # noqa: BLE001 - the option is not available in this checkout
            continue
        if alone_base is not None:
            out[("shift θ/2 + " if alone_base else "") + label] = ("alone", alone)
        out[f"previous default{' without potential calibration' if cand_base.get('snn_calibration') else ''} + "
            f"{label}"] = ("candidate", dataclasses.replace(PREVIOUS_DEFAULT, **cand_base, **change))
    return out


if __name__ == "__main__":
    main()
