"""User-facing failures are bsnn errors naming what is wrong and what to do (never raw tracebacks)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.cli import main
from bsnn.config import ConvertConfig, DistillConfig, RunConfig, SimConfig, TrainConfig
from bsnn.convert import Max, convert
from bsnn.errors import BsnnError, ConfigError, ConversionError, TrainingError
from bsnn.simulate import run_batch, simulate
from bsnn.train import resolve_device, train_student, train_teacher


def _bn_net(**bn):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, **bn), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.BatchNorm2d(4, **bn), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    if bn.get("track_running_stats", True):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return binarize_(net).eval()


def _loader(n=16, shape=(1, 6, 6), classes=3):
    torch.manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, *shape), torch.arange(n) % classes), batch_size=8)


def test_batchnorm_without_affine_converts():
    net, loader = _bn_net(affine=False), _loader()
    snn = convert(net, loader, ConvertConfig(threshold=Max(), v_init=0.5))
    x = next(iter(loader))[0]
    with torch.no_grad():
        ann = net(x)
    assert (run_batch(snn, x, 256, 64)[-1] / 256 - ann).norm() / ann.norm() < 0.05


def test_batchnorm_without_running_stats_is_refused():
    with pytest.raises(ConversionError, match=r"BatchNorm '1'.*track_running_stats=True"):
        convert(_bn_net(track_running_stats=False), _loader(), ConvertConfig(threshold=Max()))


def _snn():
    return convert(_bn_net(), _loader(), ConvertConfig(threshold=Max()))


def test_loader_without_dataset_simulates():
    snn, loader = _snn(), _loader()
    batches = [(x, y) for x, y in loader]  # an iterable of batches: no .dataset
    res = simulate(snn, batches, [2, 4], quiet=True)
    assert res.samples == 16 and res.accuracy == simulate(snn, loader, [2, 4], quiet=True).accuracy
    assert simulate(snn, batches, [2], SimConfig(max_samples=5), quiet=True).samples == 5


def test_train_student_with_loader_without_dataset():
    teacher, student = _bn_net(), _bn_net()
    batches = [(x, y) for x, y in _loader()]
    assert len(train_student(student, teacher, batches, DistillConfig(method="kd"), TrainConfig(epochs=1),
                             quiet=True)) == 1
    with pytest.raises(ConfigError, match="crd.*loader.dataset"):
        train_student(student, teacher, batches, DistillConfig(method="crd", params={"feat_dim": 4, "nce_k": 4}),
                      TrainConfig(epochs=1), quiet=True)


def test_triton_kernel_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton")
    with pytest.raises(ConfigError, match="kernel=triton needs a CUDA device.*kernel=auto"):
        simulate(_snn(), _loader(), [2], SimConfig(kernel="triton"), device="cpu", quiet=True)


@pytest.mark.parametrize("bad", [-3, 0])
def test_max_samples_must_be_positive(bad):
    with pytest.raises(ConfigError, match="simulate.max_samples"):
        simulate(_snn(), _loader(), [2], SimConfig(max_samples=bad), quiet=True)


def test_nonfinite_loss_is_a_bsnn_error():
    with pytest.raises(TrainingError, match=r"epoch \d+, batch \d+; lower the lr \(now 1e\+30\)") as e:
        train_teacher(nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)), _loader(),
                      TrainConfig(epochs=4, lr=1e30, optimizer="sgd"), quiet=True)
    assert isinstance(e.value, BsnnError) and isinstance(e.value, FloatingPointError)


def test_cli_reports_a_diverged_run_in_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "data.name=digits", "train.epochs=1", "train.lr=1.0e+30",
                 "train.optimizer=sgd", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bsnn: error: ") and "lower the lr" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["cuda:x", "cuda:", "cuda:-1", "gpu"])
def test_invalid_device_names(name):
    with pytest.raises(ConfigError, match="run.device"):
        RunConfig(device=name).validate()
    with pytest.raises(ConfigError, match="run.device"):
        resolve_device(name)


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"'cuda:5' but this machine has 2 CUDA device\(s\) \(cuda:0 .. cuda:1\)"):
        resolve_device("cuda:5")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


class _AddOf(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 3)
        self.p = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        h = self.conv(x)
        if self.how == "out":
            h = torch.add(h, h, out=torch.empty(1))
        elif self.how == "two_constants":
            h = h + (self.p + self.p)
        elif self.how == "scaled_parameter":
            h = h * self.p
        return self.fc(torch.relu(h).flatten(1))


@pytest.mark.parametrize("how, match", [("out", r"add at function add \(graph node 'add'.*keywords \['out'\]"),
                                        ("two_constants", "adds two constants"),
                                        ("scaled_parameter", "unsupported function at function mul")])
def test_unsupported_add_arguments_are_refused(how, match):
    with pytest.raises(ConversionError, match=match):
        convert(_AddOf(how).eval(), _loader(), ConvertConfig(threshold=Max()))
