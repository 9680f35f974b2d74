"""Potential calibration fitted jointly over several T (``convert.snn_calibration_joint_timesteps``)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.convert import Max, convert
from bsnn.convert.config import ConvertConfig
from bsnn.errors import ConfigError
from bsnn.simulate import run_batch


def _net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))
    return binarize_(net).eval()


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=32)


def _convert(net, x, **kw):
    return convert(net, _loader(x), ConvertConfig(threshold=Max(), snn_calibration="potential",
                                                  snn_calibration_samples=len(x), **kw))


def _v_init_biases(snn) -> list[torch.Tensor]:
    return [n.v_init_bias.clone() for n in snn.neurons().values()]


def test_one_joint_timestep_is_the_single_t_correction():
    net, x = _net(), torch.randn(32, 1, 8, 8)
    a = _v_init_biases(_convert(net, x, snn_calibration_timesteps=4))
    b = _v_init_biases(_convert(net, x, snn_calibration_timesteps=8, snn_calibration_joint_timesteps=[4]))
    for va, vb in zip(a, b):
        torch.testing.assert_close(va, vb)


def test_first_layer_charge_is_the_mean_of_the_single_t_charges():
    """The first IF layer sees no earlier correction, so its joint charge is exactly the mean of the charges the
    single-T calibrations give it (later layers differ: each is fitted on the jointly corrected earlier ones)."""
    net, x = _net(), torch.randn(32, 1, 8, 8)
    singles = [_v_init_biases(_convert(net, x, snn_calibration_timesteps=t))[0] for t in (2, 4, 8)]
    joint = _v_init_biases(_convert(net, x, snn_calibration_joint_timesteps=[2, 4, 8]))
    assert singles[0].abs().max() > 1e-3 and not torch.allclose(singles[0], singles[2])  # the T's disagree
    torch.testing.assert_close(joint[0], sum(singles) / 3)
    assert not torch.allclose(joint[1], _v_init_biases(_convert(net, x, snn_calibration_timesteps=4))[1])


def test_joint_potential_calibration_keeps_convergence_to_the_ann():
    net, x = _net(), torch.randn(48, 1, 8, 8)
    snn = _convert(net, x, snn_calibration_joint_timesteps=[2, 4, 8])
    with torch.no_grad():
        logits = net(x)
    mem = run_batch(snn, x, 2048, 256)
    err = {t: ((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in (1, 32, 2048)}
    assert err[2048] < err[32] / 4 and err[2048] < 5e-3, err


def test_joint_timesteps_config_errors():
    with pytest.raises(ConfigError, match="joint_timesteps"):
        ConvertConfig(snn_calibration_joint_timesteps=[4, 0]).validate()
    with pytest.raises(ConfigError, match="joint_timesteps"):
        ConvertConfig(snn_calibration_joint_timesteps=4).validate()
    with pytest.raises(ConfigError, match="joint_timesteps.*'bias'"):
        ConvertConfig(snn_calibration="bias", snn_calibration_joint_timesteps=[4, 8]).validate()
    ConvertConfig(snn_calibration="advanced", snn_calibration_joint_timesteps=[4, 8]).validate()
