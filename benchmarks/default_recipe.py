"""Benchmark: which conversion recipe should be the default? Recipe x network x T, chosen on validation splits.

Every candidate recipe converts the same trained ANNs; each SNN is simulated to T = 256 on a *validation* split
(where the recipe is chosen) and on test images (reported only). Networks — three of them trained here with a plain
PyTorch loop (plain ReLU, cross-entropy, no distillation, no bsnn training code), one by bsnn's default pipeline:

* ``digits``  — scikit-learn 8x8 digits, a small binary CNN with conv-BN-ReLU, average pooling and a residual add
  (plain loop);
* ``mnist5k`` / ``mnist5k_clip`` / ``mnist5k_relu`` — the default pipeline's binary student with QCFS (L = 8, the
  previous default), trainable-clip or plain ReLU activations (KD from the default teacher; trained by bsnn);
* ``fashion`` — Fashion-MNIST (Debian's ``dataset-fashion-mnist``), a binary 4-conv CNN with avg-pool (plain loop);
* ``cifar10`` — CIFAR-10 (JPEG copy, ``../shared/data/cifar10.npz``), the binary 6-conv + 2-FC VGG of
  ``benchmarks/train_plain_vgg.py`` (plain loop; released as the zoo entry ``cifar10_plain_bvgg``);
* ``cifar10_zoo_relu`` / ``cifar10_zoo_qcfs`` — the zoo's most accurate binary students (airbench layout, ReLU /
  QCFS, distilled by ``bsnn run``: ``cifar10_airbench_binary_v2`` / ``cifar10_airbench_qcfs_v2``), on the splits
  they were trained and measured on.

Rules: a recipe *converges* on a network when the SNN approaches its ANN as T grows, measured on the outputs: the
relative error of its time-averaged output ``||ȳ_T - y|| / ||y||`` (``y`` the ANN's logits) never rises above 1.1x its
smallest value at a smaller T, is at most 0.05 at T = 256, and the accuracy at T = 256 is within 1 point of the ANN.
T@1 is the smallest T of the grid with accuracy >= ANN - 1. The default is the recipe that converges on every
network's validation split with the smallest sum of log2 T@1 (ties: higher sum of accuracies at T = 4), among the
recipes measured on all networks; the QCFS students (``mnist5k``, ``cifar10_zoo_qcfs``) are reported but not in the
choice: their SNN's limit is the clip-ReLU network, not the QCFS staircase their ANN computes.

The first version of the rule judged convergence on accuracy (within 0.3 points of the ANN at T = 256 and never a fall
of more than 0.3 points, at least 3 images, from one T to a larger one); it is still reported (``conv (acc)``). On
these 287-500-image validation splits it turned on wobbles of 1-6 images: with the zoo's ReLU student added it
rejected every candidate (the default's correction fitted at T = 8 "fell" 1.5 points on an mnist5k student, the one
fitted at T = 16 ended 2 images short on the zoo student) while both recipes' output errors fell monotonically on
every network — the convergence that the tests check (``tests/test_convergence.py``: time-averaged output -> ANN
logits). Agreement with the ANN's predictions is reported too.

Usage::

    python benchmarks/default_recipe.py                      # all networks (CIFAR-10 when ../shared is present)
    python benchmarks/default_recipe.py --networks digits    # one network
    python benchmarks/default_recipe.py --quick              # smoke run (few images, T <= 16)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, log, machine_info, machine_markdown, markdown_table,  # noqa: E402
                     now_iso, write_results)
from train_plain_vgg import DATA as CIFAR_NPZ, load_cifar, normalise  # noqa: E402
from _zoo import available as zoo_available, load_network  # noqa: E402

import bsnn  # noqa: E402
from spikingjelly.activation_based import ann2snn, functional  # noqa: E402

from bsnn.binary import clamp_latent_, materialize  # noqa: E402
from bsnn.config import ConvertConfig, DataConfig, load_config  # noqa: E402
from bsnn.convert import MSE, Max, Percentile  # noqa: E402
from bsnn.data import build_loaders, calibration_loader  # noqa: E402
from bsnn.io import load_checkpoint, save_checkpoint  # noqa: E402
from bsnn.pipeline import make_context, stage_student, stage_teacher  # noqa: E402
from bsnn.simulate import run_batch  # noqa: E402
from bsnn.snn.kernels import default_kernel  # noqa: E402
from bsnn.snn.synapse import resolve_mode, synapse_mode  # noqa: E402

NAME = "default_recipe"
LIMIT_NOT_ANN = {"mnist5k", "cifar10_zoo_qcfs"}
"""QCFS students, reported but not in the choice: as T grows their SNN approaches the clip-ReLU network, not the
QCFS staircase the ANN computes (it may end above the ANN: ``cifar10_zoo_qcfs`` 90.2 % vs 89.0 %)."""
GRID = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CACHE = ROOT / "benchmarks" / "cache"


def recipes() -> dict[str, ConvertConfig]:
    """The candidates: the two old defaults (the old CLI's bias current on every timestep), then the corrections
    alone and combined (``bias@4``: bsnn's windowed bias current, flowing during the first 4 timesteps; ``mse@T``:
    SNN Calibration's least-squares threshold search for a T-step code)."""
    base = dict(calib_samples=2048, snn_calibration_samples=256, late_threshold=None)
    pot = dict(snn_calibration="potential", snn_calibration_timesteps=4)
    bias = dict(snn_calibration="bias", snn_calibration_timesteps=4)
    pot8 = dict(snn_calibration="potential", snn_calibration_timesteps=8)
    pot16 = dict(snn_calibration="potential", snn_calibration_timesteps=16)
    return {
        # every field that defines a recipe is spelt out: a recipe must not change when ConvertConfig's defaults do
        "old ConvertConfig(): p99.9": ConvertConfig(threshold=Percentile(99.9), per_channel=False, v_init=0.0,
                                                    snn_calibration="none", **base),
        "old CLI: p99.9 + shift + bias cal@4": ConvertConfig(threshold=Percentile(99.9), per_channel=False, v_init=0.5,
                                                             snn_calibration="bias", snn_calibration_timesteps=4,
                                                             **base),
        "p99.99 + ch + shift": ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                             snn_calibration="none", **base),
        "p99.9 + ch + shift + pot@4": ConvertConfig(threshold=Percentile(99.9), per_channel=True, v_init=0.5,
                                                    **pot, **base),
        "p99.99 + ch + shift + pot@4": ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                                     **pot, **base),
        "max + ch + shift + pot@4": ConvertConfig(threshold=Max(), per_channel=True, v_init=0.5, **pot, **base),
        "p99.9 + ch + shift + pot@8": ConvertConfig(threshold=Percentile(99.9), per_channel=True, v_init=0.5,
                                                    **pot8, **base),
        "p99.99 + ch + shift + pot@8": ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                                     **pot8, **base),
        "p99.9 + ch + shift + pot@16": ConvertConfig(threshold=Percentile(99.9), per_channel=True, v_init=0.5,
                                                     **pot16, **base),
        "p99.99 + ch + shift + pot@16": ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                                      **pot16, **base),
        "p99.99 + ch + shift + bias@4": ConvertConfig(threshold=Percentile(99.99), per_channel=True, v_init=0.5,
                                                      **bias, **base),
        # SNN Calibration's threshold search (least squared error of a T-step code, bsnn.convert.calibrate.MSE)
        "mse@8 + ch + shift + pot@8": ConvertConfig(threshold=MSE(8), per_channel=True, v_init=0.5, **pot8, **base),
        "mse@4 + ch + shift + pot@4": ConvertConfig(threshold=MSE(4), per_channel=True, v_init=0.5, **pot, **base),
        # thresholds fitted for a longer code (less clipping: closer to the ANN as T grows), potentials for T = 4
        "mse@8 + ch + shift + pot@4": ConvertConfig(threshold=MSE(8), per_channel=True, v_init=0.5, **pot, **base),
        "mse@16 + ch + shift + pot@4": ConvertConfig(threshold=MSE(16), per_channel=True, v_init=0.5, **pot,
                                                     **base),
        # two-phase thresholds (bsnn.convert.phases): the short code's thresholds for the first steps, then a
        # per-layer integer multiple of them reaching a longer code's statistic (T up to the switch = the parent row)
        "mse@4 + ch + shift + pot@4 + late p99.99 after 8": ConvertConfig(
            threshold=MSE(4), per_channel=True, v_init=0.5, late_threshold_after=8,
            **pot, **{**base, "late_threshold": Percentile(99.99)}),
        "mse@4 + ch + shift + pot@4 + late mse@16 after 8": ConvertConfig(
            threshold=MSE(4), per_channel=True, v_init=0.5, late_threshold_after=8,
            **pot, **{**base, "late_threshold": MSE(16)}),
        "mse@4 + ch + shift + joint pot@2/4/8 + late mse@16 after 8": ConvertConfig(
            threshold=MSE(4), per_channel=True, v_init=0.5, late_threshold_after=8,
            snn_calibration_joint_timesteps=[2, 4, 8], **pot, **{**base, "late_threshold": MSE(16)}),
        "mse@4 + ch + shift + pot@4 + late p99.99 after 16": ConvertConfig(
            threshold=MSE(4), per_channel=True, v_init=0.5, late_threshold_after=16,
            **pot, **{**base, "late_threshold": Percentile(99.99)}),
    }


