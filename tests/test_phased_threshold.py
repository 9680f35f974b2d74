"""Two-phase thresholds (``convert.late_threshold``): the oracle by hand, the neuron against it on every kernel and
chunking, conversion (exactly the single-threshold network up to the switch), convergence to the ANN where the
single small threshold clips for ever, save/load, cost and refusals."""

import pytest
import torch

from bsnn.config import ConvertConfig
from bsnn.convert import Max, Percentile, convert
from bsnn.convert.phases import late_gains
from bsnn.errors import ConfigError, ConversionError
from bsnn.export import to_nir
from bsnn.hardware.mapping import resolve_layers
from bsnn.modelfile import build_model, load_snn, save_snn
from bsnn.simulate import SimConfig, run_batch, simulate
from bsnn.snn.functional import if_multistep, phased_multistep
from bsnn.snn.neuron import IFNeuron, PhasedIFNeuron
from tests._snn_helpers import input_loader, small_binary_cnn


def test_oracle_matches_the_hand_worked_rule():
    # switch after 2 steps, k = 2, input 0.6 per step from v0 = 0:
    # t0: 0.6 -> -; t1: 1.2 -> 1 (v 0.2); t2: 0.8 < 2 -> -; t3: 1.4; t4: 2.0 -> 2 (v 0); t5: 0.6
    s, v = phased_multistep(torch.full((6, 1), 0.6), 2, 2)
    assert s.flatten().tolist() == [0.0, 1.0, 0.0, 0.0, 2.0, 0.0]
    assert v.item() == pytest.approx(0.6)
    # with the θ/2 shift (v0 = 0.5) the late code starts shifted too: + (k - 1) * 0.5 at the first late step
    # t0: 1.1 -> 1 (v 0.1); t1: 0.7; t2: 0.7 + 0.5 + 0.6 = 1.8 < 2; t3: 2.4 -> 2 (v 0.4); t4: 1.0; t5: 1.6
    s, v = phased_multistep(torch.full((6, 1), 0.6), 2, 2, 0.5, switch_shift=0.5)
    assert s.flatten().tolist() == [1.0, 0.0, 0.0, 2.0, 0.0, 0.0]
    assert v.item() == pytest.approx(1.6)


def test_gain_of_one_is_the_if_neuron():
    x = torch.randn(30, 4, 3) * 0.8
    assert all(torch.equal(a, b) for a, b in zip(phased_multistep(x, 1, 5, 0.5), if_multistep(x, 1.0, 0.5)))


@pytest.mark.parametrize("kernel", ["torch", "reference", "cpp"])
@pytest.mark.parametrize("chunks", [(20,), (3, 5, 12), (1,) * 20])
def test_neuron_equals_the_oracle_on_every_kernel_and_chunking(kernel, chunks):
    torch.manual_seed(0)
    theta = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    x = torch.rand(20, 2, 3, 4, 4) * 3.0  # strong currents: the first phase clips, the second releases
    m = PhasedIFNeuron.from_if(IFNeuron(theta, 0.5, "n"), late_gain=3, switch_steps=7)
    m.kernel = kernel
    m.reset()
    out, t = [], 0
    for c in chunks:
        m.time_chunk = c
        out.append(m(x[t:t + c].reshape(c * 2, 3, 4, 4)).reshape(c, 2, 3, 4, 4))
        t += c
    ref, v = phased_multistep(x / theta, 3, 7, 0.5, switch_shift=0.5)
    assert torch.allclose(torch.cat(out), ref) and torch.allclose(m.v, v, atol=1e-5)
    assert set(torch.cat(out)[7:].unique().tolist()) <= {0.0, 3.0}
    assert sum(m.spike_count) == float((ref > 0).sum())  # every spike one event, a late one too


def test_late_gains_round_up_and_never_fall_below_one():
    fast = {"a": torch.tensor(1.0), "b": torch.tensor([2.0, 2.0]), "c": torch.tensor(3.0)}
    late = {"a": torch.tensor(1.5), "b": torch.tensor([4.0, 4.0]), "c": torch.tensor(2.0)}
    assert late_gains(fast, late) == {"a": 2, "b": 2, "c": 1}
    # a bounded activation (ReLU6, clamp, trained clip): k·max λ never above the bound, k never below 1
    assert late_gains(fast, late, {"a": 1.9, "b": 5.0}) == {"a": 1, "b": 2, "c": 1}
    assert late_gains({"a": torch.tensor([1.0, 2.5])}, {"a": torch.tensor([4.0, 4.0])}, {"a": 6.0}) == {"a": 2}


def _pair(x, net=None, **kw):
    net = small_binary_cnn(1) if net is None else net
    base = dict(threshold=Percentile(60), per_channel=False, snn_calibration="none", **kw)
    return net, convert(net, input_loader(x, 16), ConvertConfig(late_threshold=None, **base)), \
        convert(net, input_loader(x, 16), ConvertConfig(late_threshold=Max(), late_threshold_after=4, **base))


