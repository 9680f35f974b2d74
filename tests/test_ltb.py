"""LTB (local threshold balancing, Bu et al. 2025): the update against hand-computed numbers, against spikingjelly's
hook and against a float64 reference written from the authors' code (putshua/Inference-scale-ANN-SNN,
layers.py: SpikingNeuron*.optimize) on a tiny network; the option in convert(); convergence with it on."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.convert import convert
from bsnn.convert.config import ConvertConfig
from bsnn.convert.ltb import LTB_EPS, ltb_batches, ltb_clip, ltb_step
from bsnn.errors import ConfigError
from bsnn.simulate import run_batch


def _net(binary: bool, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (net[1], net[5]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return (binarize_(net) if binary else net).eval()


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=32)


def test_ltb_step_by_hand():
    a = torch.tensor([1.0, 3.0, 0.0, 4.0]).view(1, 2, 1, 2)  # channel 0: [1, 3], channel 1: [0, 4]
    # per channel, λ = [2, 1]: overflow [0, 1] -> mean 0.5 -> 2 + 1 = 3; [0, 3] -> mean 1.5 -> 1 + 3 = 4
    torch.testing.assert_close(ltb_step(torch.tensor([2.0, 1.0]), a, True), torch.tensor([3.0, 4.0]))
    # one λ = 2: overflow [0, 1, 0, 2] -> mean 0.75 -> 2 + 1.5 = 3.5
    torch.testing.assert_close(ltb_step(torch.tensor(2.0), a, False), torch.tensor(3.5))
    # a linear layer's activations [B, F]; negative inputs count as 0 (ReLU); a silent feature stays at eps
    f = torch.tensor([[-1.0, 2.0], [-3.0, 6.0]])
    torch.testing.assert_close(ltb_step(torch.zeros(2), f, True), torch.tensor([LTB_EPS, 8.0]))
    torch.testing.assert_close(ltb_clip(a, torch.tensor([2.0, 1.0]), True),
                               torch.tensor([1.0, 2.0, 0.0, 1.0]).view(1, 2, 1, 2))


def test_ltb_step_matches_spikingjelly_hook():
    """spikingjelly 2.0's LocalThresholdBalancingHook computes the same update (batch after batch)."""
    from spikingjelly.activation_based.ann2snn.recipes.local_threshold_balancing import LocalThresholdBalancingHook

    torch.manual_seed(0)
    hook = LocalThresholdBalancingHook()
    lam = torch.zeros(5)
    for _ in range(6):
        a = torch.randn(4, 5, 3, 3).relu() * torch.rand(1, 5, 1, 1) * 3
        out = hook(a)
        lam = ltb_step(lam, a, True)
        torch.testing.assert_close(ltb_clip(a, lam, True), out)
    torch.testing.assert_close(lam, hook.compute_threshold())


class _AuthorsNeuron(nn.Module):
    """putshua/Inference-scale-ANN-SNN layers.py, ``mode='ann'`` with ``c = 1``: ``SpikingNeuron4d.optimize``
    (per channel over dims 0, 2, 3), ``SpikingNeuron2d.optimize`` (over dim 0), ``SpikingNeuron.optimize``
    (one threshold: mean over everything, output ``clamp(x, 0, thre)``); thresholds start at 0."""

    def __init__(self, per_channel: bool) -> None:
        super().__init__()
        self.per_channel, self.thre = per_channel, None

    def forward(self, x):
        if self.thre is None:
            shape = [1, x.shape[1]] + [1] * (x.dim() - 2) if self.per_channel else []
            self.thre = torch.zeros(shape, dtype=x.dtype)
        ub = self.thre
        if self.per_channel:
            dims = (0, 2, 3) if x.dim() == 4 else (0,)
            self.thre = self.thre + (2 * (x - ub) * (x > ub)).mean(dims, keepdim=True)
            return self.thre - torch.relu(self.thre - torch.relu(x))
        self.thre = self.thre + 2 * ((x - ub) * (x > ub).double()).mean()
        return torch.clamp(x, torch.zeros(()).double(), self.thre)