def constant_bias_(snn) -> None:
    """The old CLI default's bias calibration: its current flows on every timestep (no window)."""
    for n in snn.neurons().values():
        n.i_bias_steps.fill_(0)


POST = {"old CLI: p99.9 + shift + bias cal@4": constant_bias_}

# the peer: spikingjelly 2.0's best post-training recipe (the one the issue names), on the materialised ANN
SPIKINGJELLY = "spikingjelly 2.0: 99.9% channel-wise + half threshold"


# ----------------------------------------------------------------------------------------- networks
class DigitsResCNN(nn.Module):
    """8x8 digits: conv-BN-ReLU, a residual block (add), avg-pool, FC (``[B, 1, 8, 8]`` -> logits)."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.relu(h + self.b1(h))
        return self.fc(self.conv3(self.pool(h)))


def fashion_cnn(c: int = 32) -> nn.Sequential:
    """Fashion-MNIST: 4 conv-BN-ReLU with two avg-pools, FC-BN-ReLU, FC (``[B, 1, 28, 28]`` -> logits)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, c), *block(c, c), nn.AvgPool2d(2), *block(c, 2 * c), *block(2 * c, 2 * c),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * c * 49, 128, bias=False), nn.BatchNorm1d(128),
                         nn.ReLU(), nn.Linear(128, 10))


