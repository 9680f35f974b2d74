"""Tests of bsnn.data on small files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from bsnn import data as D
from bsnn.config import DataConfig
from bsnn.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------- writers


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_arrays(n: int, shape: tuple, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n, dtype=np.int64) % classes


def _write_mnist_dir(folder: Path, gz: bool, n_train: int = 60, n_test: int = 20) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = _fake_arrays(n_train, (28, 28), seed=1)
    x_te, y_te = _fake_arrays(n_test, (28, 28), seed=2)
    for stem, arr in zip(D.IDX_FILES, (x_tr, y_tr, x_te, y_te)):
        _write_idx(folder / stem, arr, gz)
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


def _write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        x, y = _fake_arrays(n, (3072,), seed=10 + i)
        with open(base / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": x,
                         b"filenames": [b"x.png"] * n}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch}, f)


@pytest.fixture(autouse=True)
def _no_system_fashion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never pick up a real Fashion-MNIST installed on the test machine."""
    monkeypatch.setattr(D, "FASHION_SYSTEM_DIR", str(tmp_path / "no-system-fashion"))


# --------------------------------------------------------------------------------------- helpers


def test_stratified_split_is_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(4), 50)
    kept, held = D.stratified_split(labels, 0.2, np.random.default_rng(0))
    assert len(set(kept) & set(held)) == 0 and sorted(np.concatenate([kept, held])) == list(range(200))
    assert np.bincount(labels[held]).tolist() == [10, 10, 10, 10]
    kept2, held2 = D.stratified_split(labels, 0.2, np.random.default_rng(0))
    assert np.array_equal(kept, kept2) and np.array_equal(held, held2)


def test_channel_stats_matches_numpy() -> None:
    x, _ = _fake_arrays(7, (3, 5, 5))
    mean, std = D.channel_stats(x)
    ref = x.astype(np.float64) / 255.0
    assert np.allclose(mean, ref.mean(axis=(0, 2, 3))) and np.allclose(std, ref.std(axis=(0, 2, 3)))


def test_array_dataset_normalises_and_crop_flip_is_deterministic() -> None:
    x, y = _fake_arrays(4, (3, 32, 32))
    ds = D.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    img, label = ds[1]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32) and label == 1 and isinstance(label, int)
    expected = (torch.from_numpy(x[1]).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(img, expected, atol=1e-6)
    aug = ds.subset([0, 1, 2, 3], augment="crop_flip")
    torch.manual_seed(3)
    a = [aug[i][0] for i in range(4)]
    torch.manual_seed(3)
    b = [aug[i][0] for i in range(4)]
    assert all(t.shape == (3, 32, 32) for t in a) and all(torch.equal(s, t) for s, t in zip(a, b))
    torch.manual_seed(0)
    assert any(not torch.equal(aug[0][0], ds[0][0]) for _ in range(10))


def test_array_dataset_rejects_bad_input() -> None:
    with pytest.raises(DataError):
        D.ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), (0.5,), (0.5,))
    with pytest.raises(ConfigError):
        D.ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), (0.5,),
                       (0.5,), augment="bogus")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        D.build_splits(DataConfig(name="nope"))
    for name in ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "npz:"):
        assert name in str(err.value)
    assert set(D.list_datasets()) >= {"mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                                      "imagefolder"}


# ------------------------------------------------------------------------------ bundled datasets


def _images_as_set(ds: D.ArrayDataset) -> set:
    return {bytes(row) for row in ds.images.reshape(len(ds), -1).numpy()}


def test_mnist5k_split() -> None:
    s = D.build_splits(DataConfig(name="mnist5k", seed=0))
    assert (len(s.train), len(s.val), len(s.test)) == (3600, 400, 1000)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, (28, 28))
    assert torch.bincount(s.test.labels).tolist() == [100] * 10
    assert torch.bincount(s.val.labels).tolist() == [40] * 10
    assert torch.bincount(s.train.labels).tolist() == [360] * 10
    tr, va, te = _images_as_set(s.train), _images_as_set(s.val), _images_as_set(s.test)
    assert len(tr) + len(va) + len(te) == 5000 and not (tr & va or tr & te or va & te)
    img, label = s.train[0]
    assert img.dtype == torch.float32 and img.shape == (1, 28, 28) and 0 <= label < 10
    assert s.train.augment == "none" and s.train.mean == (0.1307,) and s.train.std == (0.3081,)
    again = D.build_splits(DataConfig(name="mnist5k", seed=0))
    assert torch.equal(again.test.images, s.test.images) and torch.equal(again.train.labels, s.train.labels)
    other = D.build_splits(DataConfig(name="mnist5k", seed=1))
    assert not torch.equal(other.test.images, s.test.images)
    assert len(D.build_splits(DataConfig(name="mnist5k", val_fraction=0.25)).val) == 1000


