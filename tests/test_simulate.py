import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.binary import binarize_
from bsnn.config import ConvertConfig, SimConfig
from bsnn.convert import Max, convert
from bsnn.errors import ConfigError, ConversionError
from bsnn.report import write_sweep
from bsnn.simulate import run_batch, simulate
from bsnn.snn.encode import get_encoder
from bsnn.snn.functional import if_multistep
from bsnn.snn.kernels import KERNELS


def _setup(seed=0, n=48):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    binarize_(net).eval()
    x = torch.randn(n, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::5] = (y[::5] + 1) % 3  # some disagreement so accuracy is not trivially 100
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return net, convert(net, loader, ConvertConfig(threshold=Max())), loader


def test_one_pass_sweep_equals_separate_runs():
    net, snn, loader = _setup()
    ts = [1, 3, 8, 20]
    res = simulate(snn, loader, ts, SimConfig(time_chunk=7), ann=net, quiet=True)
    for t in ts:
        alone = simulate(snn, loader, [t], SimConfig(time_chunk=7), quiet=True)
        assert alone.accuracy[t] == res.accuracy[t]
        assert alone.spike_counts == {k: v[:t] for k, v in res.spike_counts.items()}
    assert res.samples == 48 and res.ann_accuracy == pytest.approx(100 * 38 / 48, abs=5)


def test_chunked_equals_unchunked():
    _, snn, loader = _setup()
    x = next(iter(loader))[0]
    a = run_batch(snn, x, 40, time_chunk=40)
    b = run_batch(snn, x, 40, time_chunk=3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ra = simulate(snn, loader, [5, 40], SimConfig(time_chunk=40), quiet=True)
    rb = simulate(snn, loader, [5, 40], SimConfig(time_chunk=1), quiet=True)
    assert ra.accuracy == rb.accuracy and ra.spike_counts == rb.spike_counts


def test_firing_rates_and_counts():
    _, snn, loader = _setup()
    res = simulate(snn, loader, [4, 16], quiet=True)
    assert list(res.spike_counts) == snn.neuron_names
    assert res.neurons[snn.neuron_names[0]] == 6 * 8 * 8
    for name, rate in res.firing_rates().items():
        assert 0.0 < rate <= 1.0
        assert rate == pytest.approx(sum(res.spike_counts[name]) / (res.neurons[name] * 48 * 16))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["accuracy"]["16"] == res.accuracy[16]


@pytest.mark.parametrize("name", [k for k in KERNELS.names() if k != "triton"])  # triton: test_triton_kernel.py
@pytest.mark.parametrize("unit_threshold", [False, True])
def test_kernels_equal_oracle(name, unit_threshold):
    torch.manual_seed(0)
    x = torch.randn(13, 4, 3, 5, 5)
    theta = torch.ones(()) if unit_threshold else torch.rand(3, 1, 1) + 0.3
    v0 = torch.rand(4, 3, 5, 5) * 0.5
    s_ref, v_ref = if_multistep(x, theta, v0)
    s, v = KERNELS.get(name)(x.clone(), theta, v0.clone())
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(v, v_ref)


def test_if_oracle_hand_computed():
    x = torch.tensor([0.6, 0.6, 0.6, 2.5, 0.0]).view(5, 1)
    s, v = if_multistep(x, 1.0)
    assert s.flatten().tolist() == [0, 1, 0, 1, 1]  # v: .6, 1.2->.2, .8, 3.3->2.3, 2.3->1.3
    assert v.item() == pytest.approx(1.3)


def test_poisson_encoding_is_unbiased_and_spiky():
    x = torch.tensor([[0.5, -0.25, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    s = get_encoder("poisson")(x, 4000, gen).view(4000, 1, 4)
    assert set(s.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(s.mean(0), x, atol=0.03, rtol=0)
    _, snn, loader = _setup()
    res = simulate(snn, loader, [64], SimConfig(encoding="poisson"), quiet=True)
    assert res.accuracy[64] > 40


def test_bad_timesteps_and_empty_loader():
    _, snn, loader = _setup()
    with pytest.raises(ConfigError, match="positive integers"):
        simulate(snn, loader, [0, 4], quiet=True)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))
    with pytest.raises(ConfigError, match="no samples"):
        simulate(snn, empty, [4], quiet=True)


def test_sweep_report_files(tmp_path):
    net, snn, loader = _setup()
    res = simulate(snn, loader, [1, 2, 4, 8], ann=net, quiet=True)
    paths = write_sweep(res, tmp_path)
    assert paths["png"].stat().st_size > 1000
    md = paths["md"].read_text()
    assert "| 8 |" in md and "ANN accuracy" in md
    assert paths["csv"].read_text().count("\n") == 5


_MEM_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset
    from bsnn.convert import convert
    from bsnn.config import SimConfig
    from bsnn.simulate import simulate
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 16 * 16, 10)).eval()
    x = torch.randn(64, 3, 16, 16)
    loader = DataLoader(TensorDataset(x, torch.zeros(64).long()), batch_size=64)
    snn = convert(net, loader)
    simulate(snn, loader, [4], SimConfig(time_chunk=4), quiet=True)   # warm-up allocations
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    simulate(snn, loader, [int(sys.argv[1])], SimConfig(time_chunk=8), quiet=True)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def test_peak_memory_flat_in_T():
    """Peak RSS growth of a T=1024 run stays within a few MB of a T=16 run (one unchunked T=1024 activation of the
    first layer alone would be 1024*64*16*16*16*4 B = 1 GiB). Large blocks are forced to mmap so that freed
    memory leaves the RSS and the peak measures live tensors, not allocator caching."""
    growth = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for t in (16, 1024):
        out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(t)], capture_output=True, text=True, check=True,
                             env=env)
        growth[t] = float(out.stdout.strip().splitlines()[-1])
    assert growth[1024] - growth[16] < 24, growth