def plain_fit(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 2e-3) -> nn.Module:
    """The loop a user writes: Adam, cosine decay, cross-entropy; binary latent weights clamped after each step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_latent_(model)
            sched.step()
    return model.eval()


def _cached(path: Path, make) -> nn.Module:
    """``make() -> model`` trained once and cached as a state dict (its architecture is rebuilt by ``make``)."""
    model = make(train=False)
    if path.is_file():
        model.load_state_dict(load_checkpoint(path)["model"])
        return model.eval()
    model = make(train=True)
    save_checkpoint({"model": model.state_dict(), "trained_at": now_iso()}, path)
    return model.eval()


def _bsnn_splits(name: str, **kw):
    cfg = DataConfig(name=name, batch_size=64, eval_batch_size=500, **kw)
    return cfg, build_loaders(cfg, seed=0)


def _plain_net(data: str, val_fraction: float, build, epochs: int, cache: str, desc: str) -> dict:
    """A binary network ``build()`` trained by :func:`plain_fit` on bsnn's ``data`` splits (cached)."""
    cfg, ld = _bsnn_splits(data, val_fraction=val_fraction)
    torch.manual_seed(0)

    def make(train: bool) -> nn.Module:
        m = bsnn.binarize_(build())
        return plain_fit(m, ld.train, epochs) if train else m
    model = _cached(CACHE / cache, make)
    s = ld.splits
    return {"model": model, "calib": calibration_loader(s, cfg, 2048), "val": s.val, "test": s.test,
            "trained_by": f"plain loop (CE, Adam, {epochs} epochs), ReLU", "data": desc}


