"""Benchmark: torchvision's classification models converted by bsnn and by spikingjelly 2.0, in one run.

Each model (``resnet18``, ``resnet50``, ``vgg11_bn``, ``mobilenet_v2``, ``densenet121``; random initialisation,
10 classes, BatchNorm statistics settled on random data, 32 x 32 inputs) is converted

* by bsnn with the default ``ConvertConfig()`` (``bsnn.convert``), simulated with ``bsnn.simulate.run_batch``;
* by spikingjelly 2.0's ``ann2snn.Converter`` with its ``99.9%`` recipe (its default percentile) and its best
  post-training recipe (``99.9%`` channel-wise + half threshold), simulated step by step, the output summed;

both calibrated on the same 64 images and measured on the same 16: the relative error of the time-averaged
output against the ANN's logits (‖out/T − logits‖ / ‖logits‖) and the argmax agreement with the ANN at
T = 16 / 64 / 256 / 1024, and the conversion wall time. A model spikingjelly refuses is listed with its error.

Run:  python benchmarks/torchvision_conversion.py            (about 15 min on one core)
      python benchmarks/torchvision_conversion.py --models resnet18 --quick
Writes ``benchmarks/results/torchvision_conversion.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Timer, command_line, log, machine_info, machine_markdown, markdown_table, write_results  # noqa: E402,E501

import bsnn  # noqa: E402
from bsnn.config import ConvertConfig  # noqa: E402
from bsnn.models import create_model  # noqa: E402
from bsnn.simulate import run_batch  # noqa: E402
from spikingjelly.activation_based import ann2snn, functional  # noqa: E402

MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "densenet121"]
TS = [16, 64, 256, 1024]
SJ = {"spikingjelly 99.9%": dict(mode="99.9%"),
      "spikingjelly 99.9% channel-wise + half threshold": dict(mode="99.9%", channel_wise=True, half_threshold=True)}


def settled(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=10)
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32, generator=g))
    return model.eval()


def errors(cum: torch.Tensor, logits: torch.Tensor, ts: list[int]) -> dict:
    """``cum [T, B, K]`` accumulated output -> relative error and argmax agreement (%) at each T."""
    pred = logits.argmax(1)
    return {"rel_err": {t: ((cum[t - 1] / t - logits).norm() / logits.norm()).item() for t in ts},
            "agree": {t: 100.0 * (cum[t - 1].argmax(1) == pred).float().mean().item() for t in ts}}


@torch.no_grad()
def measure_bsnn(ann, calib: DataLoader, x: torch.Tensor, ts: list[int]) -> dict:
    with Timer() as tm:
        snn = bsnn.convert(ann, calib, ConvertConfig())
    cum = run_batch(snn, x, max(ts), 64)
    return {**errors(cum, ann(x), ts), "convert_s": tm.s}


@torch.no_grad()
def measure_spikingjelly(ann, calib: DataLoader, x: torch.Tensor, ts: list[int], recipe: dict) -> dict:
    try:
        with Timer() as tm:
            net = ann2snn.Converter(ann2snn.RateCodingRecipe(calib, **recipe)).convert(ann).eval()
        functional.reset_net(net)
        outs, cum = [], torch.zeros(x.shape[0], 10)
        for _ in range(max(ts)):
            cum = cum + net(x)
            outs.append(cum)
        return {**errors(torch.stack(outs), ann(x), ts), "convert_s": tm.s}
    except Exception as e:  # noqa: BLE001 - the peer's refusal is a result, recorded with its reason
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"refused": last[:300]}


def report(results: dict, ts: list[int], out: Path, stem: str) -> None:
    rows = []
    for model, per in results.items():
        for tool, r in per.items():
            if "refused" in r:
                rows.append([model, tool, *["refused"] * (2 * len(ts)), "-", r["refused"][:80]])
                continue
            rows.append([model, tool, *[f"{r['rel_err'][t]:.4f}" for t in ts], *[f"{r['agree'][t]:.0f}" for t in ts],
                         f"{r['convert_s']:.1f}", ""])
    table = markdown_table(["model", "converter", *[f"rel. err. T={t}" for t in ts], *[f"agree % T={t}" for t in ts],
                            "convert (s)", "note"], rows)
    wins = []
    for model, per in results.items():
        b = per.get("bsnn default")
        peers = [r for k, r in per.items() if k != "bsnn default" and "refused" not in r]
        if b and "refused" not in b:
            beat = all(b["rel_err"][t] < p["rel_err"][t] for p in peers for t in ts)
            wins.append(f"* {model}: bsnn error below every spikingjelly recipe that converts it at every T: "
                        f"**{'yes' if beat else 'no'}**" + ("" if peers else " (spikingjelly converts it with no recipe)"))
    info = machine_info()
    md = ("# torchvision models: bsnn vs spikingjelly 2.0\n\n"
          "Random-init torchvision models (10 classes, BatchNorm statistics settled on random data), 32 x 32 "
          "inputs; 64 calibration images and 16 measured images, the same for both tools. Relative error: "
          "‖out/T − logits‖ / ‖logits‖ of the time-averaged output; agree: argmax agreement with the ANN. bsnn: "
          "the default `ConvertConfig()`. spikingjelly: `ann2snn.Converter(RateCodingRecipe(...))`.\n\n"
          f"{table}\n\n" + "\n".join(wins) + f"\n\nCommand: `{command_line()}`\n\n{machine_markdown(info)}\n")
    write_results(out, stem, {"timesteps": ts, "results": results, "machine": info, "command": command_line()}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="T <= 64, 4 images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts = [16, 64] if args.quick else TS
    g = torch.Generator().manual_seed(2)
    calib_x = torch.randn(64, 3, 32, 32, generator=g)
    x = torch.randn(4 if args.quick else 16, 3, 32, 32, generator=g)
    calib = DataLoader(TensorDataset(calib_x, torch.zeros(64, dtype=torch.long)), batch_size=32)
    out, stem = Path(args.out), "torchvision_conversion" + ("_quick" if args.quick else "")
    results: dict = {}
    for name in args.models.split(","):
        ann = settled(name)
        results[name] = {"bsnn default": measure_bsnn(ann, calib, x, ts)}
        for label, recipe in SJ.items():
            results[name][label] = measure_spikingjelly(settled(name), calib, x, ts, recipe)
        log(f"{name}: " + "; ".join(f"{k}: " + (r["refused"][:60] if "refused" in r else
                                               " ".join(f"{t}:{r['rel_err'][t]:.3f}" for t in ts))
                                    for k, r in results[name].items()))
        report(results, ts, out, stem)


if __name__ == "__main__":
    main()
