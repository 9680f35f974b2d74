import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.config import BinaryConfig, ConvertConfig
from bsnn.convert import Max, Percentile, convert
from bsnn.convert.calibrate import calibrate, topk_size
from bsnn.convert.graph import capture, relu_modules
from bsnn.errors import ConversionError
from bsnn.simulate import run_batch


def _loader(x):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=16)


class Residual(nn.Module):
    """Functional ReLUs, BN in both branches (incl. a conv shortcut), an identity shortcut, negative BN gains."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.sc, self.bsc = nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)) + x)
        x = (self.b3(self.c3(x)) + self.bsc(self.sc(x))).relu()
        x = self.pool(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def _residual(seed=0):
    torch.manual_seed(seed)
    net = Residual()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)  # some negative gains: those channels' weight rows get flipped
            m.bias.data.uniform_(-0.2, 0.2)
    return binarize_(net, BinaryConfig()).eval()


def test_stored_binary_weights_are_exactly_pm1_and_functional_relu_converted():
    net = _residual()
    x = torch.randn(32, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig.plain())
    assert len(snn.neuron_names) == 4  # F.relu, torch.relu, Tensor.relu and F.relu in the head
    binary = [l["name"] for l in snn.layers if l["binary"]]
    assert set(binary) == {"c2", "c3", "sc", "fc1"}
    mods = snn.synaptic_modules()
    for name in binary:
        assert set(mods[name].weight.unique().tolist()) == {-1.0, 1.0}, name
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in snn.modules())


def test_time_averaged_output_converges_to_ann_logits_as_1_over_T():
    net = _residual()
    x = torch.randn(32, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig.plain())
    with torch.no_grad():
        z = net(x)
        mem = run_batch(snn, x, 1024, time_chunk=64)
    err = {t: (mem[t - 1] / t - z).abs().mean().item() for t in (16, 64, 256, 1024)}
    assert err[1024] < err[256] < err[64] < err[16]
    # roughly 1/T: each 4x more steps cuts the error by >= 2.5x (1/T gives 4x)
    assert err[16] / err[64] > 2.5 and err[64] / err[256] > 2.5
    assert err[1024] < 0.01 * z.abs().mean().item()


def test_bn_folding_is_exact():
    net = _residual()
    x = torch.randn(8, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig.plain())
    # first IF layer's input current, in units of its threshold, times λ is the ANN's BN output exactly
    seen = {}
    neuron = snn.neurons()["if_act_relu"]
    h = neuron.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0] * m.gain()))
    with torch.no_grad():
        run_batch(snn, x, 1, time_chunk=1)
    h.remove()
    lam = torch.tensor(snn.meta["thresholds"]["act_relu"])
    with torch.no_grad():
        expected = net.b1(net.c1(x))
    torch.testing.assert_close(seen["x"] * lam, expected, rtol=1e-5, atol=1e-5)


def test_bn_fold_in_binary_layer_with_negative_gain_exact():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    net[3].weight.data = torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0, -1.0])
    net[3].running_mean.uniform_(-1, 1)
    net[3].running_var.uniform_(0.5, 2)
    binarize_(net, BinaryConfig()).eval()
    x = torch.randn(16, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig.plain())
    spikes, currents = {}, {}
    n1, n2 = snn.neurons().values()
    h1 = n1.register_forward_hook(lambda m, a, out: spikes.setdefault("s", out))
    h2 = n2.register_forward_pre_hook(lambda m, a: currents.setdefault("x", a[0] * m.gain()))
    with torch.no_grad():
        run_batch(snn, x, 1, time_chunk=1)
    h1.remove(), h2.remove()
    lam = [torch.tensor(v) for v in snn.meta["thresholds"].values()]
    with torch.no_grad():  # the ANN's layer applied to the spikes (which stand for λ1 each)
        expected = net[3](net[2](spikes["s"] * lam[0]))
    torch.testing.assert_close(currents["x"] * lam[1], expected, rtol=1e-5, atol=1e-5)
    assert set(snn.synaptic_modules()["2"].weight.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("module, features, match", [
    (nn.Upsample(scale_factor=2), 4 * 12 * 12, "unsupported module Upsample at module '2'"),
    (nn.Sigmoid(), 4 * 6 * 6, "unsupported module Sigmoid at module '2'"),
])
def test_unsupported_ops_raise_naming_the_node(module, features, match):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), module, nn.Flatten(), nn.Linear(features, 2)).eval()
    with pytest.raises(ConversionError, match=match) as e:
        convert(net, _loader(torch.randn(4, 1, 8, 8)))
    assert "module '2'" in str(e.value) and "graph node" in str(e.value)


def test_unsupported_function_and_untraceable():
    class Gelu(nn.Module):
        def forward(self, x):
            return F.gelu(x)

    with pytest.raises(ConversionError, match="unsupported function at function gelu .graph node 'gelu'"):
        convert(Gelu(), _loader(torch.randn(4, 3)))

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ConversionError, match="could not trace Dynamic"):
        convert(Dynamic(), _loader(torch.randn(4, 3)))


def test_reused_relu_module_gets_separate_neurons():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

        def forward(self, x):
            return self.out(self.act(self.b(self.act(self.a(x)))))

    snn = convert(Reuse().eval(), _loader(torch.randn(8, 4)))
    assert len(snn.neuron_names) == 2


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 100.0])
def test_percentile_observer_equals_torch_quantile(p):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).eval()
    x = torch.randn(40, 1, 10, 10)
    gm = capture(net, x)
    relus = relu_modules(gm)
    got = calibrate(gm, relus, _loader(x), Percentile(p))["1"]
    got_c = calibrate(gm, relus, _loader(x), Percentile(p), per_channel=True)["1"]
    with torch.no_grad():
        act = net(x)
    torch.testing.assert_close(got, torch.quantile(act.flatten(), p / 100, interpolation="higher"))
    ref_c = torch.stack([torch.quantile(act[:, c].flatten(), p / 100, interpolation="higher") for c in range(3)])
    torch.testing.assert_close(got_c, ref_c)
    assert topk_size(1000, 99.9) == 1 and topk_size(1001, 50.0) == 501


def test_calibration_respects_max_samples_and_max():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    x = torch.randn(64, 2)
    x[40:] *= 100
    gm = capture(net, x)
    few = calibrate(gm, relu_modules(gm), _loader(x), Max(), max_samples=40)["1"]
    with torch.no_grad():
        assert few.item() == pytest.approx(net(x[:40]).max().item())


def test_original_model_untouched():
    net = _residual()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convert(net, _loader(torch.randn(8, 1, 8, 8)))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_per_channel_thresholds_only_where_consumers_are_full_precision():
    net = _residual()
    snn = convert(net, _loader(torch.randn(16, 1, 8, 8)), ConvertConfig(per_channel=True))
    thr = {name: torch.as_tensor(v) for name, v in snn.meta["thresholds"].items()}
    last = list(thr)[-1]  # the ReLU after fc1 feeds only the full-precision fc2
    assert thr[last].numel() == 32
    assert all(thr[k].numel() == 1 for k in thr if k != last)  # they feed binary layers or residual adds
    for layer in snn.layers:
        if layer["binary"]:
            assert bool((snn.graph_module.get_submodule(layer["name"]).weight.abs() == 1).all())


def test_per_channel_scale_into_binary_layer_refused_by_surgery():
    from bsnn.convert import convert_with_thresholds

    net = _residual()
    x = torch.randn(8, 1, 8, 8)
    gm = capture(net, x)
    thresholds = {k: torch.ones(8) if i == 0 else torch.ones(()) for i, k in enumerate(relu_modules(gm))}
    with pytest.raises(ConversionError, match="per_channel=false"):
        convert_with_thresholds(gm, thresholds, ConvertConfig(), [1, 8, 8])


def test_convert_leaves_the_callers_model_where_it_is():
    """Calibration on another device must not move the caller's model (fx shares its submodules)."""
    moved = []

    class Tracked(Residual):
        def _apply(self, fn, *args, **kwargs):  # .to() / .cpu() / .cuda() all go through here
            if self is net:
                moved.append(fn)
            return super()._apply(fn, *args, **kwargs)

    torch.manual_seed(0)
    net = Tracked().eval()
    snn = convert(net, _loader(torch.randn(16, 1, 8, 8)), ConvertConfig.plain(), device="cpu")
    assert moved == []  # neither .to(device) nor .cpu() touched the caller's model
    shared = {id(m) for m in net.modules()} & {id(m) for m in snn.modules()}
    assert not shared  # and the SNN holds none of its modules


def test_empty_calibration_loader_is_a_conversion_error():
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ConversionError, match="calibration loader yielded no samples"):
        convert(_residual(), empty)