def net_digits(args) -> dict:
    return _plain_net("digits", 0.2, DigitsResCNN, 30, "recipe_digits_rescnn.pt", "sklearn digits 8x8")


def _net_mnist5k(activation: str) -> dict:
    """The default pipeline's teacher and binary student on mnist5k, the student with ``activation``."""
    run = CACHE / f"recipe_mnist5k_{activation}_run"
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"run.out_dir={run}", "run.quiet=true",
                                                         f"model.activation={activation}"])
    done = (run / "student.pt").is_file()
    ctx = make_context(cfg, resume=done, overwrite=not done)
    student = stage_student(ctx, stage_teacher(ctx)).eval()
    s = ctx.loaders.splits
    return {"model": student, "calib": calibration_loader(s, cfg.data, 2048), "val": s.val, "test": s.test,
            "trained_by": f"bsnn pipeline (KD from the default teacher, {activation} student)", "data": "mnist5k"}


def net_mnist5k_qcfs(args) -> dict:
    return _net_mnist5k("qcfs")


def net_mnist5k_clip(args) -> dict:
    return _net_mnist5k("clip")


def net_mnist5k_relu(args) -> dict:
    return _net_mnist5k("relu")


def net_fashion(args) -> dict:
    return _plain_net("fashion_mnist", 1 / 12, fashion_cnn, 3, "recipe_fashion_cnn.pt",
                      "Fashion-MNIST (Debian package)")


def net_cifar10(args) -> dict | None:
    if not CIFAR_NPZ.is_file():
        log(f"cifar10: needs {CIFAR_NPZ} — skipping")
        return None
    model, card = bsnn.zoo.load("cifar10_plain_bvgg")  # trained by benchmarks/train_plain_vgg.py (its card)
    d = load_cifar()
    ds = {k: TensorDataset(normalise(d[f"x_{k}"]), d[f"y_{k}"]) for k in ("train", "val", "test")}
    calib = DataLoader(Subset(ds["train"], range(2048)), batch_size=256)
    return {"model": model.eval(), "calib": calib, "val": ds["val"], "test": ds["test"],
            "trained_by": f"plain loop (CE, SGD one-cycle, {card['ann']['best_epoch']} epochs), ReLU",
            "data": "CIFAR-10 (JPEG copy)"}


def _net_zoo(name: str) -> dict | None:
    """A released CIFAR-10 zoo network with the splits it was trained and measured on (``benchmarks/_zoo.py``)."""
    if not zoo_available():
        log(f"{name}: needs {CIFAR_NPZ} — skipping")
        return None
    z = load_network(name)
    return {"model": z.model, "calib": z.calib, "val": z.val, "test": z.test,
            "trained_by": f"the zoo's `{name}` (`bsnn run --config configs/cifar10.yaml`, KD from the zoo teacher)",
            "data": z.data_note}


def net_cifar10_zoo_relu(args) -> dict | None:
    return _net_zoo("cifar10_airbench_binary_v2")


def net_cifar10_zoo_qcfs(args) -> dict | None:
    return _net_zoo("cifar10_airbench_qcfs_v2")


