"""Run-time offset corrections with pre-steps (COS, SRP; bsnn.snn.offset) against references written from the
authors' code (hzc1208/ANN2SNN_COS and hzc1208/ANN2SNN_SRP, ``modules.py``, ``MPLayer.forward``).

The references run the converted graph with their own explicit per-timestep IF loops: COS the authors' way (each IF
layer receives the whole time sequence of its input, pre-simulates ρ steps, shifts its initial membrane, then runs
the T steps), SRP the authors' way (the whole network one timestep at a time, each neuron gated after τ steps).
Hidden layers are ±1-weight layers fed by {0, 1} spikes, so their sums are exact integers and spikes must match
exactly whatever the time folding.
"""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.data import DataLoader

from bsnn.config import ConvertConfig
from bsnn.convert import Max, convert
from bsnn.convert.graph import activation_modules, capture
from bsnn.errors import ConfigError
from bsnn.hardware.constraints import ConstraintConfig, apply_constraints
from bsnn.simulate import SimConfig, run_batch, simulate
from bsnn.snn.neuron import IFNeuron
from bsnn.snn.offset import cos_initial_membrane, latency_pre_steps, set_offset_correction_
from tests._snn_helpers import input_loader, small_binary_cnn

RHO = 4


def _net(seed: int = 1) -> nn.Module:
    return small_binary_cnn(seed)


def _loader(x: torch.Tensor) -> DataLoader:
    return input_loader(x, 32)


def _snn(net: nn.Module, x: torch.Tensor, method: str, **kw):
    cfg = dict(threshold=Max(), v_init=0.5, snn_calibration="none", offset_correction=method, offset_pre_steps=RHO)
    return convert(net, _loader(x), ConvertConfig(**{**cfg, **kw}))


def _if_step(v: torch.Tensor, x: torch.Tensor, m: IFNeuron) -> tuple[torch.Tensor, torch.Tensor]:
    """spikingjelly IFNode(v_threshold=1, v_reset=None) fed x/θ (the authors' neuron; bsnn's gain is 1/θ)."""
    v = v + x * (1.0 / m.threshold)
    s = (v >= 1.0).float()
    return s, v - s


def _v0(m: IFNeuron, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) + (m.v_init_frac + m.v_init_bias)


class _CosReference(fx.Interpreter):
    """The graph on whole sequences, time folded into the batch; each IF layer is the authors' COS ``MPLayer``."""

    def __init__(self, gm: fx.GraphModule, T: int, batch: int) -> None:
        super().__init__(gm)
        self.T, self.B, self.counts = T, batch, {}

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if not isinstance(m, IFNeuron):
            return super().call_module(target, args, kwargs)
        x = args[0]
        # the first layer gets the analog input once and repeats it (authors: xx = x.unsqueeze(0).repeat(T, ...))
        seq = x.unsqueeze(0).repeat(self.T, *[1] * x.dim()) if x.shape[0] == self.B else x.unflatten(0, (self.T, -1))
        v0 = _v0(m, seq[0])
        v, count, mem_seq, mem_seq2 = v0.clone(), torch.zeros_like(v0), [], []
        for t in range(RHO):  # pre-simulation
            s, v = _if_step(v, seq[t], m)
            count += s
            mem_seq.append(torch.where(s > 0, v + 1.0, torch.ones_like(s) * 1000.0))
            mem_seq2.append(torch.where(s > 0, torch.ones_like(s) * (-1000.0), v))
        lower = torch.where(v < 0, (count > 1e-3).float(), torch.zeros_like(count))
        mem_val = torch.topk(torch.stack(mem_seq), 1, dim=0, largest=False)[0][0]
        mem_val2 = torch.topk(torch.stack(mem_seq2), 1, dim=0, largest=True)[0][0]
        val = torch.where(mem_val - 0.999 > 1.0, mem_val - 0.999, torch.ones_like(v))
        val2 = torch.where(1.001 - mem_val2 > 1.0, 1.001 - mem_val2, torch.ones_like(v))
        mem_init = torch.where(v >= 1.0, v0 + val2, v0 - lower * val)
        v, out = mem_init, []  # reset, membrane set to the shifted value, the real run from step 1
        for t in range(self.T):
            s, v = _if_step(v, seq[t], m)
            out.append(s)
        self.counts[target] = [s.sum().item() for s in out]
        return torch.stack(out).flatten(0, 1)


