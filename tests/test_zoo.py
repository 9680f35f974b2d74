"""Released models: every zoo entry loads from safetensors (hash checked, nothing unpickled), reproduces its card's
data-free check, and — where the CIFAR-10 archive is present — its card's accuracy; ``zoo:<name>`` works in the CLI."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import bsnn
from bsnn import zoo
from bsnn.cli import main
from bsnn.config import ModelConfig
from bsnn.errors import CheckpointError, ConfigError

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"
NAMES = zoo.names()


def test_the_zoo_releases_models_with_cards():
    assert {"cifar10_plain_bvgg", "cifar10_maxpool_vgg"} <= set(NAMES) and bsnn.zoo.list() == NAMES
    for name in NAMES:
        card = zoo.card(name)
        for key in ("arch", "sha256", "data", "ann", "snn", "cost", "training", "check"):
            assert key in card, (name, key)
        assert (zoo.ZOO_DIR / f"{name}.md").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_loads_and_reproduces_its_recorded_logits(name):
    model, card = zoo.load(name)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    check = card["check"]
    assert logits.argmax(1).tolist() == check["argmax"]
    assert float(logits.abs().sum()) == pytest.approx(check["logits_abs_sum"], rel=1e-4)
    if card["arch"].get("binary"):  # a binary student: its binary layers hold ±α only
        from bsnn.binary import is_binary

        assert any(is_binary(m) for m in model.modules())


def test_a_damaged_zoo_file_is_refused(tmp_path, monkeypatch):
    name = NAMES[0]
    for ext in ("safetensors", "json", "md"):
        shutil.copy(zoo.ZOO_DIR / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    data = bytearray((tmp_path / f"{name}.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / f"{name}.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="damaged or was edited"):
        zoo.load(name)


def test_unknown_zoo_names_are_refused_listing_the_released_ones(capsys):
    with pytest.raises(ConfigError, match="unknown zoo model 'nope'; released: cifar10"):
        zoo.load("nope")
    with pytest.raises(ConfigError, match="unknown zoo model"):
        ModelConfig(teacher="zoo:nope").validate()
    ModelConfig(teacher=f"zoo:{NAMES[0]}").validate()
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES)
    assert main(["zoo", "show", NAMES[0]]) == 0 and f"`{NAMES[0]}`" in capsys.readouterr().out
    assert main(["zoo", "show", "nope"]) == 2


needs_cifar = pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} absent")


def _cifar_test(n: int | None = None, card: dict | None = None):
    """The CIFAR-10 test images normalised as the card says (its recorded channel mean/std, else the constants of
    benchmarks/train_plain_vgg.py)."""
    import numpy as np

    d = np.load(CIFAR, allow_pickle=False)
    x = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).float() / 255.0
    norm = (card or {}).get("normalisation") or {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    x, y = (x - mean) / std, torch.from_numpy(d["y_test"]).long().flatten()
    return (x[:n], y[:n]) if n else (x, y)


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return 100.0 * (pred == y).sum().item() / len(y)


@needs_cifar
@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_accuracy_on_a_fixed_test_subset_is_its_card_s(name):
    model, card = zoo.load(name)
    assert _accuracy(model, *_cifar_test(500, card)) == pytest.approx(card["ann"]["test_acc_first_500"], abs=1e-6)


@pytest.mark.slow
@needs_cifar
@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_accuracy_on_the_full_test_set_is_its_card_s(name):
    model, card = zoo.load(name)
    assert _accuracy(model, *_cifar_test(None, card)) == pytest.approx(card["ann"]["test_acc"], abs=1e-6)


@needs_cifar
def test_cli_converts_and_simulates_a_zoo_model(tmp_path):
    out = tmp_path / "run"
    data = [f"data.name=npz:{CIFAR}", "data.limit_train=512", "data.limit_test=64", "convert.calib_samples=256",
            "convert.snn_calibration_samples=64"]
    assert main(["convert", "--model", "zoo:cifar10_maxpool_vgg", "--out", str(out), "--quiet", *data]) == 0
    assert main(["simulate", "--out", str(out), "--quiet", "--ann", "zoo:cifar10_maxpool_vgg", "--timesteps", "1,8",
                 *data]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["ann_accuracy"] is not None and set(sweep["accuracy"]) == {"1", "8"}