NETWORKS = {"digits": net_digits, "mnist5k": net_mnist5k_qcfs, "mnist5k_clip": net_mnist5k_clip,
            "mnist5k_relu": net_mnist5k_relu, "fashion": net_fashion, "cifar10": net_cifar10,
            "cifar10_zoo_relu": net_cifar10_zoo_relu, "cifar10_zoo_qcfs": net_cifar10_zoo_qcfs}


def weights_sha256(model: nn.Module) -> str:
    """A fingerprint of the network's weights and buffers: rows of one network are never mixed with another's."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def measure(snn, ann: nn.Module, ds, n: int, grid: list[int]) -> dict:
    """Accuracy, agreement with the ANN and relative output error at every T of ``grid`` on the first ``n``."""
    loader = DataLoader(Subset(ds, range(min(n, len(ds)))), batch_size=250)
    ts = sorted(grid)
    correct = {t: 0 for t in ts}
    agree = {t: 0 for t in ts}
    err_num = {t: 0.0 for t in ts}
    err_den, ann_correct, total = 0.0, 0, 0
    cpu = torch.device("cpu")
    snn.set_kernel(default_kernel(cpu))
    with synapse_mode(snn, resolve_mode("auto", cpu)):
        sums = _run(snn, ann, loader, ts, correct, agree, err_num)
    err_den, ann_correct, total = sums
    return {"n": total, "ann": 100.0 * ann_correct / total,
            "acc": {t: 100.0 * correct[t] / total for t in ts},
            "agree": {t: 100.0 * agree[t] / total for t in ts},
            "rel_err": {t: math.sqrt(err_num[t] / max(err_den, 1e-12)) for t in ts}}


@torch.no_grad()
def measure_spikingjelly(model: nn.Module, calib: DataLoader, ds, n: int, grid: list[int]) -> dict:
    """:func:`measure` for spikingjelly's ``RateCodingRecipe('99.9%', channel_wise, half_threshold)`` conversion of
    the same ANN (binary layers materialised as α·sign(W)), simulated step by step (its output summed over time)."""
    ann = materialize(model).eval()
    net = ann2snn.Converter(ann2snn.RateCodingRecipe(calib, mode="99.9%", channel_wise=True,
                                                     half_threshold=True)).convert(ann).eval()
    loader = DataLoader(Subset(ds, range(min(n, len(ds)))), batch_size=250)
    ts = sorted(grid)
    correct, agree, err_num = ({t: 0 for t in ts}, {t: 0 for t in ts}, {t: 0.0 for t in ts})
    err_den, ann_correct, total = 0.0, 0, 0
    for x, y in loader:
        logits = ann(x)
        pred = logits.argmax(1)
        functional.reset_net(net)
        cum = torch.zeros_like(logits)
        for t in range(1, ts[-1] + 1):
            cum += net(x)
            if t in correct:
                correct[t] += (cum.argmax(1) == y).sum().item()
                agree[t] += (cum.argmax(1) == pred).sum().item()
                err_num[t] += (cum / t - logits).norm().pow(2).item()
        err_den += logits.norm().pow(2).item()
        ann_correct += (pred == y).sum().item()
        total += len(y)
    return {"n": total, "ann": 100.0 * ann_correct / total,
            "acc": {t: 100.0 * correct[t] / total for t in ts},
            "agree": {t: 100.0 * agree[t] / total for t in ts},
            "rel_err": {t: math.sqrt(err_num[t] / max(err_den, 1e-12)) for t in ts}}


def _run(snn, ann, loader, ts, correct, agree, err_num) -> tuple[float, int, int]:
    err_den, ann_correct, total = 0.0, 0, 0
    for x, y in loader:
        logits = ann(x)
        pred = logits.argmax(1)
        mem = run_batch(snn, x, ts[-1], 1)  # [T, B, K] cumulative output
        for t in ts:
            out = mem[t - 1] / t
            correct[t] += (out.argmax(1) == y).sum().item()
            agree[t] += (out.argmax(1) == pred).sum().item()
            err_num[t] += (out - logits).norm().pow(2).item()
        err_den += logits.norm().pow(2).item()
        ann_correct += (pred == y).sum().item()
        total += len(y)
    return err_den, ann_correct, total


def _int_keys(m: dict) -> dict:
    """A measurement read back from JSON: its per-T dicts keyed by int again."""
    return {k: ({int(t): v for t, v in x.items()} if isinstance(x, dict) else x) for k, x in m.items()}


def t_at_1(m: dict) -> int | None:
    return next((t for t in sorted(m["acc"]) if m["acc"][t] >= m["ann"] - 1.0), None)


def max_drop(m: dict) -> float:
    """The largest fall of accuracy (points) from one T to any larger T."""
    ts = sorted(m["acc"])
    return max([m["acc"][a] - m["acc"][b] for i, a in enumerate(ts) for b in ts[i + 1:]] + [0.0])


def converges_accuracy(m: dict, tol: float = 0.3, images: int = 3) -> bool:
    """The first rule (reported, no longer the choice's): accuracy at the largest T within ``tol`` points (at
    least one image) of the ANN, and no fall of more than ``tol`` points — at least ``images`` images — from one T
    to a larger one. The issue's 0.3 points are 3 images of 1000; on these 287-500-image validation splits it
    rejected every candidate on wobbles of 1-6 images whose output error kept falling (see the module docstring)."""
    ts = sorted(m["acc"])
    end_ok = abs(m["acc"][ts[-1]] - m["ann"]) <= max(tol, 100.0 / m["n"]) + 1e-9
    return end_ok and max_drop(m) <= max(tol, images * 100.0 / m["n"]) + 1e-9


ERR_END = 0.05
"""Largest relative output error ``||ȳ_T - y|| / ||y||`` at the largest T of a converging SNN."""
ERR_RISE = 1.1
"""A converging SNN's output error never exceeds this multiple of its smallest value at any smaller T."""