def cos_reference(snn, x: torch.Tensor, T: int) -> tuple[torch.Tensor, dict]:
    ref = _CosReference(snn.graph_module, T, x.shape[0])
    out = ref.run(x)
    return out.reshape(T, x.shape[0], -1).cumsum(0), ref.counts


class _SrpReference(fx.Interpreter):
    """One timestep of the graph; each IF layer is the authors' SRP ``MPLayer`` (state across calls)."""

    def __init__(self, gm: fx.GraphModule, tau: int) -> None:
        super().__init__(gm)
        self.tau, self.state = tau, {}

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if not isinstance(m, IFNeuron):
            return super().call_module(target, args, kwargs)
        x, st = args[0], self.state.setdefault(target, {"t": 0, "counts": []})
        if st["t"] == 0:
            st["v"] = _v0(m, x)
        s, st["v"] = _if_step(st["v"], x, m)
        st["t"] += 1
        if st["t"] == self.tau:  # gate from the residual membrane, then reset to the initial membrane
            st["keep"] = (st["v"] > 1e-3).float()
            st["v"] = _v0(m, x)
        if st["t"] > self.tau:
            s = s * st["keep"]
            st["counts"].append(s.sum().item())
        return s


def srp_reference(snn, x: torch.Tensor, T: int) -> tuple[torch.Tensor, dict, dict]:
    ref = _SrpReference(snn.graph_module, RHO)
    acc, mem = 0.0, []
    for t in range(RHO + T):
        out = ref.run(x)
        if t >= RHO:  # the authors' mp_test accumulates only after the pre-steps
            acc = acc + out
            mem.append(acc)
    keep = {k: st["keep"] for k, st in ref.state.items()}
    return torch.stack(mem), {k: st["counts"] for k, st in ref.state.items()}, keep


def _counts(snn) -> dict:
    return {k: list(m.spike_count) for k, m in snn.neurons().items()}


@pytest.mark.parametrize("calibration", ["none", "potential"])
@pytest.mark.parametrize("time_chunk", [1, 5])
def test_cos_equals_the_authors_layer_by_layer_procedure(time_chunk, calibration):
    net, x = _net(), torch.randn(24, 1, 8, 8)
    snn = _snn(net, x, "cos", snn_calibration=calibration, snn_calibration_timesteps=4, snn_calibration_samples=24)
    T = 12
    mem = run_batch(snn, x, T, time_chunk)
    counts = _counts(snn)
    ref_mem, ref_counts = cos_reference(snn, x, T)
    assert counts == ref_counts  # every layer's spikes per timestep, exactly
    torch.testing.assert_close(mem, ref_mem, rtol=1e-5, atol=1e-4)
    # the correction did something here (shifted membranes change the spike trains)
    set_offset_correction_(snn, "none")
    run_batch(snn, x, T, time_chunk)
    assert _counts(snn) != ref_counts


@pytest.mark.parametrize("time_chunk", [1, 5])
def test_srp_equals_the_authors_step_by_step_procedure(time_chunk):
    net, x = _net(), torch.randn(24, 1, 8, 8)
    snn = _snn(net, x, "srp")
    T = 12
    mem = run_batch(snn, x, T, time_chunk)
    counts = _counts(snn)
    ref_mem, ref_counts, keep = srp_reference(snn, x, T)
    assert counts == ref_counts  # spike counts are of the emitted (gated) spikes
    torch.testing.assert_close(mem, ref_mem, rtol=1e-5, atol=1e-4)
    assert all(0 < (k == 0).float().mean() < 1 for k in keep.values())  # some neurons silenced in every layer


