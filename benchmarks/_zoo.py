"""A released zoo network with the data splits it was trained and measured on (benchmarks only).

Two kinds of entries (see ``benchmarks/release_zoo.py``):

* trained by ``benchmarks/train_plain_vgg.py`` (plain PyTorch loops): train = first 45,000 CIFAR-10 training
  images, validation = the last 5,000, the fixed CIFAR-10 channel mean/std of that script;
* trained by ``bsnn run`` (their card has a ``normalisation`` section): bsnn's npz loader, 45,000 / 5,000
  (stratified, seed 0) / 10,000, normalised by the train split's mean/std — rebuilt here from the card's data
  settings, and the card's normalisation is checked against the rebuilt one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT  # noqa: E402
from train_plain_vgg import DATA as CIFAR_NPZ, load_cifar, normalise  # noqa: E402

import bsnn  # noqa: E402
from bsnn.config import DataConfig  # noqa: E402
from bsnn.data import build_loaders, calibration_loader  # noqa: E402


@dataclass
class ZooNetwork:
    """A zoo model (eval mode) and its splits: ``calib`` (first 2,048 training images, batch 256), ``val`` and
    ``test`` datasets yielding ``(x [3, 32, 32] normalised, y)``; ``train``: the training split it was trained on
    (``bsnn run`` entries: bsnn's ``ArrayDataset`` with its random crop + flip, in the loader's stored seeded
    order; plain entries: the first 45,000 images, not augmented — ``train_plain_vgg.augment`` works on batches)."""

    name: str
    model: torch.nn.Module
    card: dict
    calib: DataLoader
    val: Dataset
    test: Dataset
    data_note: str
    train: Dataset | None = None


def _run_splits(card: dict):
    cfg = DataConfig(name=f"npz:{CIFAR_NPZ}", batch_size=256, eval_batch_size=500, val_fraction=0.1, augment=True,
                     seed=0)
    s = build_loaders(cfg, seed=0).splits
    mean = [float(v) for v in s.test.mean]
    if any(abs(a - b) > 1e-6 for a, b in zip(mean, card["normalisation"]["mean"])):
        raise RuntimeError(f"{card['name']}: rebuilt normalisation {mean} differs from the card's "
                           f"{card['normalisation']['mean']}: the data file or loader changed")
    return calibration_loader(s, cfg, 2048), s.val, s.test, s.train


_PLAIN_CACHE: dict = {}


def _plain_splits():
    if not _PLAIN_CACHE:
        d = load_cifar()
        ds = {k: TensorDataset(normalise(d[f"x_{k}"]), d[f"y_{k}"]) for k in ("train", "val", "test")}
        _PLAIN_CACHE.update(calib=DataLoader(Subset(ds["train"], range(2048)), batch_size=256), val=ds["val"],
                            test=ds["test"], train=ds["train"])
    return _PLAIN_CACHE["calib"], _PLAIN_CACHE["val"], _PLAIN_CACHE["test"], _PLAIN_CACHE["train"]


def available() -> bool:
    """The CIFAR-10 copy of ``../shared/data`` is present."""
    return Path(CIFAR_NPZ).is_file()


def load_network(name: str) -> ZooNetwork:
    """The zoo entry ``name`` with its calibration / validation / test data."""
    model, card = bsnn.zoo.load(name)
    model.eval()
    calib, val, test, train = _run_splits(card) if card.get("normalisation") else _plain_splits()
    return ZooNetwork(name, model, card, calib, val, test, card["data"], train)


def first(ds: Dataset, n: int, batch: int = 250) -> DataLoader:
    """A loader over the first ``n`` samples of ``ds``."""
    return DataLoader(Subset(ds, range(min(n, len(ds)))), batch_size=batch)


__all__ = ["ROOT", "ZooNetwork", "available", "first", "load_network"]