def _authors_thresholds(net: nn.Module, batches, per_channel: dict[int, bool]) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(net).double()
    for i, pc in per_channel.items():
        ref[i] = _AuthorsNeuron(pc)
    with torch.no_grad():
        for x in batches:
            ref(x.double())
    return {str(i): ref[i].thre.reshape(-1).float().squeeze() if per_channel[i] else ref[i].thre.float()
            for i in per_channel}


@pytest.mark.parametrize("binary", [False, True])
def test_convert_ltb_matches_authors_reference(binary):
    """All layers fitted jointly, each on the clipped outputs of the earlier ones: the thresholds convert() stores
    equal the authors' loop over the same 12 batches; a layer feeding a binary layer gets their one-threshold
    update (its spikes must carry one value for the ±1 weights)."""
    torch.manual_seed(2)
    net, x = _net(binary), torch.randn(60, 1, 8, 8)
    cfg = ConvertConfig(threshold_opt="ltb", ltb_iterations=12, ltb_batch_size=8, snn_calibration="none")
    snn = convert(net, _loader(x), cfg)
    # per channel where every consumer is full precision: layer 2 feeds the (binary) conv 4, layer 6 the (binary)
    # linear 8, layer 9 the full-precision output layer
    per_channel = {2: not binary, 6: not binary, 9: True}
    ref = _authors_thresholds(net, ltb_batches(x, 12, 8), per_channel)
    for name, lam in ref.items():
        got = torch.as_tensor(snn.meta["thresholds"][name])
        assert got.shape == lam.shape, (name, got.shape, lam.shape)
        torch.testing.assert_close(got, lam.clamp_min(LTB_EPS), rtol=1e-4, atol=1e-6)
    assert snn.meta["convert"]["threshold"] == "ltb"


def test_ltb_batches_cycle_through_few_samples():
    x = torch.arange(5.0).view(5, 1)
    b = ltb_batches(x, 3, 2)
    assert [t.flatten().tolist() for t in b] == [[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]]


class _Clip(nn.Module):
    def __init__(self, lam: torch.Tensor) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x):
        lam = self.lam.view(1, -1, *([1] * (x.dim() - 2))) if self.lam.numel() > 1 else self.lam
        return torch.minimum(x.clamp_min(0), lam)


@pytest.mark.parametrize("binary", [False, True])
def test_snn_with_ltb_converges_to_the_ann_clipped_at_its_thresholds(binary):
    """LTB only chooses thresholds: with the default shift and potential calibration on, the time-averaged output
    converges (roughly as 1/T) to the ANN with every ReLU clipped at its LTB λ; binary weights stay ±1."""
    net, x = _net(binary), torch.randn(48, 1, 8, 8)
    snn = convert(net, _loader(x), ConvertConfig(threshold_opt="ltb", ltb_batch_size=16,
                                                 snn_calibration_timesteps=4, snn_calibration_samples=48))
    clipped = copy.deepcopy(net)
    for i in (2, 6, 9):
        clipped[i] = _Clip(torch.as_tensor(snn.meta["thresholds"][str(i)]))
    logits = clipped(x).detach()
    mem = run_batch(snn, x, 2048, 256)
    err = {t: ((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in (4, 32, 2048)}
    assert err[2048] < err[32] / 10 and err[2048] < 4e-3, err
    for layer, m in zip(snn.layers, snn.synaptic_modules().values()):
        if layer["binary"]:
            assert set(m.weight.unique().tolist()) == {-1.0, 1.0}, layer["name"]


def test_ltb_config_errors():
    with pytest.raises(ConfigError, match="threshold_opt"):
        ConvertConfig(threshold_opt="lbt").validate()
    with pytest.raises(ConfigError, match="search_percentiles"):
        ConvertConfig(threshold_opt="ltb", search_percentiles=[99.9, 100]).validate()
    with pytest.raises(ConfigError, match="ltb_iterations"):
        ConvertConfig(threshold_opt="ltb", ltb_iterations=0).validate()
