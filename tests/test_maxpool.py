"""Max-pooling: the spiking max-pool against its oracle, the placement of pools in capture for every strategy,
convergence of a converted max-pool network, and the round trip through a saved file."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import ConvertConfig
from bsnn.convert import capture, convert
from bsnn.convert.maxpool import MAXPOOL_STRATEGIES
from bsnn.errors import ConfigError, ConversionError
from bsnn.modelfile import load_snn, save_snn
from bsnn.simulate import run_batch
from bsnn.snn.pool import SpikingMaxPool2d, spiking_maxpool_reference

POOLS = [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveMaxPool2d(2)]


def _run_chunks(m: SpikingMaxPool2d, s: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    m.reset()
    outs, t0 = [], 0
    for tc in chunks:
        m.time_chunk = tc
        b = s.shape[1]
        out = m(s[t0:t0 + tc].reshape(tc * b, *s.shape[2:]))
        outs.append(out.reshape(tc, b, *out.shape[1:]))
        t0 += tc
    return torch.cat(outs)


@pytest.mark.parametrize("mode", ["count", "gate"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: repr(p))
def test_spiking_maxpool_equals_its_reference_for_any_time_chunking(mode, pool):
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(9, 2, 3, 7, 7, generator=g) < 0.35).float()
    ref = spiking_maxpool_reference(pool, s, mode)
    for chunks in ([9], [1] * 9, [4, 2, 3]):
        out = _run_chunks(SpikingMaxPool2d(pool, mode), s, chunks)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert set(out.unique().tolist()) <= {0.0, 1.0}  # spikes in, spikes out


def test_count_mode_pools_the_spike_counts_exactly_at_every_T():
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(32, 4, 2, 6, 6, generator=g) < torch.rand(1, 1, 2, 6, 6, generator=g)).float()
    pool = nn.MaxPool2d(2)
    out = _run_chunks(SpikingMaxPool2d(pool, "count"), s, [5, 11, 16])
    for t in (1, 2, 7, 32):
        counts = s[:t].sum(0)
        torch.testing.assert_close(out[:t].sum(0), F.max_pool2d(counts, 2))
    # the naive per-step max over-counts: out-of-phase neurons at rate 1/2 give a pooled rate of 1
    alt = torch.zeros(8, 1, 1, 1, 2)
    alt[0::2, ..., 0], alt[1::2, ..., 1] = 1, 1
    naive = F.max_pool2d(alt.reshape(8, 1, 1, 2), (1, 2)).sum()
    exact = _run_chunks(SpikingMaxPool2d(nn.MaxPool2d((1, 2)), "count"), alt, [8]).sum()
    assert naive == 8 and exact == 4


class MaxNet(nn.Module):
    """Max-pools after a ReLU (module), before a ReLU (functional), and adaptive, as torchvision writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act1, self.pool1 = nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        h = self.pool1(self.act1(self.b1(self.c1(x))))
        h = F.relu(F.max_pool2d(self.b2(self.c2(h)), 2))  # pool before the activation
        h = F.adaptive_max_pool2d(F.relu(self.c3(h)), 2)
        return self.fc(h.flatten(1))


def _settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model(x[i:i + 64])
    return model.eval()


def _order(gm) -> list[str]:
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"
            and not isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]


def test_capture_places_pools_as_each_strategy_asks_without_changing_the_ann():
    torch.manual_seed(0)
    x = torch.randn(128, 3, 16, 16)
    net = _settled(MaxNet(), x)
    ref = net(x[:8])
    orders = {}
    for name in MAXPOOL_STRATEGIES.names():
        gm = capture(net, x[:2], name)
        orders[name] = _order(gm)
        if name != "avg":  # moving a pool across a monotone activation keeps the function
            torch.testing.assert_close(gm(x[:8]), ref)
    assert orders["spiking"] == orders["gate"] == ["ReLU", "MaxPool2d"] * 2 + ["ReLU", "AdaptiveMaxPool2d"]
    assert orders["preact"] == ["MaxPool2d", "ReLU"] * 2 + ["AdaptiveMaxPool2d", "ReLU"]
    assert orders["avg"] == ["ReLU", "AvgPool2d", "AvgPool2d", "ReLU", "ReLU", "AdaptiveAvgPool2d"]


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=128)


def _errors(snn, ref: torch.Tensor, x: torch.Tensor) -> list[float]:
    mem = run_batch(snn, x, 1024, 64)
    return [((mem[t - 1] / t - ref).norm() / ref.norm()).item() for t in (16, 64, 256, 1024)]


