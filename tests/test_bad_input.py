"""A table of bad inputs (issue #12): each gives a bsnn error and leaves the run folder as it was.

Every row feeds one bad input through the command line (``bsnn.cli.main([...])`` in-process) or the Python API.
A CLI row must exit with code 2 and print exactly one ``bsnn: error: ...`` line (no traceback) matching the row's
pattern, which names what is wrong (and, in most rows, what to do); an API row must raise a one-line ``BsnnError``
that matches. A second test runs the same rows and lists and hashes the working folder (config, any run folder, the
command's output folder) before and after: a refused input must leave it as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bsnn.cli import main
from bsnn.config import BinaryConfig, ConvertConfig, DataConfig, TrainConfig, load_config
from bsnn.convert import capture, convert, convert_with_thresholds
from bsnn.convert.balance import balanced_thresholds
from bsnn.convert.graph import activation_modules
from bsnn.data import build_splits, calibration_loader
from bsnn.errors import BsnnError
from bsnn.hardware import estimate
from bsnn.hardware.mapping import LayerSpec, load_layer_table
from bsnn.io import load_checkpoint, save_checkpoint
from bsnn.pipeline import build_model, load_snn, save_model, save_snn
from bsnn.simulate import simulate
from bsnn.train import evaluate, train_student, train_teacher

CONFIG = """run: {device: cpu, quiet: true}
data: {name: digits, batch_size: 64, eval_batch_size: 256}
model: {teacher: small_cnn, kwargs: {width: 4, hidden: 16}}
train: {epochs: 1}
student: {epochs: 1}
convert: {calib_samples: 64}
simulate: {timesteps: [1, 2], kernel: torch}
cost: {enabled: false}
"""
ARCH = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "kwargs": {"width": 4, "hidden": 16},
        "binary": dataclasses.asdict(BinaryConfig()), "activation": {"kind": "relu", "clip": 4.0, "levels": 8}}
#: an architecture whose weights would need ~97 GB (small_cnn at width 2**14: conv2 alone 19 GB, conv3 77 GB); its row
#: runs in a child process whose address space is capped (:data:`ISOLATED_LIMIT_BYTES`), so an unchecked build fails
#: at its first large allocation without touching memory
HUGE_ARCH = {**ARCH, "kwargs": {"width": 2 ** 14, "hidden": 16}}
ISOLATED_LIMIT_BYTES = 8 * 2 ** 30
CSV_HEADER = "name,in_channels,out_channels,in_size,out_size,kernel\n"
CSV_OK = CSV_HEADER + "conv1,1,8,8,8,3\nconv2,8,8,8,4,3\nfc,128,10,1,1,1\n"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")


# ------------------------------------------------------------------------------------------------ assets
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH).eval()


def _broken(kind: str) -> torch.nn.Module:
    """The asset model with one NaN weight (``nan``) or one infinite bias (``inf``)."""
    m = _model()
    with torch.no_grad():
        if kind == "nan":
            m.conv2.weight.view(-1)[0] = float("nan")
        else:
            m.bn1.bias[0] = float("inf")
    return m


def _npz(path: Path, **over) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 4,
                  x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 4)
    arrays.update(over)
    np.savez(path, **arrays)
    return path


class _Code:
    """Pickles as a call of ``os.getcwd`` (harmless if it were run; bsnn must refuse it unrun)."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def _cifar_root(root: Path, poison: bytes | None) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                                                b"labels": list(range(10))}))
    (base / "data_batch_3").write_bytes(poison)
    return root


