"""Benchmark: design-time latency by tandem fine-tuning (:mod:`bsnn.tandem`) of the zoo's QCFS binary student.

Fine-tunes ``--network`` (default ``cifar10_airbench_qcfs_v2``: binary airbench_snn, QCFS L = 4) through its
converted SNN at ``--timesteps`` (KD from ``--teacher``, the full-precision airbench94 teacher it was distilled
from; only the full-precision parameters learn: BN affine, biases, λ, first and last layer), then converts the
network before and after with the same recipes and simulates both on the first ``--n-val`` validation and
``--n-test`` test images of its own splits (CIFAR-10, the JPEG copy ``../shared/data/cifar10.npz``). The recipe
reported as the result is chosen on validation (smallest validation T@1, ties: mean validation accuracy at
T ≤ 8); it is then re-simulated to T = 256 (convergence). T@1 / T@0.3 = the smallest T with accuracy ≥ the ANN's
(same images, same network: before or after fine-tuning) − 1 / − 0.3 points.

Writes ``benchmarks/results/tandem_finetune_<network>_T<T>.{json,md,png}`` and the fine-tuned weights to
``--save`` (safetensors, default ``runs/tandem/``; not released into the zoo: see ``docs/conversion.md``).

Usage::

    python benchmarks/tandem_finetune.py --threads 2   # 1 epoch at T = 4 (lr 3e-4): ~30 min training + ~20 simulating
    python benchmarks/tandem_finetune.py --quick                           # smoke run (few steps and images)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, log, machine_info, machine_markdown, markdown_table,  # noqa: E402
                     now_iso, write_results)
from _zoo import available, first, load_network  # noqa: E402
from latency_ablation import curves, row_record  # noqa: E402

import bsnn  # noqa: E402
from bsnn.binary import is_binary  # noqa: E402
from bsnn.convert import ConvertConfig, Percentile  # noqa: E402
from bsnn.tandem import BINARY_WEIGHT_MODES, TandemConfig, tandem_finetune  # noqa: E402
from bsnn.train import evaluate, set_seed  # noqa: E402

GRID = [1, 2, 4, 8, 16, 32, 64]
LONG = GRID + [128, 256]
# label -> ConvertConfig; QCFS thresholds are the trained λ (no statistic, and no late threshold: k = 1), v0 = θ/2 in
# all. The labels are those of the results already recorded: "default (potential @ T=8)" is bsnn's default until
# 2026-12-04, pinned here; on these trained-threshold networks today's ConvertConfig() is "potential @ T=4".
RECIPES = {
    "none (λ, θ/2)": ConvertConfig(snn_calibration="none"),
    "default (potential @ T=8)": ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                               snn_calibration="potential", snn_calibration_timesteps=8,
                                               late_threshold=None),
    "potential @ T=4": ConvertConfig(snn_calibration_timesteps=4),
}


class LoggedLoader:
    """A training loader that logs its progress and ETA every ``every`` batches (``fit`` shows a bar only on a
    terminal; this job runs in the background)."""

    def __init__(self, loader: DataLoader, every: int = 10) -> None:
        self.loader, self.every, self.dataset = loader, every, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        t0, n = time.perf_counter(), len(self.loader)
        for i, batch in enumerate(self.loader):
            if i and i % self.every == 0:
                el = time.perf_counter() - t0
                log(f"  step {i}/{n}  {el / i:.1f} s/step  ETA {el / i * (n - i) / 60:.1f} min")
            yield batch


def ann_accuracy(model, ds) -> float:
    return evaluate(model, DataLoader(ds, batch_size=500))["accuracy"]


def measure(model, net, n_val: int, n_test: int) -> dict:
    out = {"ann_val_full": ann_accuracy(model, net.val), "ann_test_full": ann_accuracy(model, net.test), "rows": {}}
    view = dataclasses.replace(net, model=model)
    for label, cfg in RECIPES.items():
        with Timer() as t:
            snn = bsnn.convert(model, net.calib, cfg)
        out["rows"][label] = row_record("recipe", curves(snn, view, GRID, n_val, n_test), t.s)
        r = out["rows"][label]
        log(f"  {label}: ANN {r['ann']:.2f}; " + " ".join(f"{k}:{v:.1f}" for k, v in r["accuracy"].items()))
    best = min(out["rows"], key=lambda k: (out["rows"][k]["val_t_at_1"] or 10**9,
                                           -sum(v for t, v in out["rows"][k]["val_accuracy"].items() if int(t) <= 8)))
    snn = bsnn.convert(model, net.calib, RECIPES[best])
    out["best"] = best
    out["best_long"] = row_record("best", curves(snn, view, LONG, n_val, n_test), 0.0)
    return out


def _binary_note(p: dict) -> str:
    """How the ±1 weights learned (results written before ``binary_weights`` existed said train_binary_weights)."""
    t = p["tandem"]
    mode = t.get("binary_weights", "latent" if t.get("train_binary_weights") else "frozen")
    if mode == "bop":
        return (f"trained by Bop (γ {t['bop_gamma']:g}, τ {t['bop_threshold']:g}; {p.get('flips', '?')} of "
                f"{p.get('binary_params', '?')} signs flipped)")
    return {"frozen": "frozen", "latent": "trained as latent weights by Adam"}[mode]


def build_markdown(p: dict) -> str:
    lines = [f"# Tandem fine-tuning: {p['network']} at T = {p['tandem']['timesteps']}", "",
             f"Data: {p['data']}. Teacher: `{p['teacher']}`. SNN rows: first {p['n_val']} validation / "
             f"{p['n_test']} test images; T@1 / T@0.3 against the same network's ANN on the same images.", "",
             f"Fine-tuning: {p['steps']} steps of batch {p['batch']} ({p['train_s']:.0f} s), "
             f"{p['trainable_params']} trainable full-precision parameters, ±1 weights "
             f"{_binary_note(p)}, lr {p['tandem']['lr']}, ann_weight {p['tandem']['ann_weight']}.", ""]
    if "before_from" in p:
        lines += [f"The 'before' rows are those of `{Path(p['before_from']).name}` (same network, same images).", ""]
    heads = ["network", "recipe", "ANN (val full / test full)"] + [f"T={t}" for t in GRID] + ["T@1", "T@0.3"]
    rows = []
    states = [s for s in ("before", "after") if s in p]
    for state in states:
        m = p[state]
        for label, r in m["rows"].items():
            rows.append([state, label + (" ★" if label == m["best"] else ""),
                         f"{m['ann_val_full']:.2f} / {m['ann_test_full']:.2f} (subset {r['ann']:.2f})"]
                        + [f"{r['accuracy'][str(t)]:.2f}" for t in GRID] + [r["t_at_1"], r["t_at_03"]])
    lines += ["Test accuracy (%) — ★ = the recipe chosen on validation:", "", markdown_table(heads, rows), ""]
    vrows = [[s, label] + [f"{r['val_accuracy'][str(t)]:.2f}" for t in GRID] + [r["val_t_at_1"]]
             for s in states for label, r in p[s]["rows"].items()]
    lines += ["Validation accuracy (%), the split the recipe is chosen on:", "",
              markdown_table(["network", "recipe"] + [f"T={t}" for t in GRID] + ["val T@1"], vrows), ""]
    lrows = [[s, p[s]["best"], f"{p[s]['best_long']['ann']:.2f}"]
             + [f"{p[s]['best_long']['accuracy'][str(t)]:.2f}" for t in LONG] for s in states]
    lines += ["Convergence of the chosen recipe (test):", "",
              markdown_table(["network", "recipe", "ANN"] + [f"T={t}" for t in LONG], lrows), "",
              f"Command: `{p['command']}`  ", f"Commit: {p['machine'].get('git', {}).get('commit', '?')}  ",
              machine_markdown(p["machine"]), ""]
    return "\n".join(lines)


def plot(p: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for state, style in (("before", "--"), ("after", "-")):
        if state not in p:
            continue
        r = p[state]["best_long"]
        ts = [int(t) for t in r["accuracy"]]
        ax.plot(ts, list(r["accuracy"].values()), style, marker="o", label=f"{state}: {p[state]['best']}")
        ax.axhline(r["ann"], ls=style, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{p['network']}: tandem fine-tuning at T={p['tandem']['timesteps']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--network", default="cifar10_airbench_qcfs_v2")
    ap.add_argument("--teacher", default="cifar10_airbench_teacher_v2")
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=TandemConfig.lr, help="Adam peak lr (default: TandemConfig's)")
    ap.add_argument("--ann-weight", type=float, default=1.0)
    ap.add_argument("--binary-weights", default=TandemConfig.binary_weights, choices=sorted(BINARY_WEIGHT_MODES),
                    help="how the ±1 layers learn (TandemConfig.binary_weights)")
    ap.add_argument("--bop-gamma", type=float, default=TandemConfig.bop_gamma)
    ap.add_argument("--bop-threshold", type=float, default=TandemConfig.bop_threshold)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--train-limit", type=int, default=0, help="train on the first N training images (0 = all)")
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default="", help="fine-tuned weights (.safetensors); default "
                    "runs/tandem/<name>_tandem_T<T>[_<tag>].safetensors")
    ap.add_argument("--tag", default="", help="suffix of the results stem and weights file (e.g. an lr tried)")
    ap.add_argument("--before-from", default="", help="reuse the 'before' section of an earlier results JSON of the "
                    "same network and images instead of measuring it again")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 32 images, 64 images simulated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not available():
        raise SystemExit("../shared/data/cifar10.npz is absent: this benchmark needs the CIFAR-10 copy")
    if args.quick:
        args.batch, args.train_limit, args.n_val, args.n_test = 32, 64, 64, 64
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    net = load_network(args.network)
    teacher = bsnn.zoo.load(args.teacher)[0].eval()
    payload = {"network": args.network, "teacher": args.teacher, "data": net.data_note, "n_val": args.n_val,
               "n_test": args.n_test, "command": command_line(), "date": now_iso()}
    original = None if args.before_from else {k: v.clone() for k, v in net.model.state_dict().items()}
    train = net.train if not args.train_limit else Subset(net.train, range(args.train_limit))
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    cfg = TandemConfig(timesteps=args.timesteps, ann_weight=args.ann_weight, epochs=args.epochs, lr=args.lr,
                       binary_weights=args.binary_weights, bop_gamma=args.bop_gamma, bop_threshold=args.bop_threshold)
    signs = {n: m.weight.detach() >= 0 for n, m in net.model.named_modules() if is_binary(m)}
    model = net.model
    log(f"{args.network}: tandem fine-tuning at T={args.timesteps}, {len(loader)} steps/epoch x {args.epochs}")
    with Timer() as t:
        history = tandem_finetune(model, LoggedLoader(loader), cfg, teacher=teacher, quiet=True)
    payload.update(tandem=dataclasses.asdict(cfg), history=history, train_s=round(t.s, 1), batch=args.batch,
                   steps=len(loader) * args.epochs,
                   trainable_params=sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False)
                                        if not is_binary(m)),
                   binary_params=sum(int(v.numel()) for v in signs.values()),
                   flips=sum(int((v != (net.model.get_submodule(n).weight.detach() >= 0)).sum())
                             for n, v in signs.items()))
    suffix = f"_T{args.timesteps}" + (f"_{args.tag}" if args.tag else "")
    save = Path(args.save) if args.save else ROOT / "runs" / "tandem" / f"{args.network}_tandem{suffix}.safetensors"
    save.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(save))
    payload["weights"] = str(save)
    log(f"{args.network}: after fine-tuning ({t.s:.0f} s; weights {save})")
    stem = f"tandem_finetune_{args.network}{suffix}" + ("_quick" if args.quick else "")
    payload["machine"] = machine_info()
    payload["after"] = measure(model, net, args.n_val, args.n_test)
    write_results(args.out, stem, payload, build_markdown(payload))  # the result first; the baseline follows
    if args.before_from:
        earlier = json.loads(Path(args.before_from).read_text())
        if (earlier["network"], earlier["n_val"], earlier["n_test"]) != (args.network, args.n_val, args.n_test):
            raise SystemExit(f"{args.before_from} measured {earlier['network']} on {earlier['n_val']} / "
                             f"{earlier['n_test']} images: not this run's baseline")
        payload["before"], payload["before_from"] = earlier["before"], args.before_from
    else:
        log(f"{args.network}: before fine-tuning (the released weights)")
        before = bsnn.zoo.load(args.network)[0].eval()
        before.load_state_dict(original)
        payload["before"] = measure(before, net, args.n_val, args.n_test)
    write_results(args.out, stem, payload, build_markdown(payload))
    plot(payload, Path(args.out) / f"{stem}.png")
    log(f"wrote {args.out}/{stem}.json/.md/.png")


if __name__ == "__main__":
    main()
