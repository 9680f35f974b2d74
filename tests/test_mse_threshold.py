"""SNN Calibration's MSE threshold search (``bsnn.convert.calibrate.MSE``) against an independent re-expression of
the authors' ``find_threshold_mse`` / ``DataSaverHook`` (yhhhli/SNN_Calibration, models/spiking_layer.py)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import Config, ConvertConfig, from_dict
from bsnn.convert import MSE, Max, Percentile, convert
from bsnn.convert.calibrate import calibrate, mse_threshold
from bsnn.convert.config import parse_statistic
from bsnn.convert.graph import capture, relu_modules
from bsnn.errors import ConfigError
from bsnn.modelfile import build_model, load_snn, save_snn
from bsnn.simulate import run_batch


def authors_search(t: torch.Tensor, timesteps: int, v0: float = 0.0) -> torch.Tensor:
    """Their grid scan, written out: θ_i = max·(1 − 0.01 i), i = 0..94, keep the first of least squared error of
    ``clamp(floor(a/θ·T + v0), 0, T)·θ/T`` (theirs is v0 = 0). ``t``: [C, N] rows searched separately."""
    out = []
    for row in t.double():
        top, best, best_th = row.max(), float("inf"), row.max()
        for i in range(95):
            th = top * (1.0 - 0.01 * i)
            q = torch.clamp(torch.floor(row / th * timesteps + v0), 0, timesteps) * th / timesteps
            err = ((row - q) ** 2).sum().item() if top > 0 else 0.0
            if err < best:
                best, best_th = err, th
        out.append(best_th)
    return torch.stack(out)


@pytest.mark.parametrize("timesteps", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("v0", [0.0, 0.5])
def test_sorted_prefix_sum_search_equals_the_grid_scan(timesteps, v0):
    g = torch.Generator().manual_seed(timesteps)
    x = torch.relu(torch.randn(5, 2000, generator=g, dtype=torch.float64)) * torch.rand(5, 1, generator=g,
                                                                                          dtype=torch.float64) * 4
    x[3] = 0.0  # a dead channel: θ = 0, as the authors' scan leaves it
    x[4, :1900] = 0.0  # mostly zeros
    torch.testing.assert_close(mse_threshold(x, timesteps, v0), authors_search(x, timesteps, v0))
    # one row (layer-wise): the values <= 0 are dropped, which must not change the choice
    torch.testing.assert_close(mse_threshold(x[:1] - 0.3, timesteps, v0),
                               authors_search(x[:1] - 0.3, timesteps, v0))


def test_search_trades_clipping_for_resolution_as_T_shrinks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20000, generator=g).abs() ** 2  # heavy right tail
    th = {t: mse_threshold(x, t, 0.5).item() for t in (2, 8, 64)}
    assert th[2] < th[8] < th[64] <= x.max().item()


def test_observer_is_the_authors_batchwise_search_with_ema():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).eval()
    x = torch.randn(48, 1, 10, 10)
    gm = capture(net, x)
    loader = DataLoader(TensorDataset(x, torch.zeros(48, dtype=torch.long)), batch_size=16)
    with torch.no_grad():
        acts = [net(xb) for xb in x.split(16)]
    for per_channel in (False, True):
        got = calibrate(gm, relu_modules(gm), loader, MSE(4, v0=0.0), per_channel=per_channel)["1"]
        rows = [a.transpose(0, 1).reshape(3, -1) if per_channel else a.reshape(1, -1) for a in acts]
        ema = None
        for r in rows:  # DataSaverHook: the first batch's choice, then 0.9·old + 0.1·new
            found = authors_search(r, 4).float()
            ema = found if ema is None else 0.9 * ema + 0.1 * found
        torch.testing.assert_close(got, ema if per_channel else ema[0])


def test_text_forms_round_trip_through_the_config():
    assert parse_statistic("mse") == MSE(8, None)
    assert parse_statistic("mse:4") == MSE(4, None)
    assert parse_statistic("mse:16:0") == MSE(16, 0.0)
    for bad in ("mse:0", "mse:x", "mse:4:1.5", "mse:4:0:9", "msex"):
        with pytest.raises(ConfigError, match="mse"):
            parse_statistic(bad)
    cfg = from_dict({"convert": {"threshold": "mse:4"}})
    assert cfg.convert.threshold == MSE(4)
    assert from_dict(cfg.to_dict(), Config).convert.threshold == MSE(4)
    with pytest.raises(ConfigError, match="momentum"):
        MSE(4, momentum=0.5).spec()


def test_convert_with_mse_thresholds_uses_v_init_and_still_converges():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 4)).eval()
    x = torch.randn(256, 1, 4, 4)
    loader = DataLoader(TensorDataset(x, torch.zeros(256, dtype=torch.long)), batch_size=64)
    cfg = ConvertConfig(threshold=MSE(4), per_channel=False, snn_calibration="none", late_threshold=None)
    snn = convert(net, loader, cfg)
    assert snn.meta["convert"]["threshold"] == "mse:4:0.5"  # the text form load_snn parses back
    gm = capture(net, x)
    lam = calibrate(gm, relu_modules(gm), loader, MSE(4, v0=0.5))
    peak = calibrate(gm, relu_modules(gm), loader, parse_statistic("max"))
    assert all(lam[k] < peak[k] for k in lam)  # clipped below the max for a 4-step code
    # the SNN converges to the ANN clipped at the fitted thresholds
    with torch.no_grad():
        h1 = net[2](net[1](net[0](x))).clamp(max=lam["2"].item())
        h2 = net[4](net[3](h1)).clamp(max=lam["4"].item())
        target = net[5](h2)
        mem = run_batch(snn, x, 2048, time_chunk=256)
    assert (mem[-1] / 2048 - target).abs().max().item() < 0.02 * target.abs().max().item()


@pytest.mark.parametrize("stat", [MSE(4), MSE(8, v0=0.0), Percentile(99.99), Percentile(99.0), Max()])
def test_a_network_converted_with_any_statistic_loads_back(tmp_path, stat):
    # the recorded statistic is its text form: an MSE-threshold network used to be saved as 'mse@T4,v0=0.5',
    # which load_snn could not parse
    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4, "hidden": 16},
            "binary": {}, "activation": {"kind": "relu"}}
    torch.manual_seed(0)
    ann, x = build_model(arch).eval(), torch.rand(32, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=16)
    snn = convert(ann, loader, ConvertConfig(threshold=stat, snn_calibration="none"))
    assert parse_statistic(snn.meta["convert"]["threshold"]) == (stat if not isinstance(stat, MSE) or stat.v0
                                                                 is not None else MSE(stat.timesteps, v0=0.5))
    save_snn(tmp_path / "snn.pt", snn, arch)
    loaded, _ = load_snn(tmp_path / "snn.pt")
    assert torch.equal(run_batch(loaded, x, 8, 32), run_batch(snn, x, 8, 32))