def test_conversion_equals_the_single_threshold_network_up_to_the_switch_and_converges_after():
    torch.manual_seed(0)
    x = torch.randn(48, 1, 8, 8)
    net, single, phased = _pair(x)
    assert all(isinstance(m, PhasedIFNeuron) for m in phased.neurons().values())
    gains = phased.meta["late_gains"]
    assert gains and all(k >= 2 for k in gains.values())  # max is well above the 60th percentile
    assert {n: int(m.late_gain) for n, m in phased.neurons().items()} == \
        {n: gains[m.name] for n, m in phased.neurons().items()}
    a, b = run_batch(single, x, 4, 48), run_batch(phased, x, 4, 48)
    assert torch.equal(a, b)  # T <= late_threshold_after: the same network
    logits = net(x).detach()

    def err(snn, t):
        mem = run_batch(snn, x, t, 48)
        return ((mem[-1] / t - logits).norm() / logits.norm()).item()

    e_single, e_phased = err(single, 2048), err(phased, 2048)
    assert e_phased < 0.02 < e_single, (e_phased, e_single)  # the 60th percentile clips for ever; max does not
    assert err(phased, 2048) < err(phased, 64) / 5


def _clipped_logits(net, x, bounds):
    """``net(x)`` with every activation named in ``bounds`` clamped from above at its bound (scalar or ``[C]``)."""
    modules, handles = dict(net.named_modules()), []
    for name, b in bounds.items():
        b = torch.as_tensor(b).float()
        handles.append(modules[name].register_forward_hook(
            lambda _m, _i, out, b=b: torch.minimum(out, b.view(1, -1, *[1] * (out.dim() - 2)) if b.numel() > 1 else b)))
    try:
        with torch.no_grad():
            return net(x)
    finally:
        for h in handles:
            h.remove()


def test_the_default_converges_to_the_ann_clipped_at_its_late_thresholds():
    # the default's limit, exactly: every activation clipped at k·λ (its late threshold), not at λ and not unclipped
    torch.manual_seed(3)
    x = torch.randn(48, 1, 8, 8) * 1.5
    net = small_binary_cnn(2)
    snn = convert(net, input_loader(x, 16), ConvertConfig())
    lam, gains = snn.meta["thresholds"], snn.meta["late_gains"]
    assert any(isinstance(m, PhasedIFNeuron) for m in snn.neurons().values()) and max(gains.values()) >= 2
    limit = _clipped_logits(net, x, {n: torch.as_tensor(v).float() * gains.get(n, 1) for n, v in lam.items()})
    fast_clip = _clipped_logits(net, x, lam)
    mem = run_batch(snn, x, 4096, 48)

    def err(t, ref):
        return ((mem[t - 1] / t - ref).norm() / ref.norm()).item()

    assert err(4096, limit) < 0.005 and err(4096, limit) < err(256, limit) / 4, (err(256, limit), err(4096, limit))
    assert err(4096, fast_clip) > 5 * err(4096, limit)  # the short code's clipping is gone


def test_save_load_round_trip_keeps_the_gains(tmp_path):
    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4, "hidden": 16},
            "binary": {}, "activation": {"kind": "relu"}}
    torch.manual_seed(1)
    x = torch.rand(32, 1, 8, 8)
    _, _, phased = _pair(x, build_model(arch).eval())
    save_snn(tmp_path / "snn.pt", phased, arch)
    loaded, _ = load_snn(tmp_path / "snn.pt")
    gains = [int(m.late_gain) for m in phased.neurons().values()]
    assert [int(m.late_gain) for m in loaded.neurons().values()] == gains and max(gains) >= 2
    assert torch.equal(run_batch(loaded, x, 16, 32), run_batch(phased, x, 16, 32))


def test_fast_simulation_paths_agree_with_the_reference_kernel():
    torch.manual_seed(2)
    x = torch.randn(32, 1, 8, 8)
    _, _, phased = _pair(x)
    loader = input_loader(x, 16)
    ref = simulate(phased, loader, [2, 8, 32], SimConfig(kernel="reference", synapse="float"), quiet=True)
    for synapse in ("auto", "bf16"):  # bf16 sums of {0, k} spikes stay exact integers
        fast = simulate(phased, loader, [2, 8, 32], SimConfig(synapse=synapse), quiet=True)
        assert fast.accuracy == ref.accuracy and fast.spike_counts == ref.spike_counts


def test_one_crossbar_pass_per_step_and_refusals():
    torch.manual_seed(3)
    x = torch.randn(32, 1, 8, 8)
    _, _, phased = _pair(x)
    assert all(m.input_passes == 1 for m in phased.neurons().values())
    assert resolve_layers(phased)  # the cost model maps it like any IF network
    with pytest.raises(ConversionError, match="phased"):
        to_nir(phased)
    for bad in (dict(late_threshold="mse:16", neuron="burst"), dict(late_threshold="max", offset_correction="cos"),
                dict(late_threshold="max", late_threshold_after=0), dict(late_threshold="nonsense")):
        with pytest.raises(ConfigError, match="late_threshold"):
            ConvertConfig(**bad).validate()
    with pytest.raises(ValueError, match="late_gain"):
        PhasedIFNeuron(late_gain=1.5)
