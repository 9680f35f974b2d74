"""Probe: does training the ±1 signs with Bop help tandem fine-tuning? Short runs, compared on validation.

Fine-tunes ``--network`` (default the zoo's QCFS binary student ``cifar10_airbench_qcfs_v2``) by tandem fine-tuning
(:func:`bsnn.tandem.tandem_finetune`, T = 4, KD from ``--teacher``) for ``--steps`` steps of ``--batch`` training
images, once with the ±1 weights frozen (the default) and once per Bop threshold τ in ``--thresholds`` (γ =
``--gamma``; :mod:`bsnn.bop`), each from the released weights with the same data order and one-cycle schedule. It
reports, on the first ``--n-val`` validation images (CIFAR-10, the JPEG copy ``../shared/data/cifar10.npz``), the
ANN's accuracy, the SNN's at T = 4 (the trained forward: λ thresholds, θ/2, no calibration; equal to
``bsnn.simulate`` of ``ConvertConfig(snn_calibration="none")``) and how many signs flipped per ±1 layer. A probe of
the rule's settings, not a full result: ``benchmarks/tandem_finetune.py --binary-weights bop`` runs the full epoch.

Writes ``benchmarks/results/tandem_bop_probe_<network>[_<tag>].{json,md}``. The seed (``--seed``) sets the data
order and augmentation: comparing two seeds of the frozen run shows the noise of so short a fine-tuning.

Usage::

    python benchmarks/tandem_bop_probe.py --threads 1        # 30 steps of 128 per variant: ~6 min each on one core
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, log, machine_info, machine_markdown, markdown_table,  # noqa: E402
                     now_iso, write_results)
from _zoo import available, first, load_network  # noqa: E402

import bsnn  # noqa: E402
from bsnn.binary import is_binary  # noqa: E402
from bsnn.tandem import TandemConfig, tandem_finetune, tandem_logits  # noqa: E402
from bsnn.train import set_seed  # noqa: E402


@torch.no_grad()
def accuracies(model, loader, timesteps: int) -> tuple[float, float]:
    """(ANN %, SNN % at ``timesteps``) on ``loader``."""
    ann = snn = n = 0
    for x, y in loader:
        ann += (model(x).argmax(1) == y).sum().item()
        snn += (tandem_logits(model, x, timesteps).argmax(1) == y).sum().item()
        n += len(y)
    return 100.0 * ann / n, 100.0 * snn / n


def build_markdown(p: dict) -> str:
    heads = ["±1 weights", "flips per ±1 layer", "flips (of total)", "ANN val %", f"SNN T={p['timesteps']} val %",
             "s"]
    rows = [["released weights (before)", "—", "—", f"{p['before']['ann']:.1f}", f"{p['before']['snn']:.1f}", "—"]]
    for r in p["variants"]:
        rows.append([r["label"], " / ".join(map(str, r["flips"])), f"{sum(r['flips'])} of {p['binary_params']}",
                     f"{r['ann']:.1f}", f"{r['snn']:.1f}", f"{r['seconds']:.0f}"])
    return "\n".join([
        f"# Bop for the ±1 signs in tandem fine-tuning: {p['network']} (probe)", "",
        f"Data: {p['data']}. Teacher: `{p['teacher']}`. Each variant: {p['steps']} steps of {p['batch']} training "
        f"images from the released weights (same order, seed {p.get('seed', 0)}; Adam lr {p['lr']} one-cycle on the "
        "full-precision "
        f"parameters), then the first {p['n_val']} validation images: the ANN and its SNN at T = {p['timesteps']} "
        "(trained forward: λ thresholds, θ/2, no calibration).", "",
        markdown_table(heads, rows), "",
        f"Command: `{p['command']}`  ", f"Commit: {p['machine'].get('git', {}).get('commit', '?')}  ",
        machine_markdown(p["machine"]), ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--network", default="cifar10_airbench_qcfs_v2")
    ap.add_argument("--teacher", default="cifar10_airbench_teacher_v2")
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--gamma", type=float, default=0.05)
    ap.add_argument("--thresholds", default="1e-3,6e-4,3e-4", help="comma-separated Bop τ values")
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results stem (e.g. another seed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not available():
        raise SystemExit("../shared/data/cifar10.npz is absent: this probe needs the CIFAR-10 copy")
    torch.set_num_threads(args.threads)
    net = load_network(args.network)
    teacher = bsnn.zoo.load(args.teacher)[0].eval()
    released = copy.deepcopy(net.model.state_dict())
    val = first(net.val, args.n_val)
    lr = TandemConfig.lr
    ann, snn = accuracies(net.model, val, args.timesteps)
    payload = {"network": args.network, "teacher": args.teacher, "data": net.data_note, "steps": args.steps,
               "batch": args.batch, "seed": args.seed, "n_val": args.n_val, "timesteps": args.timesteps, "lr": lr,
               "command": command_line(), "date": now_iso(), "before": {"ann": ann, "snn": snn}, "variants": [],
               "binary_params": sum(m.weight.numel() for m in net.model.modules() if is_binary(m))}
    log(f"released weights: ANN {ann:.1f} %, SNN T={args.timesteps} {snn:.1f} %")
    variants = [("frozen (default)", {"binary_weights": "frozen"})] + [
        (f"Bop γ {args.gamma:g}, τ {float(t):g}", {"binary_weights": "bop", "bop_gamma": args.gamma,
                                                   "bop_threshold": float(t)}) for t in args.thresholds.split(",")]
    for label, change in variants:
        net.model.load_state_dict(released)
        set_seed(args.seed)
        signs = {n: m.weight.detach() >= 0 for n, m in net.model.named_modules() if is_binary(m)}
        loader = DataLoader(Subset(net.train, range(args.steps * args.batch)), batch_size=args.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(args.seed))
        cfg = TandemConfig(timesteps=args.timesteps, epochs=1, **change)
        with Timer() as t:
            tandem_finetune(net.model, loader, cfg, teacher=teacher, quiet=True)
        flips = [int((s != (net.model.get_submodule(n).weight.detach() >= 0)).sum()) for n, s in signs.items()]
        ann, snn = accuracies(net.model, val, args.timesteps)
        payload["variants"].append({"label": label, **change, "flips": flips, "ann": ann, "snn": snn,
                                    "seconds": round(t.s, 1)})
        log(f"{label}: ANN {ann:.1f} %, SNN {snn:.1f} %, flips {flips} ({t.s:.0f} s)")
    payload["machine"] = machine_info()
    stem = f"tandem_bop_probe_{args.network}" + (f"_{args.tag}" if args.tag else "")
    write_results(args.out, stem, payload, build_markdown(payload))
    log(f"wrote {args.out}/{stem}.json/.md")


if __name__ == "__main__":
    main()
