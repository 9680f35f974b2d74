"""CUDA paths against the CPU: the Triton IF scan, bf16 synapses and a whole simulation, bit for bit.

Marked ``gpu`` (deselected by default; run with ``-m gpu``) and skipped without a CUDA device.
"""

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.config import BinaryConfig, ConvertConfig, SimConfig
from bsnn.convert import Max, convert
from bsnn.simulate import run_batch, simulate
from bsnn.snn.functional import if_multistep
from bsnn.snn.kernels import default_kernel, get_kernel
from bsnn.snn.neuron import ChannelScale
from bsnn.snn.synapse import BinarySynapse, eligible_layers, resolve_mode, synapse_mode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")


# ------------------------------------------------------------------------------------------- Triton IF scan
@pytest.mark.parametrize("shape,per_channel", [((7, 3, 4, 5, 5), True), ((9, 5, 33), False),
                                               ((5, 3, 8, 37, 41), True)])  # the last: 36k neurons, many blocks
def test_triton_if_scan_on_cuda_equals_cpu_oracle(shape, per_channel):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    x = torch.randn(*shape)
    v0 = torch.rand(*shape[1:]) * 0.5
    theta = torch.rand(shape[2], *[1] * (len(shape) - 3)) + 0.3 if per_channel else torch.tensor(0.7)
    s_ref, v_ref = if_multistep(x, theta, v0)
    s, v = get_kernel("triton")(x.to(DEVICE), theta.to(DEVICE), v0.to(DEVICE))
    assert s.device.type == "cuda" and v.device.type == "cuda"
    assert torch.equal(s.cpu(), s_ref)  # spikes exact
    assert torch.equal(v.cpu(), v_ref)  # v + x and v - s·θ are single correctly rounded fp32 operations
    assert 0 < s_ref.mean() < 1


def test_triton_kernel_interface_on_cuda_equals_reference_on_cpu():
    """gain, bias, deferred synaptic bias, bf16 spikes and per-sample counts, as IFNeuron calls it."""
    pytest.importorskip("triton")
    torch.manual_seed(1)
    T, B, C = 6, 4, 3
    x = torch.randn(T, B, C, 5, 5).bfloat16()
    v0 = torch.rand(B, C, 5, 5)
    gain, bias, pre = torch.rand(C, 1, 1) + 0.5, torch.randn(C, 1, 1) * 0.1, torch.randn(C, 1, 1) * 0.3
    counts_ref, counts = [], []
    s_ref, v_ref = get_kernel("reference")(x, torch.ones(()), v0, gain, bias, pre, torch.bfloat16, counts_ref)
    args = [t.to(DEVICE) for t in (x, torch.ones(()), v0, gain, bias, pre)]
    s, v = get_kernel("triton")(*args, torch.bfloat16, counts)
    assert s.dtype == torch.bfloat16 and s.device.type == "cuda"
    assert torch.equal(s.cpu(), s_ref) and torch.equal(v.cpu(), v_ref)
    assert torch.equal(torch.stack(counts).cpu(), torch.stack(counts_ref))
    assert s_ref.float().mean() > 0


# ------------------------------------------------------------------------------------------- bf16 synapses
def _binary_layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Conv2d(16, 8, 3, padding=1) if kind == "conv" else nn.Linear(144, 12)
    layer.weight.data = torch.where(torch.rand_like(layer.weight) < 0.5, -1.0, 1.0)
    layer.bias.data = torch.randn_like(layer.bias)
    return layer


def _spike_input(kind: str, quantum: float, seed: int = 0) -> torch.Tensor:
    """Spikes (quantum 1) or 2x2 average-pooled spikes (quantum 1/4) for the layer ``kind``."""
    g = torch.Generator().manual_seed(seed)
    side = 6 if quantum == 1.0 else 12
    s = (torch.rand(5, 16, side, side, generator=g) < 0.3).float()
    x = s if quantum == 1.0 else F.avg_pool2d(s, 2)
    return x if kind == "conv" else x[:, :4, :, :].flatten(1)  # linear: 4 x 6 x 6 = 144 features


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("quantum", [1.0, 0.25])
def test_bf16_synapse_on_cuda_equals_fp32_on_cpu(kind, quantum):
    assert resolve_mode("auto", DEVICE) == "bf16"  # what simulate picks on CUDA
    layer, x = _binary_layer(kind), _spike_input(kind, quantum)
    ref = BinarySynapse(layer, quantum, "float")(x)
    syn = BinarySynapse(copy.deepcopy(layer).to(DEVICE), quantum, "bf16")
    out = syn(x.to(DEVICE))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert syn.fallbacks == 0  # computed in bf16, not by the fp32 fallback
    assert torch.equal(out.cpu(), ref)