def test_digits() -> None:
    s = D.build_splits(DataConfig(name="digits"))
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, (8, 8))
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert abs(len(s.test) - 0.2 * 1797) <= 10 and abs(len(s.val) - 0.1 * (1797 - len(s.test))) <= 10
    assert int(s.train.images.max()) == 255
    x = torch.stack([s.train[i][0] for i in range(len(s.train))])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_limits_are_seeded_subsets() -> None:
    cfg = DataConfig(name="digits", limit_train=50, limit_test=30)
    s, t = D.build_splits(cfg), D.build_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 30, 30)
    assert torch.equal(s.train.images, t.train.images)


# ----------------------------------------------------------------------------------- idx datasets


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sub", ["", "MNIST/raw"])
def test_mnist_idx(tmp_path: Path, gz: bool, sub: str) -> None:
    ref = _write_mnist_dir(tmp_path / sub, gz)
    s = D.build_splits(DataConfig(name="mnist", root=str(tmp_path), val_fraction=0.1))
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)  # round(0.1 * 6) = 1 val per class
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, (28, 28))
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(ref["x_test"]))
    assert s.test.labels.tolist() == ref["y_test"].tolist()
    img, label = s.test[3]
    expected = (torch.from_numpy(ref["x_test"][3]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(img[0], expected, atol=1e-5) and label == 3


def test_fashion_mnist_found_in_system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    _write_mnist_dir(system, gz=True)
    monkeypatch.setattr(D, "FASHION_SYSTEM_DIR", str(system))
    s = D.build_splits(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty")))
    assert len(s.test) == 20 and s.train.mean == (0.2860,) and s.train.std == (0.3530,)


def test_fashion_mnist_in_root(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(D.build_splits(DataConfig(name="fashion_mnist", root=str(tmp_path))).test) == 20


def test_missing_idx_lists_searched_dirs(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        D.build_splits(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert D.FASHION_SYSTEM_DIR in msg and "dataset-fashion-mnist" in msg and "data.download=true" in msg
    with pytest.raises(DataError) as err:
        D.build_splits(DataConfig(name="mnist", root=str(tmp_path)))
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)
    with pytest.raises(FileNotFoundError):  # DataError is a FileNotFoundError
        D.build_splits(DataConfig(name="mnist", root=None))


def test_corrupt_idx_is_data_error(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 60, 28, 28) + b"x")
    with pytest.raises(DataError, match="expected"):
        D.build_splits(DataConfig(name="mnist", root=str(tmp_path)))


# ------------------------------------------------------------------------------------------ npz


def test_npz_nhwc_rgb(tmp_path: Path) -> None:
    x_tr, y_tr = _fake_arrays(100, (32, 32, 3))
    x_te, y_te = _fake_arrays(30, (32, 32, 3), seed=5)
    path = tmp_path / "c.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr[:, None], x_test=x_te, y_test=y_te)
    s = D.build_splits(DataConfig(name=f"npz:{path}", val_fraction=0.2, augment=False))
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 30)
    assert (s.num_classes, s.in_channels, s.image_size, s.name) == (10, 3, (32, 32), f"npz:{path}")
    assert torch.equal(s.test.images, torch.from_numpy(x_te).permute(0, 3, 1, 2))
    x = torch.stack([s.train[i][0] for i in range(len(s.train))])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    aug = D.build_splits(DataConfig(name=f"npz:{path}", augment=True))
    assert aug.train.augment == "crop_flip" and aug.val.augment == "none" and aug.test.augment == "none"


def test_npz_nhw_grey(tmp_path: Path) -> None:
    x_tr, y_tr = _fake_arrays(40, (12, 12), classes=4)
    path = tmp_path / "g.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_tr[:8], y_test=y_tr[:8])
    s = D.build_splits(DataConfig(name=f"npz:{path}", augment=True))
    assert (s.num_classes, s.in_channels, s.image_size) == (4, 1, (12, 12)) and s.train.augment == "none"
    assert s.train[0][0].shape == (1, 12, 12)


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.npz"):
        D.build_splits(DataConfig(name=f"npz:{tmp_path / 'missing.npz'}"))
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2), x_test=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError) as err:
        D.build_splits(DataConfig(name=f"npz:{path}"))
    assert "y_test" in str(err.value) and "x_train" in str(err.value)


SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.mark.skipif(not SHARED_MNIST.is_file(), reason="shared data absent (only on the project's machines)")
def test_real_mnist_npz() -> None:
    s = D.build_splits(DataConfig(name=f"npz:{SHARED_MNIST}", limit_train=100))
    assert len(s.test) == 10000 and len(s.train) == 100 and s.image_size == (28, 28)
    assert abs(s.train.mean[0] - 0.1307) < 0.005


# ---------------------------------------------------------------------------------------- CIFAR


def test_cifar10_pickles(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    s = D.build_splits(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.1))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 3, (32, 32))
    assert s.train.augment == "crop_flip" and s.val.augment == "none"
    img, label = s.test[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 0
    assert s.test.mean == D.CIFAR10_STATS[0]


def test_cifar100_pickles(tmp_path: Path) -> None:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 200), ("test", 100)):
        x, y = _fake_arrays(n, (3072,), classes=100)
        with open(base / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()}, f)
    s = D.build_splits(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0.0, augment=False))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (200, 0, 100, 100)
    assert s.train.augment == "none"


