"""The C++ IF kernel (``bsnn.snn.kernels.cpp_if``): bit-identical to the oracle on both code paths, every layout
it takes, and the fallback for the ones it does not."""

import dataclasses
import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import BinaryConfig, ConvertConfig, SimConfig
from bsnn.convert import Max, convert
from bsnn.pipeline import build_model

from bsnn.snn.functional import if_multistep
from bsnn.snn.kernels import cpp_if, default_kernel, extension, prescale
from bsnn.snn.kernels.inductor_if import compiler_works
from bsnn.simulate import run_batch, simulate
from bsnn.snn.synapse import BinarySynapse, synapse_mode
from bsnn.snn.neuron import IFNeuron
from tests.test_fast_sim import _binary_eval, _convert, _vgg_like

HAS_COMPILER = compiler_works()
PATHS = (cpp_if.extension_paths() or ()) if HAS_COMPILER else ()
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler here: the IF layers use the fallback")


def test_the_extension_builds_where_a_compiler_exists():
    assert PATHS and PATHS[0] == "generic"


def _oracle(x, theta, v0, gain, bias, pre):
    s, v = if_multistep(prescale(x.float(), gain, bias, pre), theta, v0)
    return s, v, s.flatten(2).sum(2)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if the kernel hands the work to the per-timestep fallback."""
    def fail(*args, **kwargs):
        raise AssertionError("fell back to the compiled per-timestep kernel")
    monkeypatch.setattr(cpp_if, "if_scan_fused", fail)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "linear"])
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16)])
def test_equals_the_oracle_bit_for_bit(no_fallback, path, layout, in_dtype, out_dtype):
    g = torch.Generator().manual_seed(0)
    T, B, C = 7, 5, 3
    shape = (C * 37,) if layout == "linear" else (C, 5, 7)  # 111 / 105 neurons: AVX-512 tails
    x = (torch.randn(T, B, *shape, generator=g) * 0.8).to(in_dtype)
    if in_dtype == torch.bfloat16:  # exact integer sums, as the bf16 synapse delivers them
        x = (x.float() * 4).round().to(in_dtype)
    v0 = torch.rand(B, *shape, generator=g)
    tshape = (C * 37,) if layout == "linear" else (C, 1, 1)
    gain, bias, pre = (torch.rand(tshape, generator=g) + 0.5, torch.randn(tshape, generator=g) * 0.1,
                       torch.randn(tshape, generator=g) * 0.3)
    theta = torch.rand(tshape, generator=g) + 0.4
    if layout == "channels_last":
        x = torch.stack([xt.contiguous(memory_format=torch.channels_last) for xt in x])
        v0 = v0.contiguous(memory_format=torch.channels_last)
    counts = []
    s, v = cpp_if.if_scan_cpp(x, theta, v0.clone(), gain, bias, pre, out_dtype, counts, path=path)
    s_ref, v_ref, n_ref = _oracle(x, theta, v0, gain, bias, pre)
    assert s.dtype == out_dtype and s.shape == x.shape and s.stride() == x.stride()
    assert torch.equal(s.float(), s_ref) and torch.equal(v, v_ref)
    assert torch.equal(torch.stack(counts), n_ref)
    assert 0 < s_ref.mean() < 1  # the case spikes and stays below saturation


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spikes", [True, False])
def test_scaled_residual_equals_the_graphs_multiply_and_add(no_fallback, path, r_dtype, spikes):
    """A shortcut aligned by a per-channel scale, multiplied inside the kernel, equals the unfused graph's
    ``(r * scale.to(r.dtype)).float()`` added after the synaptic bias — bfloat16 rounding of the product included
    (general bf16 values round; {0, 1} spikes are exact)."""
    g = torch.Generator().manual_seed(1)
    T, B, C = 5, 3, 4
    shape, tshape = (C, 5, 7), (C, 1, 1)
    x = (torch.randn(T, B, *shape, generator=g) * 4).round().to(torch.bfloat16)
    r = (torch.rand(T, B, *shape, generator=g) < 0.4).float() if spikes else torch.randn(T, B, *shape, generator=g)
    r = torch.stack([rt.contiguous(memory_format=torch.channels_last) for rt in r.to(r_dtype)])
    x = torch.stack([xt.contiguous(memory_format=torch.channels_last) for xt in x])
    v0 = torch.rand(B, *shape, generator=g).contiguous(memory_format=torch.channels_last)
    scale = torch.rand(tshape, generator=g) * 1.7 - 0.3  # some negative
    gain, pre, theta = torch.rand(tshape, generator=g) + 0.5, torch.randn(tshape, generator=g), torch.rand(tshape) + 0.4
    s, v = cpp_if.if_scan_cpp(x, theta, v0.clone(), gain, None, pre, torch.float32, path=path, residual=r,
                              residual_scale=scale)
    current = (x.float() + pre) + (r * scale.to(r_dtype)).float()  # the graph's ChannelScale, add and cast
    s_ref, v_ref = if_multistep(prescale(current, gain, None), theta, v0)
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref) and 0 < s_ref.mean() < 1
    if r_dtype == torch.bfloat16 and not spikes:  # the rounding matters here: a float32 product would differ
        unrounded = (x.float() + pre) + r.float() * scale.to(r_dtype).float()
        assert not torch.equal(unrounded, current)


@pytest.mark.parametrize("path", PATHS)
def test_scalar_terms_single_step_and_single_sample(no_fallback, path):
    g = torch.Generator().manual_seed(1)
    for T, B in ((1, 3), (4, 1)):
        x = torch.randn(T, B, 2, 3, 3, generator=g)
        v0 = torch.full((B, 2, 3, 3), 0.5)
        s, v = cpp_if.if_scan_cpp(x, torch.ones(()), v0.clone(), torch.tensor(1.3), None, None, path=path)
        s_ref, v_ref, _ = _oracle(x, torch.ones(()), v0, torch.tensor(1.3), None, None)
        assert torch.equal(s, s_ref) and torch.equal(v, v_ref) and s.dtype == torch.float32


def test_membrane_input_untouched_and_state_carries_over_chunks():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 4, 6, generator=g)
    v0 = torch.rand(4, 6, generator=g)
    keep = v0.clone()
    s1, v1 = cpp_if.if_scan_cpp(x[:5], torch.ones(()), v0)
    s2, v2 = cpp_if.if_scan_cpp(x[5:], torch.ones(()), v1)
    s_ref, v_ref, _ = _oracle(x, torch.ones(()), keep, None, None, None)
    assert torch.equal(v0, keep)
    assert torch.equal(torch.cat([s1, s2]), s_ref) and torch.equal(v2, v_ref)


def test_sample_dependent_terms_and_other_layouts_fall_back_to_equal_results(monkeypatch):
    calls = []
    real = cpp_if.if_scan_fused
    monkeypatch.setattr(cpp_if, "if_scan_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 3, 4, 4, generator=g)
    v0 = torch.zeros(4, 3, 4, 4)
    per_sample_bias = torch.randn(4, 3, 1, 1, generator=g) * 0.2  # varies over the batch
    s, v = cpp_if.if_scan_cpp(x, torch.ones(()), v0, None, per_sample_bias)
    s_ref, v_ref, _ = _oracle(x, torch.ones(()), v0, None, per_sample_bias, None)
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref) and calls == [1]
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # batch-major memory: not [T][B][F]
    s, v = cpp_if.if_scan_cpp(xt, torch.ones(()), v0)
    s_ref, v_ref, _ = _oracle(x, torch.ones(()), v0, None, None, None)
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref) and calls == [1, 1]


def test_is_the_default_cpu_kernel():
    assert default_kernel(torch.device("cpu")) == "cpp"


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="code path 'sse9'.*this CPU runs"):
        cpp_if.if_scan_cpp(torch.zeros(2, 1, 3), torch.ones(()), torch.zeros(1, 3), path="sse9")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_current_is_read_once_and_equals_the_repeated_one(no_fallback, path, layout):
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(4, 3, 5, 6, generator=g)
    if layout == "channels_last":
        x1 = x1.contiguous(memory_format=torch.channels_last)
    v0 = torch.full((4, 3, 5, 6), 0.5)
    gain = torch.rand(3, 1, 1, generator=g) + 0.5
    counts = []
    s, v = cpp_if.if_scan_cpp(x1.unsqueeze(0).expand(9, *x1.shape), torch.ones(()), v0, gain, None, None,
                              torch.bfloat16, counts, path=path)
    s_ref, v_ref, n_ref = _oracle(x1.unsqueeze(0).repeat(9, 1, 1, 1, 1), torch.ones(()), v0, gain, None, None)
    assert torch.equal(s.float(), s_ref) and torch.equal(v, v_ref) and torch.equal(torch.stack(counts), n_ref)
    assert s.reshape(36, 3, 5, 6).shape == (36, 3, 5, 6) and s[0].stride() == x1.stride()


def test_neuron_forward_constant_equals_forward_on_the_repeat():
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(3, 4, 2, 2, generator=g) + 0.3
    pair = [IFNeuron(torch.rand(4, 1, 1, generator=g) + 0.5, 0.5, "n", (4, 1, 1)) for _ in range(2)]
    for n in pair:
        n.kernel, n.time_chunk = "cpp", 4
        n.i_bias.copy_(torch.randn(4, 1, 1, generator=g) * 0.1)  # bias window ending inside the second chunk
        n.i_bias_steps.fill_(6)
    pair[1].load_state_dict(pair[0].state_dict())
    a = torch.cat([pair[0].forward_constant(x1) for _ in range(3)])
    b = torch.cat([pair[1](x1.repeat(4, 1, 1, 1)) for _ in range(3)])
    assert torch.equal(a, b) and torch.equal(pair[0].v, pair[1].v)
    assert pair[0].spike_count == pair[1].spike_count and sum(pair[0].spike_count) > 0


def test_simulator_feeds_the_first_neurons_once_per_chunk_and_falls_back_under_hooks():
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    _, _, once, readers = snn.split_static_constant()
    assert once == (True,) and [type(m) for m in readers] == [IFNeuron]
    fast = run_batch(snn, x, 10, time_chunk=4)
    calls = []
    h = readers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        hooked = run_batch(snn, x, 10, time_chunk=4)  # hooks see the usual [Tc * B, ...] input
    finally:
        h.remove()
    slow = run_batch(snn, x, 10, time_chunk=1)  # the repeat materialised, one step per call
    assert torch.equal(fast, hooked)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)  # GEMM blocking differs with the batch size
    assert calls == [4 * len(x), 4 * len(x), 2 * len(x)]


def _binary_resnet20(n=16):
    torch.manual_seed(0)
    net = build_model({"name": "resnet20_cifar", "num_classes": 10, "in_channels": 3, "kwargs": {},
                       "binary": dataclasses.asdict(BinaryConfig())})
    x = torch.randn(n, 3, 16, 16)
    for m in net.modules():  # settle BN on the data: sane activations, so the network spikes
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    loader = DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=n)
    return convert(net, loader, ConvertConfig(threshold=Max(), v_init=0.5)), x


def test_residual_sums_fused_into_the_neurons_bit_identical_and_restored():
    snn, x = _binary_resnet20()
    code = snn.graph_module.code
    ref = run_batch(snn, x, 9, time_chunk=4)  # fp32 graph, unfused
    with synapse_mode(snn, "bf16") as layers:
        fused = [n for n in snn.graph_module.graph.nodes if n.target == "forward_residual"]
        out = run_batch(snn, x, 9, time_chunk=4)
        counts = {k: list(m.spike_count) for k, m in snn.neurons().items()}
        calls = []
        first = snn.graph_module.get_submodule(fused[0].args[0].target)
        h = first.register_forward_hook(lambda m, i, o: calls.append(1))  # hooks: the unfused sum via __call__
        try:
            hooked = run_batch(snn, x, 9, time_chunk=4)
        finally:
            h.remove()
    assert layers and len(fused) == 9  # all nine blocks of ResNet-20 (the two projection shortcuts included)
    assert all(len(n.args) == 4 for n in fused)  # each shortcut's alignment scale applied inside the kernel
    # the neurons feeding a block's shortcut (and its first conv) emit bf16 spikes, scaled in float32 in the kernel
    assert sum(bool(n.kwargs.get("spikes")) for n in fused) >= 6
    assert torch.equal(out, ref) and torch.equal(hooked, ref) and len(calls) == 3
    assert snn.graph_module.code == code  # the graph is back
    run_batch(snn, x, 9, time_chunk=4)
    ref_counts = {k: list(m.spike_count) for k, m in snn.neurons().items()}
    assert counts == ref_counts and sum(map(sum, counts.values())) > 0


def test_simulate_with_fused_residual_sums_equals_the_fp32_engine():
    snn, x = _binary_resnet20()
    loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 10), batch_size=8)
    fast = simulate(snn, loader, [1, 4, 9], SimConfig(time_chunk=4), quiet=True)
    slow = simulate(snn, loader, [1, 4, 9], SimConfig(time_chunk=4, kernel="torch", synapse="float"), quiet=True)
    assert fast.accuracy == slow.accuracy and fast.spike_counts == slow.spike_counts


def test_failed_build_falls_back_to_the_compiled_kernel_with_one_warning(monkeypatch, caplog):
    def fail(name, source):
        raise OSError("no C++ compiler found")

    cpp_if.extension_paths.cache_clear()
    monkeypatch.setattr(extension, "build", fail)
    try:
        with caplog.at_level(logging.WARNING):
            assert default_kernel(torch.device("cpu")) == "inductor"
            x, v0 = torch.randn(3, 2, 5), torch.zeros(2, 5)
            s, v = cpp_if.if_scan_cpp(x, torch.ones(()), v0)
        s_ref, v_ref, _ = _oracle(x, torch.ones(()), v0, None, None, None)
        assert torch.equal(s, s_ref) and torch.equal(v, v_ref)
        warnings = [r.getMessage() for r in caplog.records if "IF kernel" in r.getMessage()]
        assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "per-timestep" in warnings[0]
    finally:
        cpp_if.extension_paths.cache_clear()


@pytest.mark.parametrize("time_chunk", [3, 1])
def test_the_neuron_checks_the_bf16_sums_it_reads_and_reruns_inexact_chunks(time_chunk):
    torch.manual_seed(7)
    conv = nn.Conv2d(64, 4, 3, padding=1, bias=True)
    conv.weight.data = torch.where(torch.rand_like(conv.weight) < 0.9, 1.0, -1.0)  # sums up to ~460: not exact
    pair = [IFNeuron(4.0, 0.5, "n") for _ in range(2)]
    syn = BinarySynapse(conv, 1.0, "bf16")
    syn.defer_bias, syn.consumer = True, pair[0]
    pair[0].pre_bias = conv.bias.detach().view(-1, 1, 1)
    for n in pair:
        n.kernel, n.time_chunk = "cpp", time_chunk
    dense = torch.ones(time_chunk * 2, 64, 5, 5)  # every input spikes: inexact sums
    sparse = (torch.rand(time_chunk * 2, 64, 5, 5) < 0.05).float()  # small sums: exact
    for x, fallbacks in ((dense, 1), (sparse, 1), (dense, 2)):
        out = pair[0](syn(x))
        ref = pair[1](nn.functional.conv2d(x, conv.weight, None, padding=1) + conv.bias.view(1, -1, 1, 1))
        assert torch.equal(out.float(), ref) and torch.equal(pair[0].v, pair[1].v) and syn.fallbacks == fallbacks
        assert pair[0].exactness is None  # consumed by the call it was meant for
    assert pair[0].spike_count == pair[1].spike_count


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hw", [(6, 8), (7, 9), (2, 3)])  # odd H or W: the last row / column is in no window
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16)])
def test_pooled_spikes_equal_the_oracles_spikes_average_pooled(no_fallback, path, hw, in_dtype, out_dtype):
    g = torch.Generator().manual_seed(0)
    T, B, C = 6, 3, 19  # 19 channels: a full AVX-512 vector and a masked tail
    x = (torch.randn(T, B, C, *hw, generator=g) * 0.8)
    x = ((x * 4).round() if in_dtype == torch.bfloat16 else x).to(in_dtype)
    x = torch.stack([xt.contiguous(memory_format=torch.channels_last) for xt in x])
    v0 = torch.rand(B, C, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    gain, bias, pre = (torch.rand(C, 1, 1, generator=g) + 0.5, torch.randn(C, 1, 1, generator=g) * 0.1,
                       torch.randn(C, 1, 1, generator=g) * 0.3)
    theta = torch.rand(C, 1, 1, generator=g) + 0.4
    counts = []
    s, v, amax = cpp_if.if_scan_cpp(x, theta, v0.clone(), gain, bias, pre, out_dtype, counts, path=path,
                                    absmax=True, pool=True)
    s_ref, v_ref, n_ref = _oracle(x, theta, v0, gain, bias, pre)
    pooled = cpp_if.avg_pool_2x2(s_ref)
    assert s.dtype == out_dtype and s.shape == (T, B, C, hw[0] // 2, hw[1] // 2)
    assert s[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(s.float(), pooled) and torch.equal(v, v_ref)  # every membrane, uncovered ones included
    assert torch.equal(torch.stack(counts), n_ref) and amax == float(x.float().abs().max())
    assert 0 < s_ref.mean() < 1 and (pooled % 1 != 0).any()  # fractional pooled values occur


@pytest.mark.parametrize("path", PATHS)
def test_pooled_constant_current_and_fallback_layouts(monkeypatch, path):
    g = torch.Generator().manual_seed(1)
    T, B, C, H, W = 5, 2, 4, 6, 6
    one = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    theta, v0 = torch.tensor(0.7), torch.zeros(B, C, H, W)
    s, v = cpp_if.if_scan_cpp(one.unsqueeze(0).expand(T, *one.shape), theta, v0, path=path, pool=True)
    s_ref, v_ref = cpp_if.if_scan_cpp(one.unsqueeze(0).expand(T, *one.shape).contiguous(), theta, v0, path=path)
    assert torch.equal(s, cpp_if.avg_pool_2x2(s_ref)) and torch.equal(v.contiguous(), v_ref.contiguous())
    calls = []  # an NCHW sample is not pooled in the kernel: the unpooled scan, then avg_pool2d
    monkeypatch.setattr(cpp_if, "if_scan_fused", lambda *a, **k: calls.append(1) or (s_ref, v_ref))
    x = one.contiguous().unsqueeze(0).expand(T, *one.shape).contiguous()
    s2, _ = cpp_if.if_scan_cpp(x, theta, v0, path=path, pool=True)
    assert calls and torch.equal(s2, cpp_if.avg_pool_2x2(s_ref))
    with pytest.raises(ValueError, match="pool needs"):
        cpp_if.if_scan_cpp(x[..., :1], theta, v0[..., :1], path=path, pool=True)


def test_average_pools_fused_into_the_neurons_bit_identical_and_restored():
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    code = snn.graph_module.code
    ref = run_batch(snn, x, 9, time_chunk=4)  # fp32 graph, unfused
    ref_counts = {k: list(m.spike_count) for k, m in snn.neurons().items()}
    with synapse_mode(snn, "bf16"):
        pooled = [n for n in snn.graph_module.graph.nodes if n.target == "forward_pooled"]
        assert not any(type(snn.graph_module.get_submodule(n.target)).__name__ == "AvgPool2d"
                       for n in snn.graph_module.graph.nodes if n.op == "call_module")
        out = run_batch(snn, x, 9, time_chunk=4)
        counts = {k: list(m.spike_count) for k, m in snn.neurons().items()}
        calls = []
        first = snn.graph_module.get_submodule(pooled[0].args[0].target)
        h = first.register_forward_hook(lambda m, i, o: calls.append(o.shape))  # hooks see the unpooled spikes
        try:
            hooked = run_batch(snn, x, 9, time_chunk=4)
        finally:
            h.remove()
    assert len(pooled) == 2  # both 2x2 poolings of the VGG
    assert torch.equal(out, ref) and torch.equal(hooked, ref) and counts == ref_counts
    assert calls and calls[0][-1] == 8  # full resolution: the pooling ran as its own module
    assert snn.graph_module.code == code  # the graph is back


def test_simulate_with_fused_pooling_equals_the_fp32_engine():
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 4), batch_size=8)
    cfg = dict(time_chunk=3, record_predictions=True)
    fast = simulate(snn, loader, [1, 4, 9], SimConfig(**cfg), quiet=True)
    slow = simulate(snn, loader, [1, 4, 9], SimConfig(kernel="torch", synapse="float", **cfg), quiet=True)
    assert fast.accuracy == slow.accuracy and fast.spike_counts == slow.spike_counts
    assert torch.equal(torch.as_tensor(fast.predictions), torch.as_tensor(slow.predictions))


def _pool_first_cnn():
    """The first IF layer (fed by the input-only part of the graph) pools: conv-BN-ReLU-avgpool first."""
    torch.manual_seed(0)
    return _binary_eval(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 24), nn.ReLU(), nn.Linear(24, 4)))


def test_first_neurons_pool_their_constant_current_in_the_kernel():
    """Direct input: the first IF layer reads one timestep's current once per chunk *and* pools 2x2 in the same
    pass (``forward_pooled(x, pool, constant=True)``); equal to the fp32 engine, also under hooks."""
    snn, x = _convert(_pool_first_cnn(), (1, 8, 8))
    ref = run_batch(snn, x, 10, time_chunk=4)
    with synapse_mode(snn, "bf16"):
        _, suffix, once, readers = snn.split_static_constant()
        fused = [n for n in suffix.graph.nodes if n.target == "forward_pooled"]
        assert once == (True,) and [type(m) for m in readers] == [IFNeuron]
        assert len(fused) == 2 and [n.kwargs.get("constant", False) for n in fused] == [True, False]
        out = run_batch(snn, x, 10, time_chunk=4)
        calls = []
        h = readers[0].register_forward_hook(lambda m, i, o: calls.append(o.shape))
        try:
            hooked = run_batch(snn, x, 10, time_chunk=4)  # hooks: the unfused modules, the repeat materialised
        finally:
            h.remove()
    assert torch.equal(out, ref) and torch.equal(hooked, ref)
    assert calls and calls[0][-1] == 8
    loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 4), batch_size=8)
    fast = simulate(snn, loader, [1, 4, 10], SimConfig(time_chunk=4), quiet=True)
    slow = simulate(snn, loader, [1, 4, 10], SimConfig(time_chunk=4, kernel="torch", synapse="float"), quiet=True)
    assert fast.accuracy == slow.accuracy and fast.spike_counts == slow.spike_counts
