"""The models people bring: torchvision's classification architectures convert with the default
``ConvertConfig()`` and their SNN's time-averaged output converges to the ANN's logits; a user's state-dict file
goes through ``bsnn convert --arch torchvision:... --weights ...``, ``bsnn simulate`` and ``bsnn cost``; a
torchvision teacher and student work in ``bsnn run``; unsupported ops are refused before calibration."""

import json
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.cli import main
from bsnn.config import ConvertConfig
from bsnn.convert import convert
from bsnn.convert.graph import supported_operations_markdown
from bsnn.errors import ConversionError
from bsnn.models import create_model
from bsnn.simulate import run_batch

torchvision = pytest.importorskip("torchvision")

TS = (16, 64, 256, 1024)


def _settled(name: str, in_channels: int = 3, size: int = 32) -> nn.Module:
    """torchvision ``name`` at random init, 10 classes, BatchNorm statistics settled on random data."""
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=10, in_channels=in_channels)
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, in_channels, size, size, generator=g))
    return model.eval()


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=16)


def _assert_converges(name: str) -> None:
    """The conversion error: measured on calibration images, whose activations the thresholds cover, the SNN's
    time-averaged output must approach the ANN's logits (< 2 % at T = 1024). On other random images the error
    also falls with T but levels off where their activations exceed every calibration image's (clipping; the
    held-out errors are in ``benchmarks/results/torchvision_conversion.md``)."""
    ann = _settled(name)
    x = torch.randn(36, 3, 32, 32)
    snn = convert(ann, _loader(x[:32]), ConvertConfig())  # the default recipe (calibration on 32 images)
    for images, limit in ((x[:4], 0.02), (x[32:], None)):
        logits = ann(images).detach()
        mem = run_batch(snn, images, max(TS), 64)
        err = [((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in TS]
        assert all(a > b for a, b in zip(err, err[1:])), dict(zip(TS, err))
        assert limit is None or err[-1] < limit, dict(zip(TS, err))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_converges_to_its_ann(name):
    _assert_converges(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg11_bn", "densenet121"])
def test_large_torchvision_model_converges_to_its_ann(name):
    _assert_converges(name)


@pytest.mark.parametrize("module, what", [(nn.SiLU(), "SiLU"), (nn.GELU(), "GELU"), (nn.Sigmoid(), "Sigmoid"),
                                          (nn.LayerNorm([4, 6, 6]), "LayerNorm"),
                                          (nn.Upsample(scale_factor=1), "Upsample"),
                                          (nn.LeakyReLU(), "LeakyReLU")])
def test_unsupported_ops_are_refused_before_calibration(module, what, monkeypatch):
    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the unsupported op was refused")

    monkeypatch.setattr(sys.modules["bsnn.convert"], "calibrate_many", no_calibration)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), module, nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ConversionError, match=rf"unsupported module {what} at module '1'.*supported modules:"):
        convert(net.eval(), _loader(torch.randn(8, 3, 8, 8)))


def test_multi_head_attention_is_refused_naming_the_op():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            h = self.attn(x, x, x)[0]
            return self.fc(torch.relu(h).mean(1))

    with pytest.raises(ConversionError, match="MultiheadAttention|unsupported"):
        convert(Attn().eval(), _loader(torch.randn(8, 4, 8)))


def test_torchvision_efficientnet_is_refused_naming_silu():
    model = create_model("torchvision:efficientnet_b0", num_classes=10).eval()
    with pytest.raises(ConversionError, match="unsupported module SiLU"):
        convert(model, _loader(torch.randn(4, 3, 32, 32)))


def test_docs_list_of_supported_ops_is_the_code_s():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "conversion.md").read_text()
    block = doc.split("<!-- supported-ops:start -->\n")[1].split("\n<!-- supported-ops:end -->")[0]
    assert block == supported_operations_markdown(), "regenerate with: bsnn convert --list-ops"


def test_cli_converts_a_users_torchvision_checkpoint_then_simulates_and_costs(tmp_path, capsys):
    ann = _settled("resnet18", in_channels=1, size=8)
    weights = tmp_path / "my_resnet18.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ann.state_dict().items()}}, weights)
    out = tmp_path / "run"
    common = ["--out", str(out), "--quiet", "data.name=digits", "convert.calib_samples=64",
              "convert.snn_calibration_samples=16"]
    assert main(["convert", "--arch", "torchvision:resnet18", "--weights", str(weights), *common]) == 0
    assert (out / "snn.pt").is_file() and (out / "ann.pt").is_file()
    assert main(["simulate", "--out", str(out), "--quiet", "--timesteps", "1,4"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["ann_accuracy"] is not None  # the imported ANN is the reference line
    assert main(["cost", "--run", str(out), "--out", str(out / "cost")]) == 0
    cost = json.loads((out / "cost" / "cost.json").read_text())
    text = json.dumps(cost)
    assert "maxpool" in text  # the stem's spiking max-pool is costed


def test_cli_refuses_weights_of_another_architecture_and_torchscript(tmp_path, capsys):
    other = tmp_path / "r34.pth"
    torch.save(_settled("resnet18", in_channels=1, size=8).state_dict(), other)
    args = ["--out", str(tmp_path / "run"), "--quiet", "data.name=digits"]
    assert main(["convert", "--arch", "torchvision:resnet34", "--weights", str(other), *args]) == 2
    assert "does not fit ResNet: missing" in capsys.readouterr().err
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(_settled("resnet18", in_channels=1, size=8), torch.randn(1, 1, 8, 8)), scripted)
    assert main(["convert", "--arch", "torchvision:resnet18", "--weights", str(scripted), *args]) == 2
    assert "TorchScript / torch.export archive" in capsys.readouterr().err
    assert main(["convert", "--arch", "torchvision:resnet18", *args]) == 2
    assert "--arch and --weights together" in capsys.readouterr().err
    assert not (tmp_path / "run" / "snn.pt").exists()


@pytest.mark.slow
def test_run_distils_a_torchvision_teacher_into_a_binary_torchvision_student(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", "data.name=digits", "model.teacher=torchvision:resnet18",
                 "model.student=torchvision:resnet18", "train.epochs=1", "student.epochs=1",
                 "simulate.timesteps=[1,4]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student"]["test_acc"] > 20 and "snn" in metrics