def _cos_scalar(v0: float, xs: list[float]) -> float:
    """The authors' COS rule for one neuron in plain Python (modules.py, MPLayer.forward, opt_epoch 0)."""
    v, count, mem_seq, mem_seq2 = v0, 0, [], []
    for x in xs:
        v += x
        s = v >= 1.0
        v -= float(s)
        count += s
        mem_seq.append(v + 1.0 if s else 1000.0)
        mem_seq2.append(-1000.0 if s else v)
    lower = 1.0 if (v < 0 and count > 1e-3) else 0.0
    val = min(mem_seq) - 0.999 if min(mem_seq) - 0.999 > 1.0 else 1.0
    val2 = 1.001 - max(mem_seq2) if 1.001 - max(mem_seq2) > 1.0 else 1.0
    return v0 + val2 if v >= 1.0 else v0 - lower * val


def test_cos_rule_matches_the_authors_per_neuron_loop():
    g = torch.Generator().manual_seed(0)
    # uneven inputs in multiples of 1/8 (exact in float32 and float64), some far above threshold
    xs = torch.randint(-16, 24, (RHO, 4000), generator=g).float() / 8
    v, vs, ss = torch.full((4000,), 0.5), [], []
    for t in range(RHO):
        v = v + xs[t]
        s = (v >= 1).float()
        v = v - s
        vs.append(v)
        ss.append(s)
    got = cos_initial_membrane(torch.full((4000,), 0.5), torch.stack(vs), torch.stack(ss))
    want = torch.tensor([_cos_scalar(0.5, xs[:, i].tolist()) for i in range(4000)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    shift = got - 0.5
    # every branch occurs: lowered by >= 1, raised by >= 1, raised by the authors' 1001 (never silent), unchanged
    assert (shift <= -1).any() and ((shift >= 1) & (shift < 1000)).any() and (shift > 1000).any()
    assert (shift == 0).any()


def _rel_errors(snn, logits: torch.Tensor, x: torch.Tensor, ts) -> dict[int, float]:
    mem = run_batch(snn, x, max(ts), 256)
    return {t: ((mem[t - 1] / t - logits).norm() / logits.norm()).item() for t in ts}


@pytest.mark.parametrize("calibration", ["none", "potential"])
def test_cos_converges_to_the_ann(calibration):
    """COS only moves initial membranes by a bounded amount: the time-averaged output still tends to the logits."""
    net, x = _net(seed=0), torch.randn(48, 1, 8, 8)
    snn = _snn(net, x, "cos", snn_calibration=calibration, snn_calibration_timesteps=4, snn_calibration_samples=48)
    err = _rel_errors(snn, net(x).detach(), x, (32, 2048))
    assert err[2048] < err[32] / 10, err
    assert err[2048] < 4e-3, err


@pytest.mark.slow
def test_cos_converges_with_the_authors_1001_shift():
    """A neuron that fires on every pre-step and still ends >= θ gets the authors' sentinel shift (+1001 θ): the
    charge is bounded, so the output still converges, but only once T is well above 1000."""
    net, x = _net(seed=1), torch.randn(16, 1, 8, 8)
    snn = _snn(net, x, "cos")
    err = _rel_errors(snn, net(x).detach(), x, (32, 2048, 32768))
    assert err[32768] < err[32] / 10 and err[32768] < err[2048] / 3, err


def test_srp_converges_to_the_ann_with_its_silenced_neurons():
    """SRP gates neurons off for the whole run, so the SNN converges to the ANN with those activations set to 0
    (exactly the ANN where no silenced neuron has a positive activation), clipped at the thresholds λ (a neuron
    fires at most once per step; silencing changes the later layers' activations, which may then exceed λ)."""
    net, x = _net(), torch.randn(48, 1, 8, 8)
    snn = _snn(net, x, "srp")
    _, _, keep = srp_reference(snn, x, 1)
    gm = capture(copy.deepcopy(net), x[:1])
    acts = activation_modules(gm)

    def gate(k: str, name: str):
        lam = torch.as_tensor(snn.meta["thresholds"][name]).float()
        def hook(_m, _i, out):
            lam_b = lam.view(-1, *[1] * (out.dim() - 2)) if lam.numel() > 1 else lam
            return torch.minimum(out * keep[k].reshape(out.shape), lam_b)
        return hook

    hooks = [acts[m.name].register_forward_hook(gate(k, m.name)) for k, m in snn.neurons().items()]
    masked = gm(x).detach()
    for h in hooks:
        h.remove()
    err = _rel_errors(snn, masked, x, (32, 2048))
    assert err[2048] < err[32] / 10, err
    assert err[2048] < 4e-3, err
    plain = _rel_errors(snn, net(x).detach(), x, (2048,))
    assert plain[2048] > 10 * err[2048]  # on this random network some silenced neurons had positive activations


@pytest.mark.parametrize("method,pre_steps", [("none", 0), ("cos", RHO * 3), ("srp", RHO)])
def test_pre_steps_are_counted_in_the_latency(method, pre_steps):
    net, x = _net(), torch.randn(16, 1, 8, 8)
    snn = _snn(net, x, method)
    res = simulate(snn, _loader(x), [1, 4], SimConfig(kernel="torch", synapse="float"), quiet=True)
    assert res.pre_steps == latency_pre_steps(snn) == pre_steps  # COS: ρ per IF layer (3 here), layer after layer
    assert res.to_dict()["pre_steps"] == pre_steps
    assert len(res.spike_counts["if_2"]) == 4  # the real steps only


@pytest.mark.parametrize("method", ["cos", "srp"])
def test_the_network_is_left_unchanged(method):
    net, x = _net(), torch.randn(16, 1, 8, 8)
    snn = _snn(net, x, method)
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    first = run_batch(snn, x, 6, 4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in snn.neurons().values())
    after = snn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(run_batch(snn, x, 6, 4), first, rtol=0, atol=0)  # the next batch sees the same net
    set_offset_correction_(snn, "none")
    torch.testing.assert_close(run_batch(snn, x, 6, 4), run_batch(_snn(net, x, "none"), x, 6, 4))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="offset_correction must be one of cos, none, srp"):
        ConvertConfig(offset_correction="bogus").validate()
    with pytest.raises(ConfigError, match="offset_pre_steps"):
        ConvertConfig(offset_correction="cos", offset_pre_steps=0).validate()
    net, x = _net(), torch.randn(8, 1, 8, 8)
    with pytest.raises(ConfigError, match="direct"):  # COS's pre-steps must see the real run's inputs
        run_batch(_snn(net, x, "cos"), x, 4, 4, encoding="poisson")
    assert run_batch(_snn(net, x, "srp"), x, 4, 4, encoding="poisson").shape == (4, 8, 3)
    assert ConvertConfig().offset_correction == "none"  # the default recipe is unchanged


def test_fixed_point_neurons_are_refused_and_crossbar_constraints_kept():
    """Hardware constraints' fixed-point neurons keep their membrane in input units, not θ: refused by name."""
    net, x = _net(), torch.randn(8, 1, 8, 8)
    snn = _snn(net, x, "srp")
    with apply_constraints(snn, ConstraintConfig(membrane_bits=16)):
        with pytest.raises(ConfigError, match="if_2 \\(FixedPointIFNeuron\\)"):
            run_batch(snn, x, 4, 4)
    with apply_constraints(snn, ConstraintConfig(xbar_rows=16, adc_bits=12)):  # exact ADC: same as the ideal SNN
        torch.testing.assert_close(run_batch(snn, x, 4, 4), run_batch(_snn(net, x, "srp"), x, 4, 4))


@pytest.mark.parametrize("method", ["cos", "srp"])
def test_snn_calibration_runs_without_the_correction(method):
    """convert() calibrates the potentials of the plain SNN and switches the correction on afterwards."""
    net, x = _net(), torch.randn(16, 1, 8, 8)
    kw = dict(snn_calibration="potential", snn_calibration_timesteps=4, snn_calibration_samples=16)
    snn = _snn(net, x, method, **kw)
    plain = set_offset_correction_(_snn(net, x, "none", **kw), method, RHO)
    assert snn.meta["convert"]["offset_correction"] == method
    assert all(torch.equal(a, b) for a, b in zip(snn.state_dict().values(), plain.state_dict().values()))
    torch.testing.assert_close(run_batch(snn, x, 6, 3), run_batch(plain, x, 6, 3), rtol=0, atol=0)
