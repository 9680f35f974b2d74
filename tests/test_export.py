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
from bsnn.simulate import run_batch
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
    """The default recipe (per-channel thresholds, θ/2 shift, potential calibration, two-phase thresholds: the
    switch after T = 8 falls inside the 12 steps) and windowed bias calibration export with CalibratedIFNode /
    PhasedIFNode; spikes equal bsnn's at every step (across the end of the bias window and the switch too)."""
    from bsnn.export import CalibratedIFNode, PhasedIFNode

    torch.manual_seed(0)
    net = _residual()
    x = torch.randn(32, 1, 8, 8)
    snn = convert(net, DataLoader(TensorDataset(x, torch.zeros(32).long()), batch_size=16), cfg)
    sj = to_spikingjelly(snn)
    assert any(isinstance(m, CalibratedIFNode) for m in sj.modules())
    assert any(isinstance(m, PhasedIFNode) for m in sj.modules()) == (cfg.late_statistic() is not None)
    ours, theirs, out, out_sj = _spikes(snn, sj, x[:8], T=12)
    for k, name in enumerate(snn.neuron_names):
        assert torch.equal(ours[name].view(12, 8, *ours[name].shape[1:]), theirs[k]), name
    torch.testing.assert_close(out, out_sj)
    SF.reset_net(sj)  # reset restores the initial membrane and the bias window
    ours2, theirs2, _, _ = _spikes(snn, sj, x[:8], T=12)
    assert all(torch.equal(theirs[k], theirs2[k]) for k in theirs)


# ------------------------------------------------------------------------------------------------- NIR

def _sequential_digits_cnn():
    """A small CNN trained on scikit-learn's digits (real images): conv-BN-ReLU-avgpool-conv-ReLU-flatten-linear."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(10):
        for i in range(0, 1500, 100):
            loss = torch.nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), x, y


# NIR's IF has one threshold: the default with one threshold for all T (convert.late_threshold=none)
@pytest.mark.parametrize("cfg", [ConvertConfig(late_threshold=None),
                                 ConvertConfig(snn_calibration="bias", snn_calibration_timesteps=5,
                                               late_threshold=None),
                                 ConvertConfig.plain()], ids=["default-one-threshold", "bias@5", "plain"])
def test_nir_round_trip_is_spike_exact_also_through_a_file(cfg, tmp_path):
    import nir

    from bsnn.export import from_nir, to_nir

    torch.manual_seed(0)
    net = _residual()
    x = torch.randn(32, 1, 8, 8)
    snn = convert(net, DataLoader(TensorDataset(x, torch.zeros(32).long()), batch_size=16), cfg)
    graph = to_nir(snn)
    kinds = {type(n).__name__ for n in graph.nodes.values()}
    assert {"Input", "Conv2d", "Scale", "IF", "Affine", "Output"} <= kinds
    assert sum(isinstance(n, nir.IF) for n in graph.nodes.values()) == len(snn.neuron_names)
    adds = [b for b in graph.nodes if sum(1 for _, d in graph.edges if d == b) > 1]
    assert adds  # the residual add: two edges into one node
    nir.write(tmp_path / "net.nir", graph)
    for g in (graph, nir.read(tmp_path / "net.nir")):
        back = from_nir(g)
        assert len(back.neuron_names) == len(snn.neuron_names) and len(back.layers) == len(snn.layers)
        torch.testing.assert_close(run_batch(back, x[:8], 12, 4), run_batch(snn, x[:8], 12, 4), rtol=0, atol=0)


def test_nir_export_refuses_what_it_cannot_express():
    import torch.nn.functional as F

    from bsnn.export import to_nir

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1), nn.Linear(64, 2)

        def forward(self, x):
            return self.fc(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1).flatten(1))

    x = torch.randn(8, 1, 4, 4)
    snn = convert(Cat().eval(), DataLoader(TensorDataset(x, torch.zeros(8).long())), ConvertConfig.plain())
    with pytest.raises(ConversionError, match="to_nir: node 'cat'.*no NIR counterpart"):
        to_nir(snn)
    pool = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    snn = convert(pool.eval(), DataLoader(TensorDataset(x, torch.zeros(8).long())), ConvertConfig.plain())
    with pytest.raises(ConversionError, match="SpikingMaxPool2d"):
        to_nir(snn)


def test_nir_with_folded_scales_runs_in_sinabs_with_bsnn_s_predictions():
    """A real NIR consumer: sinabs imports the graph (gains folded into the weights, average pools as sum pools:
    sinabs reads neither Scale nor AvgPool2d) and, on real digits test images, predicts what bsnn predicts.
    Where they differ: sinabs' IAF clamps the membrane at −θ (its NIR import sets min_v_mem = −v_threshold) and
    the folded gains round differently at threshold crossings, so accumulated outputs agree to ~0.1 %, not bit for
    bit."""
    sinabs_nir = pytest.importorskip("sinabs.nir")
    import nir

    from bsnn.export import from_nir, to_nir

    net, x, y = _sequential_digits_cnn()
    snn = convert(net, DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=200), ConvertConfig.plain())
    graph = to_nir(snn, fold_scales=True)
    assert not any(isinstance(n, (nir.Scale, nir.AvgPool2d)) for n in graph.nodes.values())
    T, xt = 32, x[1500:]
    b = xt.shape[0]
    ours = run_batch(snn, xt, T, 8)  # [T, B, K]
    folded = run_batch(from_nir(graph), xt, T, 8)  # gains folded into the weights: rounding moves a spike or two
    assert float((folded - ours).norm() / ours.norm()) < 1e-3 and bool((folded[-1].argmax(1) == ours[-1].argmax(1)).all())
    model = sinabs_nir.from_nir(graph, batch_size=b, num_timesteps=T)
    with torch.no_grad():
        out = model(xt.unsqueeze(1).expand(b, T, *xt.shape[1:]).reshape(b * T, *xt.shape[1:]))
    theirs = (out[0] if isinstance(out, tuple) else out).reshape(b, T, -1).cumsum(1).permute(1, 0, 2)
    assert bool((theirs[-1].argmax(1) == ours[-1].argmax(1)).all())
    assert float((theirs - ours).norm() / ours.norm()) < 0.01
    assert float((ours[-1].argmax(1) == y[1500:]).float().mean()) > 0.85  # a real, accurate network
