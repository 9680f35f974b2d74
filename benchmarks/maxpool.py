"""Benchmark: converting max-pooling — every ``convert.maxpool`` strategy against spikingjelly 2.0, on a *trained*
max-pool network, accuracy vs T against its ANN.

The network: the 6-conv + 2-FC CIFAR-10 VGG of ``benchmarks/train_plain_vgg.py`` with **max-pooling** (three 2x2
pools right after a ReLU), full precision, trained by a plain PyTorch loop (CE, SGD one-cycle, augmentation) —
``python benchmarks/train_plain_vgg.py --pool max --full-precision --epochs 8 --threads 1 --out
benchmarks/models/cifar10_maxpool_vgg.pt``, released as the zoo entry ``cifar10_maxpool_vgg``; the best epoch picked on the validation split (last 5,000 training
images). Calibration: the first 2,048 training images, un-augmented.

Each bsnn strategy is the default ``ConvertConfig()`` with ``maxpool`` changed; spikingjelly 2.0 converts the
same ANN with its best post-training recipe (99.9 % channel-wise + half threshold), its max-pools kept as
``nn.MaxPool2d`` on each timestep's spikes. The default is chosen on the validation images (the fastest strategy
that converges, as in ``benchmarks/default_recipe.py``); test images are shown for reference.

Run:  python benchmarks/maxpool.py            (about 30 min on one core)
      python benchmarks/maxpool.py --quick    (100 images, T <= 16)
Writes ``benchmarks/results/maxpool.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, log, machine_info, machine_markdown, markdown_table,  # noqa: E402
                     write_results)
from default_recipe import converges, max_drop, measure, measure_spikingjelly, t_at_1  # noqa: E402
from train_plain_vgg import DATA as CIFAR_NPZ, load_cifar, normalise  # noqa: E402

import bsnn  # noqa: E402
from bsnn.config import ConvertConfig  # noqa: E402
from bsnn.convert.maxpool import MAXPOOL_STRATEGIES  # noqa: E402

GRID = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SPIKINGJELLY = "spikingjelly 2.0 (99.9% channel-wise + half threshold; MaxPool2d on spikes)"


def network() -> dict | None:
    if not CIFAR_NPZ.is_file():
        log(f"needs {CIFAR_NPZ} — nothing to measure")
        return None
    model, card = bsnn.zoo.load("cifar10_maxpool_vgg")  # trained as this script's docstring says (its card)
    d = load_cifar()
    ds = {k: TensorDataset(normalise(d[f"x_{k}"]), d[f"y_{k}"]) for k in ("train", "val", "test")}
    return {"model": model.eval(), "calib": DataLoader(Subset(ds["train"], range(2048)), batch_size=256),
            "val": ds["val"], "test": ds["test"], "epoch": card["ann"]["best_epoch"], "val_acc": card["ann"]["val_acc"]}


def plot(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ann = next(iter(results.values()))["val"]["ann"]
    for name, r in results.items():
        ts = sorted(r["val"]["acc"])
        ax.plot(ts, [r["val"]["acc"][t] for t in ts], marker="o", ms=3, label=name.split(" (")[0])
    ax.axhline(ann, color="k", ls="--", lw=1, label=f"ANN {ann:.1f} %")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("CIFAR-10 max-pool VGG: max-pool conversion strategies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, net: dict, grid: list[int], out: Path, stem: str) -> str | None:
    ok = {n: t_at_1(r["val"]) for n, r in results.items() if n in MAXPOOL_STRATEGIES and converges(r["val"])}
    best = min(ok, key=lambda n: ok[n] or 10 ** 9) if ok else None
    rows = []
    for split in ("val", "test"):
        for name, r in results.items():
            m = r[split]
            rows.append([split, name + (" **(chosen)**" if name == best and split == "val" else ""), f"{m['ann']:.1f}",
                         *[f"{m['acc'][t]:.1f}" for t in grid], t_at_1(m) or "-", "yes" if converges(m) else "no",
                         f"{max_drop(m):.1f}", f"{m['rel_err'][grid[-1]]:.3f}", f"{m['agree'][grid[-1]]:.1f}"])
    table = markdown_table(["split", "conversion", "ANN", *[f"T={t}" for t in grid], "T@1", "converges", "max drop",
                            f"rel. err. T={grid[-1]}", f"agree T={grid[-1]}"], rows)
    info = machine_info()
    md = (f"# Converting max-pooling: strategies vs spikingjelly\n\n"
          f"Network: CIFAR-10 (JPEG copy) 6-conv + 2-FC VGG, width 32, **max-pooling** after three ReLUs, full "
          f"precision, trained by a plain loop ({net['epoch']} epochs, validation {net['val_acc']:.2f} %); "
          f"{results[next(iter(results))]['val']['n']} validation / {results[next(iter(results))]['test']['n']} "
          "test images; accuracy % at each T. T@1: the smallest T within 1 point of the ANN. Converges: within "
          "0.3 points (at least one image) of the ANN at the largest T and never falling by more than 0.3 points "
          "(at least 3 images). bsnn rows: the default `ConvertConfig()` with `maxpool` set.\n\n"
          f"Chosen on the validation split: **{best}**.\n\n{table}\n\n"
          + "\n".join(f"* `{k}`: {MAXPOOL_STRATEGIES.get(k).summary}" for k in MAXPOOL_STRATEGIES) + "\n\n"
          f"Command: `{command_line()}`\n\n{machine_markdown(info)}\n")
    write_results(out, stem, {"grid": grid, "results": results, "chosen": best, "machine": info,
                              "command": command_line()}, md)
    plot(results, out / f"{stem}.png")
    return best


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--strategies", default=",".join(MAXPOOL_STRATEGIES.names()))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = network()
    if net is None:
        return
    grid = [1, 2, 4, 8, 16] if args.quick else GRID
    n_val, n_test = (100, 100) if args.quick else (args.val, args.test)
    out, stem = Path(args.out), "maxpool" + ("_quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.strategies.split(","):
        with Timer() as tm:
            snn = bsnn.convert(net["model"], net["calib"], dataclasses.replace(ConvertConfig(), maxpool=name))
            results[name] = {sp: measure(snn, net["model"], net[sp], k, grid) for sp, k in (("val", n_val),
                                                                                         ("test", n_test))}
        v = results[name]["val"]
        log(f"{name}: val ANN {v['ann']:.2f}, " + " ".join(f"{t}:{v['acc'][t]:.1f}" for t in grid) + f" ({tm.s:.0f} s)")
        report(results, net, grid, out, stem)
    with Timer() as tm:
        results[SPIKINGJELLY] = {sp: measure_spikingjelly(net["model"], net["calib"], net[sp], k, grid)
                                 for sp, k in (("val", n_val), ("test", n_test))}
    v = results[SPIKINGJELLY]["val"]
    log(f"spikingjelly: " + " ".join(f"{t}:{v['acc'][t]:.1f}" for t in grid) + f" ({tm.s:.0f} s)")
    log(f"chosen: {report(results, net, grid, out, stem)}; wrote {out / stem}.md/.json/.png")


if __name__ == "__main__":
    main()
