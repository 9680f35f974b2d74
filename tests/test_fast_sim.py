"""Fast simulation: fused kernels and exact synapse modes must reproduce the oracle / fp32 engine bit for bit."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.config import BinaryConfig, ConvertConfig, SimConfig
from bsnn.convert import Max, convert
from bsnn.simulate import TUNING_MARGIN, run_batch, simulate
from bsnn.snn.functional import if_multistep
from bsnn.snn.kernels import KERNELS, prescale
from bsnn.snn.neuron import per_sample_spikes
from bsnn.snn.synapse import BinarySynapse, eligible_layers, int_matmul, resolve_mode, synapse_mode
from tests.test_convert import _residual

CPU_KERNELS = [k for k in KERNELS.names() if k != "triton"]  # triton: tests/test_triton_kernel.py


def _vgg_like(seed=0):
    torch.manual_seed(seed)
    return _binary_eval(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 4)))


def _binary_eval(net: nn.Module) -> nn.Module:
    """``net`` with spread-out BN statistics (so that its layers spike at varied rates), binarised, eval mode."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return binarize_(net, BinaryConfig()).eval()


def _convert(net, shape, n=32):
    torch.manual_seed(1)
    x = torch.randn(n, *shape)
    loader = DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=16)
    return convert(net, loader, ConvertConfig(threshold=Max(), v_init=0.5)), x


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_with_gain_bias_and_counts_equal_oracle(name, layout):
    torch.manual_seed(0)
    T, B, C = 6, 4, 3
    x = torch.randn(T, B, C, 5, 5)
    v0 = torch.rand(B, C, 5, 5)
    if layout == "channels_last":
        x = torch.stack([xt.contiguous(memory_format=torch.channels_last) for xt in x])
        v0 = v0.contiguous(memory_format=torch.channels_last)
    gain, bias, pre = torch.rand(C, 1, 1) + 0.5, torch.randn(C, 1, 1) * 0.1, torch.randn(C, 1, 1) * 0.3
    s_ref, v_ref = if_multistep(prescale(x, gain, bias, pre), torch.ones(()), v0)
    counts = []
    s, v = KERNELS.get(name)(x.bfloat16().float(), torch.ones(()), v0.clone(), gain, bias, pre,
                             torch.bfloat16, counts)
    s_ref2, v_ref2 = if_multistep(prescale(x.bfloat16().float(), gain, bias, pre), torch.ones(()), v0)
    assert s.dtype == torch.bfloat16
    assert torch.equal(s.float(), s_ref2) and torch.equal(v, v_ref2)
    assert torch.equal(torch.stack(counts), s_ref2.flatten(2).sum(2))
    assert not torch.equal(s_ref, torch.zeros_like(s_ref))  # the test case actually spikes


def test_per_sample_spikes_any_layout():
    s = (torch.rand(3, 4, 5, 6, 7) < 0.3).float()
    cl = torch.stack([t.contiguous(memory_format=torch.channels_last) for t in s])
    assert torch.equal(per_sample_spikes(s), s.flatten(2).sum(2))
    assert torch.equal(per_sample_spikes(cl), s.flatten(2).sum(2))


def test_eligible_layers_and_quanta():
    snn, _ = _convert(_vgg_like(), (3, 8, 8))
    layers = eligible_layers(snn)
    names = [l["name"] for l in snn.layers]
    assert names[0] not in layers and names[-1] not in layers  # analog input; full-precision last layer
    assert layers[names[1]] == 1.0  # fed straight by spikes
    assert layers[names[2]] == 0.25  # after 2x2 average pooling
    assert layers[names[3]] == 0.25  # flatten(avg-pooled spikes)


# every nn.AvgPool2d variant between IF neurons and a binary layer, on a 7 x 7 map: (pool, expected quantum or None
# where the fast paths must fall back to fp32). Divisors per output position in brackets.
POOLS = {
    "plain": (lambda: nn.AvgPool2d(2), 1 / 4),  # [4]
    "ceil": (lambda: nn.AvgPool2d(2, ceil_mode=True), 1 / 4),  # clipped edge windows [4, 2, 1]
    "pad_excluded": (lambda: nn.AvgPool2d(2, padding=1, count_include_pad=False), 1 / 4),  # [4, 2, 1]
    "pad_included": (lambda: nn.AvgPool2d(2, padding=1), 1 / 4),  # [4]
    "ceil_4": (lambda: nn.AvgPool2d(4, 4, ceil_mode=True), None),  # 7 = 4 + 3: [16, 12, 9], lcm 144
    "pad_4": (lambda: nn.AvgPool2d(4, 4, padding=1, ceil_mode=True), 1 / 16),  # padding counted: [16]
    "ceil_4_stride_2": (lambda: nn.AvgPool2d(4, 2, ceil_mode=True), None),  # [16, 12, 9]: lcm 144
    "pad_excluded_4": (lambda: nn.AvgPool2d(4, 3, padding=1, count_include_pad=False), None),  # [16, 12, 9]
    "override_3": (lambda: nn.AvgPool2d(2, divisor_override=3), None),  # values n/3
    "override_2": (lambda: nn.AvgPool2d(2, divisor_override=2), 1 / 2),  # values n/2 up to 2
    "sum": (lambda: nn.AvgPool2d(2, divisor_override=1), 1.0),  # sum pooling: counts up to 4
    "three": (lambda: nn.AvgPool2d(3, 1, 1), None),  # [9]
    "twice": (lambda: nn.Sequential(nn.AvgPool2d(2, 1), nn.AvgPool2d(2, ceil_mode=True)), 1 / 16),
}


