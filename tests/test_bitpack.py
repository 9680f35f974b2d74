"""Bit-packed binary synapses (bsnn.snn.kernels.bitpack): packing, the popcount sum and every engine against
independently computed numbers (python integers, float64 convolutions, the fp32 engine)."""

import importlib
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import SimConfig
from bsnn.simulate import run_batch, simulate
from bsnn.snn import synapse
from bsnn.snn.kernels import bitpack as bp
from bsnn.snn.kernels import extension
from bsnn.snn.synapse import BinarySynapse, synapse_mode
from tests.test_fast_sim import POOLS, _convert, _pooled, _vgg_like

CPP_PATHS = [p for p in bp.PATHS if p != "auto"]
simulate_module = importlib.import_module("bsnn.simulate")  # the module (``bsnn.simulate`` is also the function)


def _engine(name: str) -> bp.Engine:
    if name == "reference":
        return bp.reference_engine()
    paths = bp.extension_paths()
    if paths is None:
        pytest.skip("the bitpack C++ extension cannot be built here")
    if name not in paths:
        pytest.skip(f"this CPU lacks the {name} path")
    return bp.cpp_engine(name)


def _spikes(*shape, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float()


def _pm1(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def _fp32_conv(x, w, b, stride, padding, dilation=1):
    """The fp32 engine's arithmetic (bsnn.snn.synapse float mode): the exact sum, then + bias in float32."""
    y = F.conv2d(x.float(), w, None, stride, padding, dilation)
    return y + b.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------ reference pieces
@pytest.mark.parametrize("k", [1, 63, 64, 65, 130])
def test_pack_bits_layout_and_roundtrip(k):
    bits = _spikes(3, k, seed=k).to(torch.uint8)
    words = bp.pack_bits(bits)
    assert words.shape == (3, -(-k // 64)) and words.dtype == torch.int64
    for r in range(3):  # element i -> bit i % 64 of word i // 64, computed with python integers
        big = sum(int(bits[r, i]) << i for i in range(k))
        expect = [(big >> (64 * j)) & (2**64 - 1) for j in range(words.shape[1])]
        assert [int(v) & (2**64 - 1) for v in words[r]] == expect
    assert torch.equal(bp.unpack_bits(words, k), bits)


def test_popcount_and_popcount_dot():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**63, 2**63 - 1, (5, 4), generator=g, dtype=torch.int64)
    words[0, 0] = -1  # all 64 bits
    assert bp.popcount(words).tolist() == [[bin(int(v) & (2**64 - 1)).count("1") for v in row] for row in words]
    s, w = _spikes(7, 150), _pm1(9, 150)
    expect = s.double() @ w.double().t()  # the {0, 1} x ±1 dot products
    got = bp.popcount_dot(bp.pack_bits(s), bp.pack_bits(w > 0))
    assert torch.equal(got.double(), expect)


def test_packed_im2col_matches_unfold():
    x, geom = _spikes(2, 5, 6, 7), bp.Geometry((3, 2), (2, 1), (1, 0), (1, 2))
    words, _ = bp.pack_spike_map(x)
    cols = bp.packed_im2col(words, 5, geom)  # [N, Ho, Wo, L]
    unf = F.unfold(x, (3, 2), (1, 2), (1, 0), (2, 1))  # [N, C*kh*kw, L] in (c, kh, kw) order
    n, _, length = unf.shape
    ho, wo = geom.output_hw(6, 7)
    expect = unf.view(n, 5, 3, 2, ho, wo).permute(0, 4, 5, 2, 3, 1).reshape(n, ho, wo, 3, 2 * 5)  # kh, (kw, c)
    assert cols.shape == (n, ho, wo, 3 * 1)  # each kernel row's 2 x 5 bits in one word of its own
    assert torch.equal(bp.unpack_bits(cols.view(n, ho, wo, 3, 1), 2 * 5).float(), expect)


def test_pack_weights_rejects_non_binary_weights():
    with pytest.raises(ValueError, match="exactly ±1"):
        bp.pack_weights(torch.randn(4, 3, 3, 3))


# ------------------------------------------------------------------------------------------ engines vs fp32
ENGINES = ["reference", *CPP_PATHS]
CONVS = [  # (N, C, H, W, Cout, k, stride, padding, dilation)
    (3, 70, 9, 7, 13, 3, 1, 1, 1),
    (2, 5, 6, 6, 40, 3, 2, 1, 1),
    (2, 65, 8, 8, 33, 3, 2, 0, 1),
    (1, 129, 5, 6, 9, 1, 1, 0, 1),
    (2, 32, 7, 7, 17, 3, 1, 2, 2),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CONVS, ids=lambda c: "N{}C{}H{}W{}Co{}k{}s{}p{}d{}".format(*c))
def test_conv_is_bit_identical_to_fp32(engine, case):
    n, c, h, w, cout, k, st, pad, dil = case
    eng = _engine(engine)
    x, wt, b = _spikes(n, c, h, w, seed=c), _pm1(cout, c, k, k, seed=cout), torch.randn(cout)
    exact = F.conv2d(x.double(), wt.double(), None, st, pad, dil)  # integer sums, independently
    ref = _fp32_conv(x, wt, b, st, pad, dil)
    pw, g = bp.pack_weights(wt), bp.Geometry((k, k), (st, st), (pad, pad), (dil, dil))
    for inp in (x, x.contiguous(memory_format=torch.channels_last).bfloat16(), x.to(torch.uint8)):
        y = bp.conv2d(inp, pw, b, g, 1.0, eng)
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert torch.equal(y, ref), (engine, inp.dtype)
    y0 = bp.conv2d(x, pw, None, g, 1.0, eng)  # without bias: the integer sums themselves
    assert torch.equal(y0.double(), exact)


@pytest.mark.parametrize("engine", ENGINES)
def test_linear_on_a_batch_of_timesteps(engine):
    eng = _engine(engine)
    for k, cout in [(100, 7), (130, 64), (64, 9)]:
        x, wt, b = _spikes(5, 3, k, seed=k), _pm1(cout, k, seed=cout), torch.randn(cout)  # [T, B, K]
        y = bp.linear(x, bp.pack_weights(wt), b, 1.0, eng)
        assert y.shape == (5, 3, cout)
        assert torch.equal(y, F.linear(x, wt) + b)
        assert torch.equal(bp.linear(x, bp.pack_weights(wt), None, 1.0, eng).double(),
                           x.double() @ wt.double().t())


@pytest.mark.parametrize("engine", ENGINES)
def test_pooled_input_as_bit_planes(engine):
    eng = _engine(engine)
    x = F.avg_pool2d(_spikes(2, 9, 10, 10, p=0.5), 2)  # multiples of 1/4 up to 1: three bit planes
    assert bool(((x != 0) & (x != 1)).any())
    wt, b = _pm1(11, 9, 3, 3), torch.randn(11)
    y = bp.conv2d(x, bp.pack_weights(wt), b, bp.Geometry((3, 3), (1, 1), (1, 1), (1, 1)), 0.25, eng)
    assert torch.equal(y, _fp32_conv(x, wt, b, 1, 1))
    with pytest.raises(ValueError, match="quantum"):
        bp.conv2d(x + 0.1, bp.pack_weights(wt), b, bp.Geometry((3, 3), (1, 1), (1, 1), (1, 1)), 0.25, eng)


@pytest.mark.parametrize("path", CPP_PATHS)
def test_cpp_pack_matches_reference(path):
    eng = _engine(path)
    for c in (5, 64, 70):
        x = _spikes(2, c, 4, 37, seed=c)
        ref, flag = bp.pack_spike_map(x)
        assert not flag
        for inp in (x, x.bfloat16(), x.to(torch.uint8), x.bool(), x.contiguous(memory_format=torch.channels_last),
                    x.contiguous(memory_format=torch.channels_last).bfloat16(), x[:, :, :, 1:]):
            words, not_binary = eng.pack(inp)
            expect = ref if inp.shape == x.shape else bp.pack_spike_map(inp)[0]
            assert torch.equal(words, expect) and not not_binary, (c, inp.dtype, inp.stride())
        bad = x.clone()
        bad[1, c - 1, 3, 36] = 0.5
        assert eng.pack(bad)[1] and eng.pack(bad.bfloat16().contiguous(memory_format=torch.channels_last))[1]
        assert torch.equal(eng.pack(bad)[0], bp.pack_spike_map(bad)[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_pack_counts_planes(engine):
    eng = _engine(engine)
    g = torch.Generator().manual_seed(3)
    for top, quantum in [(4, 0.25), (255, 1.0), (9, 0.0625)]:
        n = torch.randint(0, top + 1, (2, 70, 3, 5), generator=g)
        n[0, 0, 0, 0] = top
        x = (n * quantum).float()
        for inp in (x, x.contiguous(memory_format=torch.channels_last),
                    x.contiguous(memory_format=torch.channels_last).bfloat16() if top < 256 else x):
            planes, exact = eng.pack_counts(inp, quantum)
            assert exact and planes.shape == (top.bit_length(), 2, 3, 5, 2)
            for b in range(planes.shape[0]):  # plane b = bit b of the counts, channels packed per pixel
                assert torch.equal(bp.unpack_bits(planes[b], 70), ((n >> b) & 1).permute(0, 2, 3, 1).to(torch.uint8))
        for bad in (x + quantum / 2, -x - quantum, x * 300 / top):
            assert not eng.pack_counts(bad, quantum)[1]
            assert not eng.pack_counts(bad.contiguous(memory_format=torch.channels_last), quantum)[1]


# ------------------------------------------------------------------------------------------ Triton (interpreter)
TRITON_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from bsnn.snn.kernels import bitpack as bp
    from bsnn.snn.kernels.triton_bitpack import triton_engine
    eng = triton_engine()
    g = torch.Generator().manual_seed(0)
    for n, c, h, w, cout, k, st, pad in [(2, 70, 5, 4, 13, 3, 2, 1), (2, 5, 6, 6, 40, 3, 1, 1)]:
        x = (torch.rand(n, c, h, w, generator=g) < 0.3).float()
        wt = torch.randint(0, 2, (cout, c, k, k), generator=g).float() * 2 - 1
        b = torch.randn(cout, generator=g)
        geom = bp.Geometry((k, k), (st, st), (pad, pad), (1, 1))
        y = bp.conv2d(x, bp.pack_weights(wt), b, geom, 1.0, eng)
        assert torch.equal(y, F.conv2d(x, wt, None, st, pad) + b.view(1, -1, 1, 1)), (n, c)
        xq = 0.25 * torch.randint(0, 5, x.shape, generator=g).float()
        y = bp.conv2d(xq, bp.pack_weights(wt), b, geom, 0.25, eng)
        assert torch.equal(y, F.conv2d(xq, wt, None, st, pad) + b.view(1, -1, 1, 1))
    x = (torch.rand(4, 3, 100, generator=g) < 0.3).float()
    wt = torch.randint(0, 2, (9, 100), generator=g).float() * 2 - 1
    assert torch.equal(bp.linear(x, bp.pack_weights(wt), None, 1.0, eng), F.linear(x, wt))
    print("ok")
""")


@pytest.mark.slow  # a subprocess importing torch and triton: 5 s on an idle machine, 40 s on a loaded one
def test_triton_bitpack_matches_fp32_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------------------ synapse mode
def test_bitpack_mode_is_registered_and_bit_identical_in_simulation():
    if bp.extension_paths() is None:
        pytest.skip("the bitpack C++ extension cannot be built here")
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    ref = run_batch(snn, x, 12, time_chunk=5)
    with synapse_mode(snn, "bitpack") as layers:
        syns = [m for m in snn.modules() if isinstance(m, BinarySynapse)]
        out = run_batch(snn, x, 12, time_chunk=5)
    assert layers and len(syns) == len(layers) and all(s.packed is not None for s in syns)  # the packed path ran
    assert torch.equal(out, ref)
    loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 4), batch_size=16)
    fast = simulate(snn, loader, [1, 4, 12], SimConfig(time_chunk=3, kernel="torch", synapse="bitpack"), quiet=True)
    slow = simulate(snn, loader, [1, 4, 12], SimConfig(time_chunk=3, kernel="torch", synapse="float"), quiet=True)
    assert fast.accuracy == slow.accuracy and fast.spike_counts == slow.spike_counts


@pytest.mark.parametrize("variant", ["plain", "ceil", "sum", "override_2"])
def test_bitpack_mode_on_pooled_inputs(variant):
    if bp.extension_paths() is None:
        pytest.skip("the bitpack C++ extension cannot be built here")
    make, quantum = POOLS[variant]
    snn, x = _convert(_pooled(make()), (3, 7, 7))
    ref = run_batch(snn, x, 10, time_chunk=4)
    with synapse_mode(snn, "bitpack") as layers:
        out = run_batch(snn, x, 10, time_chunk=4)
    assert snn.layers[1]["name"] in layers
    assert torch.equal(out, ref)


@pytest.fixture
def broken_loader(monkeypatch):
    """The extension's loader fails (as without a compiler); the cached results are cleared before and after."""
    def fail(name, source):
        raise OSError("no C++ compiler found")

    bp.extension_paths.cache_clear()
    synapse.bitpack_engine.cache_clear()
    monkeypatch.setattr(extension, "build", fail)
    yield
    bp.extension_paths.cache_clear()
    synapse.bitpack_engine.cache_clear()


def test_failed_build_falls_back_to_bf16_with_one_warning(broken_loader, caplog):
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    ref = run_batch(snn, x, 6, time_chunk=3)
    with caplog.at_level(logging.WARNING):
        with synapse_mode(snn, "bitpack") as layers:
            out = run_batch(snn, x, 6, time_chunk=3)
            out2 = run_batch(snn, x, 6, time_chunk=3)
            syns = [m for m in snn.modules() if isinstance(m, BinarySynapse)]
    assert layers and torch.equal(out, ref) and torch.equal(out2, ref)
    assert all(s.packed is None for s in syns)  # the bf16 path ran
    warnings = [r for r in caplog.records if "bitpack" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "no C++ compiler found" in warnings[0].getMessage() and "bf16" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="not available"):
        bp.cpp_engine()


# ------------------------------------------------------------------------------------------ automatic choice
@pytest.mark.parametrize("margin, expected", [(1e9, "bitpack"), (0.0, "bf16")])
def test_auto_synapse_times_both_modes_once_and_keeps_the_bits(monkeypatch, margin, expected):
    if bp.extension_paths() is None:
        pytest.skip("the bitpack C++ extension cannot be built here")
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 4), batch_size=16)
    ref = simulate(snn, loader, [1, 4, 9], SimConfig(time_chunk=3, kernel="torch", synapse="float"), quiet=True)
    probes = []
    real_iter_chunks = simulate_module.iter_chunks
    monkeypatch.setattr(simulate_module, "iter_chunks",
                        lambda *a, **k: probes.append(a[2]) or real_iter_chunks(*a, **k))
    monkeypatch.setattr(simulate_module, "TUNING_MARGIN", margin)  # bitpack "faster" than bf16 by any / no margin
    monkeypatch.setattr(simulate_module, "resolve_mode", lambda mode, dev: "bf16" if mode == "auto" else mode)
    cfg = SimConfig(time_chunk=3, kernel="torch", synapse="auto")
    for _ in range(2):  # the second simulation reuses the cached choice: no probe
        probes.clear()
        res = simulate(snn, loader, [1, 4, 9], cfg, quiet=True)
        assert res.config["synapse_resolved"] == expected
        assert set(res.config["synapse_tuning"]) == {"bf16_s", "bitpack_s"}
        assert res.accuracy == ref.accuracy and res.spike_counts == ref.spike_counts  # probes left no trace
        n_batches = -(-len(x) // 16)
        assert len(probes) == n_batches + (2 * simulate_module.TUNING_ROUNDS if _ == 0 else 0)
    other_shape = simulate(snn, DataLoader(TensorDataset(x[:5], torch.zeros(5, dtype=torch.long))), [2], cfg,
                           quiet=True)
    assert other_shape.config["synapse_tuning"]  # timed again: the choice is cached per batch shape


def test_auto_synapse_is_not_timed_under_hooks_or_without_bf16():
    if bp.extension_paths() is None:
        pytest.skip("the bitpack C++ extension cannot be built here")
    snn, x = _convert(_vgg_like(), (3, 8, 8))
    assert simulate_module.tune_synapse_mode(snn, x, 3, "direct", "float") == ("float", {})
    seen = []
    h = next(iter(snn.neurons().values())).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:  # a user's hook would see the probe's activations: no probe
        assert simulate_module.tune_synapse_mode(snn, x, 3, "direct", "bf16") == ("bf16", {})
    finally:
        h.remove()
    assert not seen
    mode, times = simulate_module.tune_synapse_mode(snn, x, 3, "direct", "bf16")
    assert mode in ("bf16", "bitpack") and times["bf16_s"] > 0 and times["bitpack_s"] > 0