def converges(m: dict) -> bool:
    """The SNN approaches its ANN as T grows, measured on the outputs, not on a few argmax flips: the relative
    error of its time-averaged output falls with T (never above :data:`ERR_RISE` x its smallest value at a
    smaller T), is at most :data:`ERR_END` at the largest T, and the accuracy there is within 1 point of the ANN."""
    ts = sorted(m["rel_err"])
    errs = [m["rel_err"][t] for t in ts]
    falls = all(e <= ERR_RISE * min(errs[:i]) + 1e-12 for i, e in enumerate(errs) if i)
    return falls and errs[-1] <= ERR_END and m["acc"][ts[-1]] >= m["ann"] - 1.0 - 1e-9


def choose(results: dict, names: list[str]) -> tuple[str | None, dict]:
    """The recipe converging (:func:`converges`) on every network's validation split with the smallest sum of
    log2 T@1 (ties: the higher sum of accuracies at T = 4), over the recipes measured on all of ``names``."""
    score = {}
    for r in [r for r in results[names[0]] if r != SPIKINGJELLY and all(r in results[n] for n in names)]:
        vals = [results[n][r]["val"] for n in names]
        if not all(converges(v) for v in vals) or any(t_at_1(v) is None for v in vals):
            continue
        score[r] = (sum(math.log2(t_at_1(v)) for v in vals), -sum(v["acc"][4] for v in vals if 4 in v["acc"]))
    return (min(score, key=score.get) if score else None), score