def _pooled(pool, seed=0):
    """conv(FP) -> BN -> ReLU -> pool -> binary conv -> BN -> ReLU -> flatten -> linear(FP), on 3 x 7 x 7."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), *(
        pool if isinstance(pool, nn.Sequential) else [pool]), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Flatten())
    net = nn.Sequential(*head, nn.Linear(head(torch.zeros(1, 3, 7, 7)).shape[1], 4))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.0, 0.3)
    return binarize_(net, BinaryConfig()).eval()


@pytest.mark.parametrize("variant", list(POOLS))
def test_every_pooling_variant_is_exact_or_falls_back(variant):
    make, quantum = POOLS[variant]
    snn, x = _convert(_pooled(make()), (3, 7, 7))
    binary = snn.layers[1]["name"]
    assert eligible_layers(snn).get(binary) == quantum
    ref = run_batch(snn, x, 10, time_chunk=4)
    assert bool(ref.abs().sum() > 0)
    for mode in ("float", "bf16", "int"):
        with synapse_mode(snn, mode) as layers:
            out = run_batch(snn, x, 10, time_chunk=4)
        assert (binary in layers) == (quantum is not None)
        assert torch.equal(out, ref), mode


@pytest.mark.parametrize("builder,shape", [(_vgg_like, (3, 8, 8)), (_residual, (1, 8, 8))])
def test_synapse_modes_are_bit_identical(builder, shape):
    snn, x = _convert(builder(), shape)
    ref = run_batch(snn, x, 12, time_chunk=5)
    for mode in ("float", "bf16", "int"):
        with synapse_mode(snn, mode) as layers:
            out = run_batch(snn, x, 12, time_chunk=5)
        assert torch.equal(out, ref), mode
    assert layers or builder is _residual
    # the originals are back
    assert not any(isinstance(m, BinarySynapse) for m in snn.modules())


def test_bf16_falls_back_when_sums_are_not_exact():
    conv = nn.Conv2d(64, 4, 3, padding=1, bias=True)
    conv.weight.data = torch.ones_like(conv.weight)
    x = torch.ones(2, 64, 5, 5)  # sums up to 576 >= 256: not exact in bf16
    exact = nn.functional.conv2d(x, conv.weight, None, padding=1) + conv.bias.view(1, -1, 1, 1)
    syn = BinarySynapse(conv, 1.0, "bf16")
    assert torch.equal(syn(x), exact) and syn.fallbacks == 1
    small = (torch.rand(2, 64, 5, 5) < 0.05).float()
    syn(small)
    assert syn.fallbacks == 1  # small sums stay in bf16
    assert torch.equal(BinarySynapse(conv, 1.0, "int")(x), exact)


def test_int_matmul_exact():
    a = torch.randint(0, 5, (40, 48), dtype=torch.int8)
    b = torch.randint(-1, 2, (48, 24), dtype=torch.int8)
    assert torch.equal(int_matmul(a, b), a.int() @ b.int())
    assert torch.equal(int_matmul(a[:3, :5], b[:5, :3]), a[:3, :5].int() @ b[:5, :3].int())  # odd shapes


def test_simulate_default_engine_matches_fp32_engine():
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 4), batch_size=16)
    fast = simulate(snn, loader, [1, 4, 16], SimConfig(time_chunk=3), quiet=True)
    slow = simulate(snn, loader, [1, 4, 16], SimConfig(time_chunk=3, kernel="torch", synapse="float"), quiet=True)
    assert fast.accuracy == slow.accuracy and fast.spike_counts == slow.spike_counts
    tuning = fast.config["synapse_tuning"]  # bitpack only where the automatic choice timed it faster
    timed_faster = bool(tuning) and tuning["bitpack_s"] < TUNING_MARGIN * tuning["bf16_s"]
    assert fast.config["exact_layers"]
    assert fast.config["synapse_resolved"] == ("bitpack" if timed_faster else resolve_mode("auto", torch.device("cpu")))