def _snn_file(src: Path, dst: Path, value: float) -> Path:
    """A copy of the snn.pt ``src`` whose first IF layer's threshold is ``value`` (NaN / inf)."""
    ck = load_checkpoint(src)
    first = next(iter(ck["snn_meta"]["thresholds"]))
    ck["snn_meta"]["thresholds"][first] = value
    save_checkpoint(ck, dst)
    return dst


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Read-only files the rows point at (never inside a row's working folder)."""
    a = tmp_path_factory.mktemp("assets")
    save_model(a / "student.pt", _model(), ARCH)
    save_model(a / "nan.pt", _broken("nan"), ARCH)
    save_model(a / "infbias.pt", _broken("inf"), ARCH)
    save_checkpoint({"arch": {}, "state_dict": {}}, a / "arch_empty.pt")
    save_checkpoint({"arch": HUGE_ARCH, "state_dict": {}}, a / "huge.pt")
    splits = build_splits(DataConfig(name="digits"))
    snn = convert(_model(), calibration_loader(splits, DataConfig(name="digits"), 64), ConvertConfig())
    save_snn(a / "snn.pt", snn, ARCH)
    _snn_file(a / "snn.pt", a / "snn_nan.pt", float("nan"))
    _snn_file(a / "snn.pt", a / "snn_inf.pt", float("inf"))
    # data files
    _npz(a / "label57.npz", y_test=np.array([0, 1, 2, 3] * 2 + [0, 1, 2, 57]))
    _npz(a / "empty_test.npz", x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64))
    _npz(a / "empty_train.npz", x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64))
    _npz(a / "float_labels.npz", y_train=(np.arange(40) % 4) + 0.25)
    _npz(a / "neg_labels.npz", y_train=np.arange(40) % 4 - 1)
    _npz(a / "object.npz", y_train=np.array([[1, 2], [3]] * 20, dtype=object))
    _npz(a / "pickled.npz", x_train=np.array([{"image": 1}] * 40, dtype=object))
    _npz(a / "nchw.npz", x_train=np.zeros((40, 1, 8, 8), np.uint8), x_test=np.zeros((12, 1, 8, 8), np.uint8))
    _npz(a / "float_images.npz", x_train=np.zeros((40, 8, 8), np.float32))
    (a / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    _cifar_root(a / "cifar_code", pickle.dumps({b"data": _Code(), b"labels": []}))
    _cifar_root(a / "cifar_garbage", b"\x80\x04\x95garbage")
    _cifar_root(a / "cifar_labels", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 12]}))
    (a / "mnist_bad").mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (a / "mnist_bad" / stem).write_bytes(b"\x00\x00\x08\x03\x00")  # truncated header
    (a / "binary.yaml").write_bytes(b"\x80\x04\x95\xff\xfe\x00 pickled bytes, not YAML")
    (a / "list.yaml").write_text("- train\n- data\n")
    # layer tables
    (a / "ok.csv").write_text(CSV_OK)
    (a / "extra.csv").write_text(CSV_OK.replace("kernel\n", "kernel,stride\n").replace(",3\n", ",3,1\n")
                                 .replace(",1\n", ",1,1\n"))
    (a / "ragged.csv").write_text(CSV_HEADER + "conv1,1,8,8,8\n")
    (a / "fraction.csv").write_text(CSV_HEADER + "conv1,1,8,2.5,8,3\n")
    (a / "binary.csv").write_bytes(b"\xff\xfe\x00\x01binary")
    (a / "negative.csv").write_text(CSV_HEADER + "conv1,-1,8,8,8,3\n")
    # a finished run (1 epoch each, tiny model) that rows copy to <work>/run; and a folder holding only an snn.pt
    # with a NaN threshold, for `bsnn cost --run`
    _write(a / "cfg.yaml", CONFIG)
    cwd = os.getcwd()
    os.chdir(a)  # run.out_dir = "run", as in the rows (which work in <work>/run)
    try:
        assert main(["run", "--config", "cfg.yaml", "--out", "run", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    (a / "nan_snn_folder").mkdir()
    shutil.copy(a / "snn_nan.pt", a / "nan_snn_folder" / "snn.pt")
    return a


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ loaders
def _loader(n: int = 16, shape=(1, 8, 8), labels=None, x=None) -> DataLoader:
    torch.manual_seed(1)
    x = torch.randn(n, *shape) if x is None else x
    y = torch.arange(n) % 10 if labels is None else labels
    return DataLoader(TensorDataset(x, y), batch_size=8)


class _Batches:
    """An iterable of given batches, with a ``dataset`` of the right length (as calibration wants)."""

    def __init__(self, *batches, dataset: list | None = None) -> None:
        self.batches = list(batches)
        self.dataset = dataset if dataset is not None else \
            list(range(sum(len(b[0]) if isinstance(b, (tuple, list)) else 8 for b in batches)))

    def __iter__(self):
        return iter(self.batches)


def _dicts(n: int = 2):
    """A loader yielding ``{'image', 'label'}`` dicts over a dataset of such dicts (Hugging Face style)."""
    item = {"image": torch.randn(1, 8, 8), "label": 0}
    return _Batches(*[{"image": torch.randn(8, 1, 8, 8), "label": torch.zeros(8, dtype=torch.long)}] * n,
                    dataset=[item] * 8 * n)


def _nan_inputs() -> DataLoader:
    x = torch.randn(16, 1, 8, 8)
    x[3, 0, 2, 2] = float("nan")
    return _loader(x=x)


def _snn(assets: Path):
    return load_snn(assets / "snn.pt")[0]


def _gm():
    return capture(_model(), torch.zeros(2, 1, 8, 8))


def _layers() -> list[LayerSpec]:
    return [LayerSpec("conv1", 1, 8, (3, 3), (8, 8), (8, 8), analog_input=True), LayerSpec("fc", 8, 10, kind="linear")]


# ------------------------------------------------------------------------------------------------ the table
@dataclasses.dataclass
class Row:
    """One bad input: ``cli`` argv (``{A}`` = the assets folder) or an ``api`` callable of the assets folder."""

    id: str
    match: str
    cli: list[str] | None = None
    api: Callable[[Path], object] | None = None
    run: str | None = None  # an assets run folder copied to <work>/run first
    isolated: bool = False  # run the command in a child process with a capped address space


def _cli(*argv: str) -> list[str]:
    """A command run with the working folder's tiny digits config."""
    return [*argv, "--config", "cfg.yaml"]


ROWS = [
    # ---- §5 non-finite values
    Row("convert-nan-weight", r"calibration: layer 'conv2' \(weight\) holds NaN or infinite values.*retrain",
        cli=_cli("convert", "--model", "{A}/nan.pt", "--out", "run")),
    Row("convert-inf-bias", r"layer 'bn1' \(bias\) holds NaN or infinite values",
        cli=_cli("convert", "--model", "{A}/infbias.pt", "--out", "run")),
    Row("distill-nan-teacher-into-run", r"the loss became nan at epoch 1, batch 1",
        cli=_cli("distill", "--out", "run", "--teacher", "{A}/nan.pt"), run="run"),
    Row("evaluate-nan-weight", r"evaluate: the model's loss is not finite: parameter\(s\) conv2.weight hold NaN",
        cli=_cli("evaluate", "{A}/nan.pt")),
    Row("simulate-nan-threshold-into-run", r"threshold of layer '\w+' holds 1 NaN or infinite value",
        cli=_cli("simulate", "--out", "run", "--snn", "{A}/snn_nan.pt"), run="run"),
    Row("cost-run-nan-threshold", r"threshold of layer '\w+' holds 1 NaN",
        cli=["cost", "--run", "{A}/nan_snn_folder", "--out", "cost", "--mode", "dense"]),
    Row("simulate-inf-threshold-file", r"threshold of layer '\w+' holds 1 NaN or infinite",
        cli=_cli("simulate", "--snn", "{A}/snn_inf.pt", "--out", "run")),
    Row("api-convert-nan-weight", r"layer 'conv2' \(weight\) holds NaN",
        api=lambda a: convert(_broken("nan"), _loader())),
    Row("api-convert-nan-calibration-inputs", r"calibration: batch 1: 1 input value\(s\) are NaN or infinite",
        api=lambda a: convert(_model(), _nan_inputs())),
    Row("api-thresholds-non-finite", r"threshold of layer 'relu1'.*NaN or infinite",
        api=lambda a: balanced_thresholds({"relu1": torch.tensor(float("nan"))})),
    Row("api-surgery-inf-threshold", r"threshold of layer '\w+' holds 1 NaN or infinite",
        api=lambda a: convert_with_thresholds(_gm(), _relu_thresholds(float("inf")), ConvertConfig(), [1, 8, 8])),
    Row("api-evaluate-nan-weight", r"parameter\(s\) conv2.weight hold NaN",
        api=lambda a: evaluate(_broken("nan"), _loader())),
    Row("api-evaluate-nan-inputs", r"evaluate: batch 1: 1 input value\(s\) are NaN",
        api=lambda a: evaluate(_model(), _nan_inputs())),
    Row("api-simulate-nan-inputs", r"simulate: batch 1: 1 input value\(s\) are NaN",
        api=lambda a: simulate(_snn(a), _nan_inputs(), [1, 2], quiet=True)),
    Row("api-train-nan-inputs", r"teacher: batch 1: 1 input value\(s\) are NaN",
        api=lambda a: train_teacher(_model(), _nan_inputs(), TrainConfig(epochs=1))),
    # ---- §7 silently wrong values
    Row("cost-timesteps-0", r"--timesteps must be an integer >= 1, got 0",
        cli=["cost", "--layers", "{A}/ok.csv", "--timesteps", "0", "--out", "cost"]),
    Row("cost-run-timesteps-0", r"--timesteps must be an integer >= 1, got 0",
        cli=["cost", "--run", "run", "--timesteps", "0", "--out", "run/cost"], run="run"),
    Row("cost-ann-bits-0", r"ann_bits .* must be a positive integer",
        cli=["cost", "--layers", "{A}/ok.csv", "--timesteps", "4", "--ann-bits", "0", "--out", "cost"]),
    Row("cost-run-ann-bits-0", r"ann_bits .* must be a positive integer",
        cli=["cost", "--run", "run", "--ann-bits", "0", "--out", "run"], run="run"),
    Row("simulate-max-samples-negative", r"simulate.max_samples must be a positive number of samples",
        cli=_cli("simulate", "--out", "run", "simulate.max_samples=-1"), run="run"),
    Row("evaluate-run-student-on-label-57", r"test label\(s\) \[57\] never occur in the train split",
        cli=["evaluate", "run/student.pt", "--config", "cfg.yaml", "data.name=npz:{A}/label57.npz"], run="run"),
    Row("convert-run-on-other-data", r"was made with other data settings",
        cli=_cli("convert", "--out", "run", "data.name=npz:{A}/float_images.npz"), run="run"),
    Row("run-timesteps-bool", r"simulate.timesteps must be a list of positive integers",
        cli=_cli("run", "--out", "run", "simulate.timesteps=[true]")),
    Row("simulate-timesteps-0", r"simulate.timesteps must be a list of positive integers",
        cli=_cli("simulate", "--out", "run", "--timesteps", "0,4")),
    Row("train-npz-test-label-57", r"test label\(s\) \[57\] never occur in the train split",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/label57.npz")),
    Row("train-npz-empty-test", r"the test split is empty",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/empty_test.npz")),
    Row("train-npz-empty-train", r"the train split is empty",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/empty_train.npz")),
    Row("train-npz-float-labels", r"labels must be whole class indices.*label 0 is 0.25.*store integer labels",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/float_labels.npz")),
    Row("train-limit-train-0", r"data.limit_train must be a positive number of samples",
        cli=_cli("train", "--out", "run", "data.limit_train=0")),
    Row("evaluate-empty-val-split", r"evaluate: the loader yielded no samples",
        cli=["evaluate", "{A}/student.pt", "--split", "val", "--config", "cfg.yaml", "data.val_fraction=0"]),
    Row("cost-csv-extra-column", r"unknown column\(s\) \['stride'\]; valid columns",
        cli=["cost", "--layers", "{A}/extra.csv", "--timesteps", "4", "--out", "cost"]),
    Row("cost-csv-ragged-row", r"row 1 has fewer values than the 6 columns",
        cli=["cost", "--layers", "{A}/ragged.csv", "--timesteps", "4", "--out", "cost"]),
    Row("cost-csv-fractional-size", r"in_size: expected a size like 32 or 32x16, got '2.5'",
        cli=["cost", "--layers", "{A}/fraction.csv", "--timesteps", "4", "--out", "cost"]),
    Row("cost-csv-binary-file", r"is not a text \(UTF-8\) CSV file",
        cli=["cost", "--layers", "{A}/binary.csv", "--timesteps", "4", "--out", "cost"]),
    Row("cost-csv-negative-channels", r"channels and groups must be >= 1",
        cli=["cost", "--layers", "{A}/negative.csv", "--timesteps", "4", "--out", "cost"]),
    Row("api-estimate-ann-bits-0", r"ann_bits .* must be a positive integer",
        api=lambda a: estimate(_layers(), timesteps=4, ann_bits=0)),
    Row("api-estimate-timesteps-bool", r"timesteps must be a positive integer",
        api=lambda a: estimate(_layers(), timesteps=True)),
    Row("api-simulate-timesteps-bool", r"simulate.timesteps must be a list of positive integers",
        api=lambda a: simulate(_snn(a), _loader(), [True], quiet=True)),
    Row("api-layer-table-extra-column", r"unknown column\(s\) \['stride'\]",
        api=lambda a: load_layer_table(a / "extra.csv")),
    Row("api-evaluate-empty-loader", r"evaluate: the loader yielded no samples",
        api=lambda a: evaluate(_model(), [])),
    Row("api-train-empty-loader", r"the training loader yielded no batch",
        api=lambda a: train_teacher(_model(), [], TrainConfig(epochs=1))),
    # ---- §8 tracebacks where a bsnn error belongs
    Row("train-npz-object-member", r"member 'y_train' cannot be loaded without pickle",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/object.npz")),
    Row("train-npz-pickled-member", r"member 'x_train' cannot be loaded without pickle",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/pickled.npz")),
    Row("train-npz-corrupt", r"is not a readable .npz archive",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/corrupt.npz")),
    Row("train-npz-nchw", r"look channels-first \(NCHW\).*store x.transpose\(0, 2, 3, 1\)",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/nchw.npz")),
    Row("train-npz-float-images", r"images must be uint8",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/float_images.npz")),
    Row("train-npz-negative-labels", r"labels must be class indices >= 0; label 0 is -1",
        cli=_cli("train", "--out", "run", "data.name=npz:{A}/neg_labels.npz")),
    Row("train-cifar-batch-with-code", r"data_batch_3: refused to load: refusing to load posix.getcwd",
        cli=_cli("train", "--out", "run", "data.name=cifar10", "data.root={A}/cifar_code")),
    Row("train-cifar-garbage-batch", r"data_batch_3 is not a CIFAR python batch",
        cli=_cli("train", "--out", "run", "data.name=cifar10", "data.root={A}/cifar_garbage")),
    Row("train-cifar-label-out-of-range", r"train label 12 is out of range: cifar10 has 10 classes",
        cli=_cli("train", "--out", "run", "data.name=cifar10", "data.root={A}/cifar_labels")),
    Row("train-mnist-truncated-idx", r"is not an idx file of unsigned bytes",
        cli=_cli("train", "--out", "run", "data.name=mnist", "data.root={A}/mnist_bad")),
    Row("run-binary-config", r"config file '.*binary.yaml' is not a text file",
        cli=["run", "--out", "run", "--config", "{A}/binary.yaml"]),
    Row("run-config-not-a-mapping", r"must hold a mapping of sections",
        cli=["run", "--out", "run", "--config", "{A}/list.yaml"]),
    Row("train-lr-inf", r"train.lr: expected a finite number, got inf",
        cli=_cli("train", "--out", "run", "train.lr=.inf")),
    Row("train-lr-nan", r"train.lr: expected a finite number, got nan",
        cli=_cli("train", "--out", "run", "train.lr=.nan")),
    Row("train-betas-out-of-range", r"betas must be two numbers in \[0, 1\)",
        cli=_cli("train", "--out", "run", "train.betas=[2,3]")),
    Row("train-momentum-out-of-range", r"momentum must be in \[0, 1\)",
        cli=_cli("train", "--out", "run", "train.optimizer=sgd", "train.momentum=2")),
    Row("convert-threshold-scale-inf", r"convert.threshold_scale: expected a finite number",
        cli=_cli("convert", "--out", "run", "convert.threshold_scale=.inf"), run="run"),
    Row("convert-arch-empty", r"architecture record \('arch'\) must name name, num_classes, in_channels, got \{\}",
        cli=_cli("convert", "--model", "{A}/arch_empty.pt", "--out", "run")),
    Row("convert-huge-arch", r"weights do not fit architecture 'small_cnn': the record asks for [\d,]+ parameters "
                             r"and buffers \(96.7 GB\).*nothing was built",
        cli=_cli("convert", "--model", "{A}/huge.pt", "--out", "run"), isolated=True),
    Row("api-train-negative-labels", r"labels must be class indices >= 0, got -1",
        api=lambda a: train_teacher(_model(), _loader(labels=torch.arange(16) % 10 - 1), TrainConfig(epochs=1))),
    Row("api-train-label-beyond-outputs", r"label 57 is out of range for the model's outputs",
        api=lambda a: train_teacher(_model(), _loader(labels=torch.full((16,), 57)), TrainConfig(epochs=1))),
    Row("api-evaluate-label-beyond-outputs", r"label 57 is out of range for a model with 10 outputs",
        api=lambda a: evaluate(_model(), _loader(labels=torch.full((16,), 57)))),
    Row("api-train-dict-batches", r"teacher: batch 1 is a dict with keys \['image', 'label'\]",
        api=lambda a: train_teacher(_model(), _dicts(), TrainConfig(epochs=1))),
    Row("api-train-student-dict-batches", r"dataset items must be .* got a dict with keys \['image', 'label'\]",
        api=lambda a: train_student(binarized(), _model(), _dicts())),
    Row("api-train-student-dict-items", r"dataset items must be \(input tensor \[C, H, W\], label\) pairs, got a dict",
        api=lambda a: train_student(binarized(), _model(), _Batches(dataset=[{"image": torch.zeros(1, 8, 8)}]))),
    Row("api-evaluate-dict-batches", r"evaluate: batch 1 is a dict",
        api=lambda a: evaluate(_model(), _dicts())),
    Row("api-simulate-dict-batches", r"simulate: batch 1 is a dict",
        api=lambda a: simulate(_snn(a), _dicts(), [1], quiet=True)),
    Row("api-convert-dict-batches", r"dict|no samples",
        api=lambda a: convert(_model(), _dicts())),
    Row("api-convert-empty-loader", r"yielded no samples",
        api=lambda a: convert(_model(), [])),
    Row("api-calibration-batch-wrong-channels", r"calibration: batch 2 has inputs of shape \(3, 8, 8\), the first "
                                                r"batch \(1, 8, 8\)",
        api=lambda a: convert(_model(), _Batches((torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)),
                                                 (torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))))),
    Row("api-calibration-first-batch-wrong-channels", r"fails on a calibration sample of shape \(3, 8, 8\).*"
                                                      r"expected input.*to have 1 channels",
        api=lambda a: convert(_model(), _loader(shape=(3, 8, 8)))),
    Row("api-train-lr-inf", r"lr must be a finite number, got inf",
        api=lambda a: train_teacher(_model(), _loader(), TrainConfig(lr=float("inf")))),
    Row("api-train-betas", r"betas must be two numbers in \[0, 1\)",
        api=lambda a: train_teacher(_model(), _loader(), TrainConfig(betas=(2, 3)))),
]


def binarized() -> torch.nn.Module:
    torch.manual_seed(2)
    return build_model(ARCH)


def _relu_thresholds(value: float) -> dict:
    return {k: torch.tensor(value) for k in activation_modules(_gm())}


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ISOLATED_LIMIT_BYTES, ISOLATED_LIMIT_BYTES))


def _isolated(argv: list[str]) -> tuple[int, str]:
    """``bsnn argv`` in a child process (in the current folder) whose address space is capped: ``(rc, stderr)``."""
    code = "import sys; from bsnn.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=_cap_address_space)
    return proc.returncode, proc.stderr


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: sha256 for files, ``<dir>`` for folders."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>")
            for p in sorted(root.rglob("*"))}


def _params():
    for row in ROWS:
        yield pytest.param(row, id=row.id)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row", list(_params()))
def test_bad_input_is_a_bsnn_error(row: Row, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys) -> None:
    """CLI: exit code 2, one ``bsnn: error:`` line matching the row, no traceback; API: a BsnnError that matches."""
    _check_row(row, assets, tmp_path, monkeypatch, capsys, folder=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row", list(_params()))
def test_bad_input_leaves_the_run_folder_as_it_was(row: Row, assets: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The same rows: the working folder (config, run folder, output folder) is byte for byte as it was."""
    _check_row(row, assets, tmp_path, monkeypatch, capsys, folder=True)


def _check_row(row: Row, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, folder: bool) -> None:
    work = tmp_path / "work"
    work.mkdir()
    _write(work / "cfg.yaml", CONFIG)
    if row.run is not None:
        shutil.copytree(assets / row.run, work / "run")
    monkeypatch.chdir(work)
    before = _snapshot(work)
    if row.cli is not None:
        argv = [a.replace("{A}", str(assets)) for a in row.cli]
        if row.isolated:
            rc, err = _isolated(argv)
        else:
            capsys.readouterr()
            rc = main(argv)
            err = capsys.readouterr().err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
        assert rc == 2, f"exit code {rc}; stderr:\n{err}"
        assert len(lines) == 1 and lines[0].startswith("bsnn: error: "), err
        assert re.search(row.match, lines[0]), lines[0]
    else:
        with pytest.raises(BsnnError) as e:
            row.api(assets)
        assert re.search(row.match, str(e.value)), str(e.value)
        assert "\n" not in str(e.value), str(e.value)
    if folder:
        assert _snapshot(work) == before, "the working folder changed"


def test_the_table_is_large_enough() -> None:
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)
    assert sum(r.cli is not None for r in ROWS) >= 20 and sum(r.api is not None for r in ROWS) >= 20


def test_yaml_12_float_on_the_command_line_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.lr=1e30`` is a number (YAML 1.2), not the string '1e30' refused as "expected a number"."""
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["train.lr=1e30", "student.lr=2E-3"]).train.lr == 1e30