def test_direct_input_prefix_runs_once_and_matches_full_graph():
    _, snn, loader = _setup()
    x = next(iter(loader))[0]
    prefix, suffix = snn.split_static()
    calls = [n for n in prefix.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == [snn.layers[0]["name"]]  # the first conv only (BN folded into it)
    fast = run_batch(snn, x, 12, time_chunk=5)
    snn.reset()
    full = []
    for start in range(0, 12, 5):  # the whole graph on the repeated input, as before the split
        tc = min(5, 12 - start)
        snn.set_time_chunk(tc)
        full.append(snn(x.unsqueeze(0).expand(tc, *x.shape).reshape(-1, *x.shape[1:])).reshape(tc, x.shape[0], -1))
    torch.testing.assert_close(fast, torch.cat(full).cumsum(0), rtol=1e-5, atol=1e-5)


def test_recording_off_skips_counts_without_crashing():
    _, snn, loader = _setup()
    first = snn.neuron_names[0]
    snn.neurons()[first].record = False
    res = simulate(snn, loader, [4], quiet=True)
    assert sum(res.spike_counts[first]) == 0 and sum(res.spike_counts[snn.neuron_names[1]]) > 0


class _BatchSizedView(nn.Module):
    """A model whose forward reads the input's batch size to flatten (``how``), or flattens with ``flatten(1)``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 3)

    def forward(self, x):
        b = x.size(0)
        h = self.features(x)
        if self.how == "size":
            h = h.view(b, -1)
        elif self.how == "shape":
            h = h.reshape(x.shape[0], 8, -1).reshape(x.shape[0], -1)
        elif self.how == "explicit":
            h = h.view(h.size(0), h.size(1) * h.size(2) * h.size(3))
        elif self.how == "batch_one":
            h = h.view(1, -1)  # mixes the batch into the features: wrong for any batch but 1
        else:
            h = h.flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.mark.parametrize("how", ["size", "shape", "explicit"])
def test_views_sized_by_the_batch_simulate_like_flatten(how):
    """``h.view(x.size(0), -1)`` is rewritten to keep dim 0 as the batch, so with time folded into it (T·B rows) the
    SNN is the same as with ``flatten(1)``, in one-pass sweeps and with time chunks."""
    torch.manual_seed(0)
    ref_net = binarize_(_BatchSizedView("flatten")).eval()
    net = binarize_(_BatchSizedView(how)).eval()
    net.load_state_dict(ref_net.state_dict())
    x = torch.randn(24, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, ref_net(x).argmax(1)), batch_size=8)
    ref, snn = (convert(m, loader, ConvertConfig(threshold=Max())) for m in (ref_net, net))
    assert torch.equal(run_batch(snn, x, 9, time_chunk=4), run_batch(ref, x, 9, time_chunk=4))
    res = simulate(snn, loader, [2, 9], SimConfig(time_chunk=3), quiet=True)
    assert res.accuracy == simulate(ref, loader, [2, 9], SimConfig(time_chunk=3), quiet=True).accuracy


def test_view_across_the_batch_is_refused():
    torch.manual_seed(0)
    net = binarize_(_BatchSizedView("batch_one")).eval()
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8).long()), batch_size=8)
    with pytest.raises(ConversionError, match=r"flatten\(1\)"):
        convert(net, loader, ConvertConfig(threshold=Max()))


class _Adds(nn.Module):
    """conv -> ReLU -> binary conv -> ReLU -> binary conv, combined with the first activation by ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.p = nn.Parameter(torch.linspace(-0.3, 0.4, 6).view(6, 1, 1))
        self.register_buffer("q", torch.full((1, 6, 1, 1), 0.2))
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        h = self.c3(torch.relu(self.c2(a)))
        if self.how == "alpha":
            h = torch.add(h, a, alpha=-2)
        elif self.how == "alpha_first":
            h = torch.add(a, h, alpha=0.5)
        elif self.how == "parameter":
            h = h + self.p
        elif self.how == "buffer_alpha":
            h = torch.add(h, self.q, alpha=-3)
        elif self.how == "constant_first":
            h = 0.25 + h
        elif self.how == "constant_alpha":
            h = torch.add(self.q, h, alpha=-1.5)
        return self.fc(torch.relu(h).flatten(1))


@pytest.mark.parametrize("how", ["alpha", "alpha_first", "parameter", "buffer_alpha", "constant_first",
                                 "constant_alpha"])
def test_add_arguments_are_honoured(how):
    """Every argument of an add (``alpha``, constant operands: parameters, buffers, numbers, either side) reaches the
    SNN: its time-averaged output converges to the ANN's logits (with ``alpha`` dropped the error was 183 %)."""
    torch.manual_seed(0)
    net = binarize_(_Adds(how)).eval()
    x = torch.randn(32, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(32).long()), batch_size=16)
    snn = convert(net, loader, ConvertConfig(threshold=Max(), v_init=0.5))
    with torch.no_grad():
        ann = net(x)
    T = 512
    err = (run_batch(snn, x, T, time_chunk=64)[-1] / T - ann).norm() / ann.norm()
    assert err < 0.05, err
