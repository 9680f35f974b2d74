import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional as SF
from spikingjelly.activation_based import neuron
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.config import ConvertConfig
from bsnn.convert import convert
from bsnn.errors import ConversionError
from bsnn.export import to_spikingjelly
from tests.test_convert import _residual


def _spikes(snn, sj, x, T):
    ours, theirs = {}, {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ours.__setitem__(n, o.clone()))
             for n, m in snn.neurons().items()]
    snn.reset()
    snn.set_time_chunk(T)
    with torch.no_grad():
        out = snn(x.unsqueeze(0).expand(T, *x.shape).reshape(T * x.shape[0], *x.shape[1:]))
    for h in hooks:
        h.remove()
    sj_neurons = [m for m in sj.modules() if isinstance(m, neuron.IFNode)]
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: theirs.__setitem__(k, o.clone()))
             for k, m in enumerate(sj_neurons)]
    SF.reset_net(sj)
    with torch.no_grad():
        out_sj = sj(x.unsqueeze(0).expand(T, *x.shape).contiguous())
    for h in hooks:
        h.remove()
    return ours, theirs, out.view(T, x.shape[0], -1), out_sj


@pytest.mark.parametrize("make", ["sequential", "residual"])
def test_spikingjelly_export_gives_identical_spikes(make):
    torch.manual_seed(0)
    if make == "sequential":
        net = binarize_(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))).eval()
    else:
        net = _residual()
    x = torch.randn(16, 1, 8, 8)
    snn = convert(net, DataLoader(TensorDataset(x, torch.zeros(16).long()), batch_size=8), ConvertConfig.plain())
    sj = to_spikingjelly(snn)
    assert sum(isinstance(m, neuron.IFNode) for m in sj.modules()) == len(snn.neuron_names)
    assert all(m.v_reset is None and m.step_mode == "m" for m in sj.modules() if isinstance(m, neuron.IFNode))
    ours, theirs, out, out_sj = _spikes(snn, sj, x, T=24)
    for k, name in enumerate(snn.neuron_names):
        a = ours[name].view(24, 16, *ours[name].shape[1:])
        assert a.sum() > 0
        assert torch.equal(a, theirs[k]), name
    assert torch.equal(out, out_sj)


@pytest.mark.parametrize("cfg", [ConvertConfig(), ConvertConfig(snn_calibration="bias", snn_calibration_timesteps=5),
                                 ConvertConfig.plain(v_init=0.5)], ids=["default", "bias@5", "shift"])
def test_every_recipe_exports_spike_for_spike(cfg):
    """The default recipe (per-channel thresholds, θ/2 shift, potential calibration) and windowed bias
    calibration export with CalibratedIFNode; spikes equal bsnn's at every step (across the end of the bias
    window too)."""
    from bsnn.export import CalibratedIFNode

    torch.manual_seed(0)
    net = _residual()
    x = torch.randn(32, 1, 8, 8)
    snn = convert(net, DataLoader(TensorDataset(x, torch.zeros(32).long()), batch_size=16), cfg)
    sj = to_spikingjelly(snn)
    assert any(isinstance(m, CalibratedIFNode) for m in sj.modules())
    ours, theirs, out, out_sj = _spikes(snn, sj, x[:8], T=12)
    for k, name in enumerate(snn.neuron_names):
        assert torch.equal(ours[name].view(12, 8, *ours[name].shape[1:]), theirs[k]), name
    torch.testing.assert_close(out, out_sj)
    SF.reset_net(sj)  # reset restores the initial membrane and the bias window
    ours2, theirs2, _, _ = _spikes(snn, sj, x[:8], T=12)
    assert all(torch.equal(theirs[k], theirs2[k]) for k in theirs)