def test_default_conversion_of_max_pools_converges_to_the_ann():
    torch.manual_seed(0)
    x = torch.randn(512, 3, 16, 16)
    net = _settled(MaxNet(), x)
    snn = convert(net, _loader(x), ConvertConfig())
    assert any(isinstance(m, SpikingMaxPool2d) for m in snn.modules())
    err = _errors(snn, net(x[:32]).detach(), x[:32])
    assert err[3] < 0.02 and err[3] < err[1] < err[0], err
    gate = _errors(convert(net, _loader(x), ConvertConfig(maxpool="gate")), net(x[:32]).detach(), x[:32])
    assert gate[3] < gate[1] < gate[0], gate  # right in the rate limit, slower


def test_pool_of_the_analog_input_stays_a_plain_max_pool():
    net = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    snn = convert(net.eval(), _loader(torch.randn(64, 3, 16, 16)), ConvertConfig())
    assert not any(isinstance(m, SpikingMaxPool2d) for m in snn.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in snn.modules())


def test_saved_torchvision_network_with_max_pools_reloads_identically(tmp_path):
    """A torchvision ResNet-18 (stem max-pool) saved by save_snn is rebuilt from its architecture record with
    the same strategy and the same outputs."""
    pytest.importorskip("torchvision")
    from bsnn.modelfile import build_model

    arch = {"name": "torchvision:resnet18", "num_classes": 10, "in_channels": 1, "kwargs": {}, "binary": None,
            "activation": {"kind": "relu"}}
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    ann = _settled(build_model(arch), x)
    snn = convert(ann, _loader(x), ConvertConfig(maxpool="gate", calib_samples=64, snn_calibration_samples=16))
    assert sum(isinstance(m, SpikingMaxPool2d) for m in snn.modules()) == 1
    save_snn(tmp_path / "snn.pt", snn, arch)
    again, _ = load_snn(tmp_path / "snn.pt")
    assert again.meta["convert"]["maxpool"] == "gate"
    assert [m.mode for m in again.modules() if isinstance(m, SpikingMaxPool2d)] == ["gate"]
    torch.testing.assert_close(run_batch(again, x[:4], 8, 4), run_batch(snn, x[:4], 8, 4))


def test_bad_maxpool_settings_are_refused_clearly():
    with pytest.raises(ConfigError, match="convert.maxpool must be one of.*spiking"):
        ConvertConfig(maxpool="median").validate()

    class Indices(nn.Module):
        def forward(self, x):
            return F.max_pool2d(F.relu(x), 2, return_indices=True)[0].flatten(1)

    with pytest.raises(ConversionError, match="unsupported function at function max_pool2d_with_indices"):
        capture(Indices(), torch.randn(2, 3, 8, 8))
    with_indices = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(ConversionError, match="returns its indices"):
        capture(with_indices, torch.randn(2, 3, 8, 8))
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2, dilation=2), nn.Flatten(),
                            nn.Linear(4 * 2 * 2, 2))
    with pytest.raises(ConversionError, match="dilated.*convert.maxpool=spiking"):
        capture(dilated, torch.randn(2, 3, 8, 8), "avg")


def test_cost_model_charges_spiking_max_pools_as_counters_and_comparators():
    from bsnn.hardware.cost import estimate
    from bsnn.hardware.config import preset

    torch.manual_seed(0)
    x = torch.randn(128, 3, 16, 16)
    snn = convert(_settled(MaxNet(), x), _loader(x), ConvertConfig())
    hw = preset("spikesim-rram-65nm")
    report = estimate(snn, None, hw, timesteps=4, mode="dense")
    pools = [l for l in report.layers if l.kind == "maxpool"]
    # MaxNet: 16x16x16 -> 8x8 (2x2), 32x8x8 -> 4x4 (2x2), 32x4x4 -> 2x2 (adaptive, 2x2 windows)
    expected = [(16 * 16 * 16, 16 * 8 * 8, 4), (32 * 8 * 8, 32 * 4 * 4, 4), (32 * 4 * 4, 32 * 2 * 2, 4)]
    assert len(pools) == 3
    for row, (inputs, outputs, window) in zip(pools, expected):
        ops = 4 * (inputs + outputs * window)  # T·(one increment per input + (k²−1) compares + 1 subtract per output)
        assert row.energy_pj == pytest.approx(ops * hw.energy.digital_add_pj)
        assert row.area_um2 == pytest.approx((inputs + outputs) * hw.area.sram_bit_um2 * hw.area.membrane_bits)
    assert report.total.breakdown_pj["maxpool"] == pytest.approx(sum(r.energy_pj for r in pools))
    assert report.total.area_breakdown_um2["maxpool_counters"] == pytest.approx(sum(r.area_um2 for r in pools))
    assert any("spiking max-pool" in n for n in report.notes)


def test_spikingjelly_export_refuses_a_spiking_max_pool_clearly():
    from bsnn.export import to_spikingjelly

    torch.manual_seed(0)
    x = torch.randn(128, 3, 16, 16)
    snn = convert(_settled(MaxNet(), x), _loader(x), ConvertConfig.plain())
    with pytest.raises(ConversionError, match="spiking max-pool.*convert.maxpool=preact or avg"):
        to_spikingjelly(snn)