def test_bf16_synapse_on_cuda_falls_back_exactly_when_sums_reach_256():
    conv = nn.Conv2d(64, 4, 3, padding=1)
    conv.weight.data = torch.ones_like(conv.weight)
    x = torch.ones(2, 64, 5, 5)  # sums up to 576: not exact in bf16
    exact = F.conv2d(x, conv.weight, None, padding=1) + conv.bias.view(1, -1, 1, 1)
    syn = BinarySynapse(copy.deepcopy(conv).to(DEVICE), 1.0, "bf16")
    assert torch.equal(syn(x.to(DEVICE)).cpu(), exact) and syn.fallbacks == 1


# ------------------------------------------------------------------------------------------- whole simulation
def _dyadic_(t: torch.Tensor, denom: int = 16) -> None:
    t.copy_(torch.round(t * denom) / denom)


def _exact_snn():
    """A converted binary CNN (per-channel thresholds, biases, θ/2 shift, bias calibration) whose full-precision
    first and last layers hold small dyadic weights and whose output scale is a power of two.

    Then every sum in the network is exact in fp32 in any order (and in TF32), so CPU and CUDA — different
    convolution algorithms and reduction orders — must agree bit for bit, not just closely.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.3)
    net = binarize_(net, BinaryConfig()).eval()
    x = torch.round(torch.randn(96, 1, 8, 8) * 8).clamp(-24, 24) / 8  # dyadic inputs
    y = net(x).argmax(1)
    calib = DataLoader(TensorDataset(x, y), batch_size=32)
    snn = convert(net, calib, ConvertConfig(threshold=Max(), v_init=0.5, calib_samples=96, snn_calibration="bias",
                                            snn_calibration_timesteps=4, snn_calibration_samples=96))
    with torch.no_grad():
        for layer in snn.layers:
            if not layer["binary"]:
                m = snn.synaptic_modules()[layer["name"]]
                _dyadic_(m.weight)
                if m.bias is not None:
                    _dyadic_(m.bias)
        for m in snn.modules():
            if isinstance(m, ChannelScale):
                m.scale.copy_(torch.exp2(torch.round(torch.log2(m.scale))))
                if m.bias is not None:
                    _dyadic_(m.bias)
    return snn, x, y


def test_simulate_on_cuda_equals_cpu_bit_for_bit():
    snn, x, y = _exact_snn()
    assert eligible_layers(snn)  # the binary layers run in bf16 on CUDA
    loader = DataLoader(TensorDataset(x, y), batch_size=48)
    ts = [1, 2, 4, 8, 16, 32]
    cpu = simulate(copy.deepcopy(snn), loader, ts, SimConfig(time_chunk=5, kernel="torch", synapse="float",
                                                             record_predictions=True), device="cpu", quiet=True)
    gpu_snn = copy.deepcopy(snn)
    gpu = simulate(gpu_snn, loader, ts, SimConfig(time_chunk=5, kernel="triton", synapse="bf16",
                                                  record_predictions=True), device=DEVICE, quiet=True)
    assert gpu.config["synapse_resolved"] == "bf16" and gpu.config["exact_layers"]
    assert gpu.accuracy == cpu.accuracy
    assert gpu.spike_counts == cpu.spike_counts
    assert torch.equal(gpu.predictions, cpu.predictions) and torch.equal(gpu.margins, cpu.margins)
    assert 0 < sum(map(sum, cpu.spike_counts.values()))
    # the output membrane itself at every T, through the fused paths, and with the CUDA defaults
    with torch.no_grad(), synapse_mode(snn, "float"):
        ref = run_batch(snn.cpu().eval(), x, 32, 5)
    with torch.no_grad(), synapse_mode(gpu_snn, "bf16"):
        out = run_batch(gpu_snn, x.to(DEVICE), 32, 5)
    assert torch.equal(out.cpu(), ref)
    auto = simulate(copy.deepcopy(snn), loader, ts, SimConfig(time_chunk=5), device=DEVICE, quiet=True)
    assert auto.accuracy == cpu.accuracy and auto.spike_counts == cpu.spike_counts
    assert auto.config["synapse_resolved"] == "bf16"
    assert default_kernel(DEVICE) == ("triton" if importlib.util.find_spec("triton") else "torch")