def plot(results: dict, names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, n in zip(axes[0], names):
        for r, res in results[n].items():
            m = res["test"]
            ts = sorted(m["acc"])
            ax.plot(ts, [m["acc"][t] for t in ts], marker=".", label=r)
        ax.axhline(m["ann"], color="k", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(max(0, m["ann"] - 25), min(100, m["ann"] + 3))
        ax.set_title(f"{n} (ANN {m['ann']:.1f} %, test)")
        ax.set_xlabel("T")
    axes[0][0].set_ylabel("SNN accuracy (%)")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_previous(path: Path) -> tuple[dict, dict]:
    """``(results, networks)`` of an earlier results file (per-T keys as ints again), or empty dicts."""
    if not path.is_file():
        return {}, {}
    old = json.loads(path.read_text())
    results = {n: {r: {sp: _int_keys(m) for sp, m in res.items()} for r, res in per.items()}
               for n, per in old["results"].items()}
    return results, old["networks"]


def report(results: dict, info: dict, grid: list[int], cands: dict, out: Path, stem: str) -> str | None:
    """Choose the default over every network in ``results``; write JSON, markdown and the plot. Returns the choice."""
    names = list(results)
    chooser = [n for n in names if n not in LIMIT_NOT_ANN]
    best, score = choose(results, chooser)
    plot(results, names, out / f"{stem}.png")
    md = ["# Default conversion recipe: recipe x network x T\n", f"Command: `{command_line()}`\n",
          machine_markdown(machine_info()),
          "Networks: " + "; ".join(f"**{n}** — {i['data']}, {i['trained_by']}" for n, i in info.items()) + ".\n",
          "T@1 = smallest T with SNN accuracy >= ANN - 1 point; conv = the SNN approaches its ANN: the relative "
          f"error of its time-averaged output (`rel. err`, ||ȳ_T - y|| / ||y||) never rises above {ERR_RISE}x its "
          f"smallest value at a smaller T, is <= {ERR_END} at T=256, and the accuracy there is within 1 point of the "
          "ANN; conv (acc) = the first rule, reported only: accuracy at T=256 within 0.3 points (at least one image) "
          "of the ANN and no fall of more than 0.3 points (at least 3 images) from one T to any larger T "
          "(`max drop`). The default = the recipe converging on every network but "
          f"{', '.join(sorted(LIMIT_NOT_ANN))} (QCFS students: their SNN's limit is the clip network, not the "
          "QCFS staircase, so no recipe approaches that ANN) with the smallest sum of log2 T@1, among the recipes "
          "measured on all of them. Chosen on the "
          "**validation** split; test shown for reference. `ch` = per-channel thresholds where consumers are full "
          "precision, `shift` = membranes start at θ/2, `mse@T` = SNN Calibration's least-squares threshold search "
          "for a T-step code, `pot@4` / `bias@4` = SNN-Calibration potential / bias "
          "correction computed at T=4 (the bias current flows during the first 4 steps; both effects decay as "
          "1/T); `old CLI` = the previous default, whose bias current flowed on every step. The spikingjelly row is "
          "the peer's best post-training recipe on the same (materialised) ANN, for reference, not a candidate: its "
          "scalers multiply the spikes per channel (ChannelVoltageScaler around each IFNode), so its layers receive "
          "graded values instead of {0,1} spikes against ±1 weights, which a binary crossbar does not compute; "
          "it does not run the network's trainable-clip layers (no row for mnist5k_clip).\n",
          f"**Chosen default: {best}**\n" if best else "**No recipe converged on every network.**\n"]
    for split in ("val", "test"):
        for n in names:
            m0 = next(iter(results[n].values()))[split]
            md.append(f"\n## {n}, {split} ({m0['n']} images, ANN {m0['ann']:.2f} %)\n")
            rows = []
            for r, res in results[n].items():
                m = res[split]
                rows.append([r] + [m["acc"][t] for t in grid] + [
                    t_at_1(m), "yes" if converges(m) else "no", "yes" if converges_accuracy(m) else "no",
                    max_drop(m), m["agree"][grid[-1]], " / ".join(f"{m['rel_err'][t]:.3f}" for t in (4, 16, 64))
                    if all(t in m["rel_err"] for t in (4, 16, 64)) else "", m["rel_err"][grid[-1]]])
            md.append(markdown_table(["recipe"] + [f"T={t}" for t in grid] +
                                     ["T@1", "conv", "conv (acc)", "max drop", f"agree@{grid[-1]} %",
                                      "rel. err@4 / 16 / 64", f"rel. err@{grid[-1]}"], rows))
    payload = {"created": now_iso(), "command": command_line(), "machine": machine_info(), "networks": info,
               "grid": grid, "recipes": {k: dataclasses.asdict(v) for k, v in {**recipes(), **cands}.items()
                                         if any(k in per for per in results.values())},
               "results": results, "chosen": best, "scores": score}
    write_results(out, stem, payload, "\n".join(md))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--recipes", default="", help="comma-separated subset of recipe names (default: all)")
    ap.add_argument("--val", type=int, default=500, help="validation images per network")
    ap.add_argument("--test", type=int, default=500, help="test images per network")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--spikingjelly", action="store_true", help="also convert with the peer's best recipe")
    ap.add_argument("--fresh", action="store_true", help="drop the other networks of an existing results file")
    ap.add_argument("--merge", nargs="*", default=[], help="also take the networks of these results files")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    grid = [1, 2, 4, 8, 16] if args.quick else GRID
    n_val, n_test = (100, 100) if args.quick else (args.val, args.test)
    cands = recipes()
    if args.recipes:
        cands = {k: v for k, v in cands.items() if k in args.recipes.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = NAME + ("_quick" if args.quick else "")
    results, info = ({}, {}) if args.fresh else load_previous(out / f"{stem}.json")
    for path in args.merge:  # recipe by recipe: a file may hold only some recipes of a network
        more, more_info = load_previous(Path(path))
        for n, per in more.items():
            results.setdefault(n, {}).update(per)
        info.update(more_info)
    for name in filter(None, args.networks.split(",")):
        net = NETWORKS[name](args)
        if net is None:
            continue
        fingerprint = weights_sha256(net["model"])
        old = info.get(name, {}).get("weights_sha256")
        keep = args.recipes and old == fingerprint  # --recipes adds rows to the same network's (weights) rows
        info[name] = {**{k: net[k] for k in ("trained_by", "data")}, "weights_sha256": fingerprint}
        results[name] = dict(results.get(name, {})) if keep else {}
        for rname, rcfg in cands.items():
            with Timer() as tm:
                snn = bsnn.convert(net["model"], net["calib"], dataclasses.replace(rcfg))
                POST.get(rname, lambda _s: None)(snn)
                results[name][rname] = {"val": measure(snn, net["model"], net["val"], n_val, grid),
                                        "test": measure(snn, net["model"], net["test"], n_test, grid)}
            v = results[name][rname]["val"]
            log(f"{name} | {rname}: val ANN {v['ann']:.2f}, " + " ".join(f"{t}:{v['acc'][t]:.1f}" for t in grid)
                + f" | T@1={t_at_1(v)} conv={converges(v)} rel.err@{grid[-1]}={v['rel_err'][grid[-1]]:.3f}"
                + f" ({tm.s:.0f} s)")
        if args.spikingjelly:
            try:
                with Timer() as tm:
                    results[name][SPIKINGJELLY] = {sp: measure_spikingjelly(net["model"], net["calib"], net[sp], k,
                                                                            grid)
                                                   for sp, k in (("val", n_val), ("test", n_test))}
            except ValueError as e:  # e.g. the trainable-clip layers' functional relu: the peer refuses the graph
                log(f"{name} | {SPIKINGJELLY}: cannot convert this network ({str(e).splitlines()[0][:160]}); no row")
            else:
                v = results[name][SPIKINGJELLY]["val"]
                log(f"{name} | {SPIKINGJELLY}: " + " ".join(f"{t}:{v['acc'][t]:.1f}" for t in grid)
                    + f" ({tm.s:.0f} s)")
        report(results, info, grid, cands, out, stem)  # after every network: a killed run keeps what it measured
    best = report(results, info, grid, cands, out, stem) if results else None
    log(f"chosen default: {best}; wrote {out / stem}.md/.json/.png")


if __name__ == "__main__":
    main()