def test_cifar_missing_and_unsafe_pickle(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        D.build_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "npz:" in str(err.value)
    _write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    with pytest.raises(DataError, match="refus"):
        D.build_splits(DataConfig(name="cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------------------------- ImageFolder


def _write_tree(root: Path, split: str, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / split / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_imagefolder_train_test(tmp_path: Path) -> None:
    _write_tree(tmp_path, "train", 10)
    _write_tree(tmp_path, "test", 3)
    s = D.build_splits(DataConfig(name="imagefolder", root=str(tmp_path), val_fraction=0.2))
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    assert (s.num_classes, s.in_channels, s.image_size) == (2, 3, (6, 10))
    img, label = s.val[0]
    assert img.shape == (3, 6, 10) and img.dtype == torch.float32 and label in (0, 1)


def test_imagefolder_train_val_test(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _write_tree(tmp_path, split, n)
    s = D.build_splits(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 6)


def test_imagefolder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        D.build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "nothing")))


# ---------------------------------------------------------------------------------------- loaders


def test_build_loaders_batches_and_determinism() -> None:
    cfg = DataConfig(name="digits", batch_size=32, eval_batch_size=100, limit_train=100)
    loaders = D.build_loaders(cfg, seed=3)
    x, y = next(iter(loaders.train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert isinstance(loaders.train_sampler, DistributedSampler) and len(loaders.train) == 4  # drop_last=False
    assert next(iter(loaders.test))[0].shape[0] == 100
    first = [yb.tolist() for _, yb in loaders.train]
    assert [yb.tolist() for _, yb in loaders.train] == first  # order is a function of (seed, epoch)
    loaders.train_sampler.set_epoch(1)
    assert [yb.tolist() for _, yb in loaders.train] != first  # the next epoch reshuffles
    again = [yb.tolist() for _, yb in D.build_loaders(cfg, seed=3).train]
    other = [yb.tolist() for _, yb in D.build_loaders(cfg, seed=4).train]
    assert first == again and first != other


def test_build_loaders_distributed(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loaders = D.build_loaders(DataConfig(name="digits", limit_train=64, batch_size=16), seed=1,
                                  distributed=True)
        assert isinstance(loaders.train_sampler, DistributedSampler)
        loaders.train_sampler.set_epoch(1)
        assert sum(len(yb) for _, yb in loaders.train) == 64
        assert sum(len(yb) for _, yb in loaders.val) == len(loaders.splits.val)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ bad archives (issue #12)


def _npz(path: Path, **over) -> Path:
    x_tr, y_tr = _fake_arrays(40, (8, 8), classes=4)
    x_te, y_te = _fake_arrays(12, (8, 8), classes=4, seed=3)
    arrays = dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    arrays.update(over)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("over, match", [
    (dict(y_test=np.array([0, 1, 2, 3] * 2 + [0, 1, 2, 57])), r"test label\(s\) \[57\] never occur in the train split"),
    (dict(y_train=np.arange(40) % 4 - 1), r"labels must be class indices >= 0; label 0 is -1"),
    (dict(y_train=(np.arange(40) % 4) + 0.5), r"whole class indices.*label 0 is 0.5"),
    (dict(y_train=np.full(40, np.nan)), r"whole class indices"),
    (dict(y_train=np.zeros(39, np.int64)), r"expected 40 labels"),
    (dict(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64)), r"the test split is empty"),
    (dict(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)), r"the train split is empty"),
    (dict(x_train=np.zeros((40, 1, 8, 8), np.uint8)), r"look channels-first \(NCHW\).*transpose\(0, 2, 3, 1\)"),
    (dict(x_train=np.zeros((40, 8, 8), np.float32)), r"images must be uint8"),
    (dict(y_train=np.array([{"a": 1}] * 40, dtype=object)), r"'y_train' cannot be loaded without pickle"),
])
def test_bad_npz_is_a_data_error(tmp_path: Path, over: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        D.build_splits(DataConfig(name=f"npz:{_npz(tmp_path / 'a.npz', **over)}"))


def test_float_whole_labels_are_accepted(tmp_path: Path) -> None:
    s = D.build_splits(DataConfig(name=f"npz:{_npz(tmp_path / 'a.npz', y_train=(np.arange(40) % 4).astype(float))}"))
    assert s.num_classes == 4 and s.train.labels.dtype == torch.int64


def test_non_archive_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz archive"):
        D.build_splits(DataConfig(name=f"npz:{tmp_path / 'text.npz'}"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        D.build_splits(DataConfig(name=f"npz:{tmp_path / 'one.npy'}"))
    with pytest.raises(DataError, match="holds out all"):
        D.build_splits(DataConfig(name=f"npz:{_npz(tmp_path / 'a.npz', x_train=np.zeros((1, 8, 8), np.uint8), y_train=np.zeros(1, np.int64), y_test=np.zeros(12, np.int64))}", val_fraction=0.9))


class _Code:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_cifar_batch_with_code_or_garbage_is_a_data_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": _Code(), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_2: refused to load: refusing to load posix.getcwd"):
        D.build_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    batch.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        D.build_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}))
    with pytest.raises(DataError, match=r"train label 11 is out of range: cifar10 has 10 classes"):
        D.build_splits(DataConfig(name="cifar10", root=str(tmp_path)))


def test_unpack_batch() -> None:
    x, y = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    assert D.unpack_batch((x, y), "t")[2] is None
    with pytest.raises(ConfigError, match=r"t: batch 3 is a dict with keys \['image', 'label'\]"):
        D.unpack_batch({"image": x, "label": y}, "t", 2)
    with pytest.raises(ConfigError, match="labels must be an integer tensor"):
        D.unpack_batch((x, y.float()), "t")
    with pytest.raises(DataError, match="labels must be class indices >= 0"):
        D.unpack_batch((x, torch.tensor([0, -1])), "t")
    with pytest.raises(DataError, match="1 input value"):
        D.unpack_batch((x.index_fill(0, torch.tensor([1]), float("nan"))[:, :, :1, :1].clone(), y), "t")
    assert D.unpack_batch(x, "t", labels=False)[0] is x


def test_airbench_augmentation_translates_by_reflection_and_alternates_the_flip() -> None:
    x, y = _fake_arrays(6, (3, 32, 32))
    ds = D.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), (0.5,) * 3, (0.25,) * 3)
    aug = ds.subset(range(6), augment="airbench")
    assert aug.epoch_dependent and not ds.epoch_dependent
    plain = [ds[i][0] for i in range(6)]
    # every output is one of the 25 reflect-padded crops (shifts -2..2), and all 25 occur
    padded = torch.nn.functional.pad(plain[0][None], (2,) * 4, mode="reflect")[0]
    crops = [padded[:, t:t + 32, s:s + 32] for t in range(5) for s in range(5)]
    seen = set()
    torch.manual_seed(0)
    for _ in range(400):
        img = aug[0][0]
        img = img if bool(aug.start_flipped[0]) is False else img.flip(-1)
        match = [k for k, c in enumerate(crops) if torch.equal(img, c)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(25))
    # alternating flip: the same draws mirrored in the next epoch; a fixed half starts mirrored, on every subset
    for epoch in (0, 2):
        aug.set_epoch(epoch)
        torch.manual_seed(7)
        even = [aug[i][0] for i in range(6)]
        aug.set_epoch(epoch + 1)
        torch.manual_seed(7)
        odd = [aug[i][0] for i in range(6)]
        assert all(torch.equal(a.flip(-1), b) for a, b in zip(even, odd))
    assert torch.equal(ds.subset(range(6), augment="airbench").start_flipped, aug.start_flipped)
    assert 0 < int(aug.start_flipped.sum()) < 6


def test_augmentation_choice_reaches_the_train_split_only(tmp_path: Path) -> None:
    x, y = _fake_arrays(40, (32, 32, 3))
    path = tmp_path / "c.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    s = D.build_splits(DataConfig(name=f"npz:{path}", augmentation="airbench"))
    assert s.train.augment == "airbench" and s.val.augment == "none" and s.test.augment == "none"
    loaders = D.build_loaders(DataConfig(name=f"npz:{path}", augmentation="airbench", num_workers=1))
    assert not loaders.train.persistent_workers and loaders.test.persistent_workers  # fresh workers see the epoch
    with pytest.raises(ConfigError, match="data.augmentation must be one of"):
        DataConfig(augmentation="none").validate()
