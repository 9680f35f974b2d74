"""Post-conversion layer-wise calibration against the ANN (SNN Calibration, Li et al. 2021, "light" pipeline).

Conversion leaves a per-channel error between the ANN activation ``a`` and the SNN's time-averaged output
``λ·count/T`` (mostly the quantisation/flooring of spike counts and the residual membrane). Layer by layer, in
graph order (each layer is corrected with the earlier layers already corrected), the mean error per channel
``e_c = E[a - λ·count/T]`` over a calibration batch is compensated:

* ``bias`` — an extra input current ``e_c/λ`` per timestep (units of θ) during the first ``T_c`` timesteps (the T
  it was calibrated for): the IF neuron integrates ``x/θ + e_c/λ`` in that window, i.e. the ANN's pre-activation
  shifted by ``e_c``, then ``x/θ`` alone;
* ``potential`` — an extra initial membrane ``e_c·T_c/λ`` (units of θ): the same ``T_c·e_c/λ`` spikes' worth of
  charge, given at once.

Both corrections add a bounded charge, so their effect on a neuron's rate falls as ``T_c/T`` and the SNN still
converges to the ANN as T grows. (A bias current on *every* timestep would not: the original "light pipeline" is
calibrated for one T, and a constant current tuned for T_c = 4 shifts every rate by ``e_c`` forever — measured on a
CIFAR-10 VGG, accuracy then fell from 75 % at T = 16 to 70 % at T = 128.)

``advanced`` — the "advanced pipeline": first *weight calibration*, layer by layer (:func:`calibrate_weights_`),
then the ``potential`` correction above. Weight calibration fits, for each IF layer fed directly by a conv/linear,
that layer's parameters so that the quantised output of its time-averaged SNN input matches the ANN activation::

    n = floor_ste(clamp(T·z/θ + v0, 0, T)),   z = synapse(x̄),   minimise  E[ Σ_c (λ·n/T - a)² ]

with Adam and a cosine learning rate over ``iterations`` random batches of the cached layer inputs ``x̄`` (the SNN's
spike counts / T, earlier layers already calibrated) and ANN targets ``a``. Authors' code (read, reimplemented):
``yhhhli/SNN_Calibration``, ``models/calibration.py``: ``weights_cali_model`` / ``weights_cali_layer`` (Adam on
the weight, ``CosineAnnealingLR(T_max=iterations, eta_min=0)``, batches of 32 drawn by ``randperm``, ``floor_ste``,
``lp_loss`` = squared error summed over channels, mean over the rest), ``bias_corr_model(correct_mempot=True)``
after it; ``main_cal_imagenet.py`` (``--calib advanced``: ``num_cali_samples=1024, learning_rate=1e-5``, 5000
iterations by default). Differences from the authors' code:

* binary layers keep their ±1 weights: instead of the weight, a per-output-channel gain ``g`` (> 0, from 1) on
  the ±1 weights and the layer's bias are fitted, ``z = g·s·(sign(W) * x̄) + b`` (``s = λ/θ``: parameters live in
  the ANN's activation domain, as the authors'), and folded back into the IF threshold (``θ/g``) and the stored
  bias (``b/(s·g)``) — the same network with ±1 weights; a layer with one threshold gets one gain.
  Full-precision layers (the first) have their weight fitted (``s·W``, in the ANN's domain), as in the authors'
  code;
* the quantiser includes the neuron's initial membrane ``v0`` (bsnn's θ/2 shift, in units of θ): the exact spike
  count of an IF neuron with constant input. The authors' ``floor_ste(clamp(z/θ·T, 0, T))`` is ``v0 = 0``, although
  their neuron adds the same shift (``enable_shift``). Much of what their fit gains is learning that half step
  (the floor's bias); with the shift in the quantiser the first layer (exact analog input) has little left to fit;
* the last layer (the output integrator) is not calibrated (nor is it in the authors' code); layers whose IF input
  is not a conv/linear output (residual adds, max-pools before the neuron, unfolded BatchNorm) are skipped (the
  authors fit residual blocks jointly, ``weights_cali_res_layer``) and get the potential correction only;
* the potential correction is bsnn's per-channel one (the authors' is per neuron and position, from one batch);
  both steps use the same ``snn_calibration_samples`` calibration images (the authors: 1024 for the weights);
* the thresholds are the conversion's (``convert.threshold``); the authors' pipelines first search them by MSE
  (``get_maximum_activation(mse=True)``), which is ``convert.threshold: mse:T``
  (:class:`~bsnn.convert.calibrate.MSE`). Their CIFAR script (``main_cal_cifar.py``) runs ``--calib advanced`` as
  that search plus the potential correction only (its ``weights_cali_model`` call is commented out: "calibrating
  the potential only achieves best results" there) — bsnn's ``threshold: mse:T`` with ``snn_calibration:
  potential``.

Unlike the bounded charges of ``bias`` / ``potential``, fitted weights, gains and biases change the network for
every T: the SNN converges (as 1/T) to the ANN *with the calibrated parameters*, which is fitted to match the
original ANN at ``T_c`` — its distance to the original ANN is what the fit leaves, measured in
``snn.meta["weight_calibration"]`` and checked small in ``tests/test_snn_calibration_advanced.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.convert.graph import activation_modules
from bsnn.distributed import map_shards
from bsnn.errors import ConfigError
from bsnn.simulate import iter_chunks
from bsnn.snn.network import SpikingNetwork

MODES = ("bias", "potential", "advanced")


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` -> ``[C, 1, ...]`` mean over batch and spatial dims (``[B, F]`` -> ``[F]``)."""
    if t.dim() == 2:
        return t.mean(0)
    return t.mean(dim=(0, *range(2, t.dim()))).view(t.shape[1], *([1] * (t.dim() - 2)))


@torch.no_grad()
def ann_activations(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of every activation module of the captured ANN ``gm`` on ``x``."""
    out: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o.detach()))
             for n, m in activation_modules(gm).items()]
    try:
        gm.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return out


CALIBRATION_CHUNK = 32
"""Samples simulated together by the calibration's SNN runs: fixed, so that the runs (dealt to the ranks of a
torchrun job, :func:`bsnn.distributed.map_shards`) give the same bits for every number of processes."""


@torch.no_grad()
def snn_layer_output(snn: SpikingNetwork, neuron_name: str, x: torch.Tensor, timesteps: int,
                     time_chunk: int = 16) -> torch.Tensor:
    """Spike count of one IF layer over ``timesteps`` steps of direct input, ``[B, ...]`` (simulated
    :data:`CALIBRATION_CHUNK` samples at a time, shared out over the ranks of a torchrun job)."""
    return map_shards(lambda c: _layer_output(snn, neuron_name, c, timesteps, time_chunk), x, CALIBRATION_CHUNK)


def _layer_output(snn: SpikingNetwork, neuron_name: str, x: torch.Tensor, timesteps: int, time_chunk: int
                  ) -> torch.Tensor:
    neuron = snn.neurons()[neuron_name]
    total: list[torch.Tensor] = []

    def hook(m, _i, out):
        total.append(out.reshape(m.time_chunk, -1, *out.shape[1:]).sum(0))

    h = neuron.register_forward_hook(hook)
    try:
        for _ in iter_chunks(snn, x, timesteps, min(time_chunk, timesteps)):
            pass
    finally:
        h.remove()
    return torch.stack(total).sum(0)


@dataclass(frozen=True)
class WeightCalibration:
    """Settings of the advanced pipeline's weight calibration (the authors' defaults:
    ``weights_cali_model(num_cali_samples=1024, learning_rate=1e-5)``, 5000 iterations of batches of 32).

    Attributes:
        iterations: Adam steps per layer (cosine learning rate from ``lr`` to 0 over them).
        lr: Adam's learning rate (on the weights of full-precision layers, on the gains and biases of binary ones).
        batch_size: cached samples per step (drawn at random, ``torch.randperm``).
        seed: seed of the batch draws (a local generator; the global RNG is not touched).
    """

    iterations: int = 5000
    lr: float = 1e-5
    batch_size: int = 32
    seed: int = 0


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor(x)`` forward, identity gradient (straight-through; the authors' ``floor_ste``)."""
    return (x.floor() - x).detach() + x


def quantised_count(z: torch.Tensor, theta: torch.Tensor, timesteps: int, v0: torch.Tensor | float = 0.0,
                    per_step: int = 1) -> torch.Tensor:
    """Spikes an IF neuron (reset by subtraction, initial membrane ``v0``·θ) emits in ``timesteps`` steps of the
    constant input current ``z``: ``floor_ste(clamp(T·z/θ + v0, 0, T·per_step))`` (``v0 = 0``, ``per_step = 1``:
    the authors' surrogate; ``per_step`` = Γ for burst neurons, which fire up to Γ spikes a step).

    Args:
        z: input current ``[B, C, ...]`` or ``[B, F]`` (the synapse's output on the time-averaged input).
        theta: threshold, broadcastable to one sample (``[]``, ``[C, 1, 1]`` or ``[F]``).
        timesteps: T.
        v0: initial membrane in units of θ (broadcastable like ``theta``).
        per_step: the most spikes one timestep carries.

    Returns:
        The spike count, same shape as ``z`` (values in {0, ..., T·per_step}; gradient 1·T/θ inside the clamp, else
        0).
    """
    return floor_ste(torch.clamp(z / theta * timesteps + v0, 0, timesteps * per_step))


def layer_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' ``lp_loss(p=2, reduction='none')``: squared error summed over dim 1, mean over the rest."""
    return (pred - target).pow(2).sum(1).mean()


def synapse_of(snn: SpikingNetwork) -> dict[str, str]:
    """IF layer name -> the conv/linear module whose output is its input current (only IF layers fed directly by
    one, zero-padded; others are left out)."""
    gm = snn.graph_module
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in snn.neuron_names:
            src = node.args[0]
            m = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
            if isinstance(m, (nn.Conv2d, nn.Linear)) and len(src.users) == 1 and \
                    getattr(m, "padding_mode", "zeros") == "zeros":
                out[node.target] = src.target
    return out


@torch.no_grad()
def time_averaged_input(snn: SpikingNetwork, module_name: str, x: torch.Tensor, timesteps: int,
                        time_chunk: int = 16) -> torch.Tensor:
    """The input of one synaptic module averaged over ``timesteps`` steps of direct input, ``[B, ...]`` (the
    analog image for the first layer, spike counts / T behind an IF layer; simulated :data:`CALIBRATION_CHUNK`
    samples at a time, shared out over the ranks of a torchrun job)."""
    return map_shards(lambda c: _averaged_input(snn, module_name, c, timesteps, time_chunk), x, CALIBRATION_CHUNK)


def _averaged_input(snn: SpikingNetwork, module_name: str, x: torch.Tensor, timesteps: int, time_chunk: int
                    ) -> torch.Tensor:
    module = snn.graph_module.get_submodule(module_name)
    total: list[torch.Tensor] = []
    steps = [0]

    def hook(_m, inputs):
        inp = inputs[0]
        total.append(inp.reshape(-1, x.shape[0], *inp.shape[1:]).sum(0))
        steps[0] += inp.shape[0] // x.shape[0]

    h = module.register_forward_pre_hook(hook)
    try:
        for _ in iter_chunks(snn, x, timesteps, min(time_chunk, timesteps)):
            pass
    finally:
        h.remove()
    return torch.stack(total).sum(0) / steps[0]


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel tensor viewed to broadcast on ``like`` ``[B, C, ...]``."""
    return t.reshape(()) if t.numel() == 1 else t.reshape(-1, *([1] * (like.dim() - 2)))


def calibrate_layer_(snn: SpikingNetwork, neuron_name: str, synapse_name: str, binary: bool, x_avg: torch.Tensor,
                     target: torch.Tensor, timesteps: int, cfg: WeightCalibration) -> tuple[float, float]:
    """Fit one layer (weight, or ±1-weight gain and bias) to the ANN activation, in place.

    The parameters are optimised in the ANN's activation domain, as in the authors' code: with ``s = λ/θ`` (per
    channel) the real pre-activation is ``s·z``, so a full-precision layer's real weight ``s·W`` and a binary
    layer's real bias ``s·b`` are what Adam moves (its steps, of size ``lr``, then mean the same as the authors');
    they are folded back into the stored domain afterwards.

    Args:
        snn: the network (the synapse's weight, or its bias and the IF threshold, are updated).
        neuron_name: the IF layer.
        synapse_name: the conv/linear feeding it.
        binary: the synapse has ±1 weights (fit a positive gain per threshold channel and the bias instead).
        x_avg: cached time-averaged synapse inputs ``[N, ...]``.
        target: the ANN activations ``[N, C, ...]`` (real domain).
        timesteps: the T of the quantiser.
        cfg: optimiser settings.

    Returns:
        ``(loss before, loss after)`` on all ``N`` cached samples.
    """
    neuron = snn.graph_module.get_submodule(neuron_name)
    syn = snn.graph_module.get_submodule(synapse_name)
    conv = isinstance(syn, nn.Conv2d)
    # λ / levels: what one spike stands for (λ itself for IF neurons, λ/Γ for burst neurons)
    lam = _channel_view(torch.as_tensor(snn.meta["thresholds"][neuron.name]).float(), target) / neuron.levels
    theta = neuron.threshold.detach().clone()
    scale = lam / theta  # real = scale · stored, per channel (or one factor)
    v0 = (neuron.v_init_frac + neuron.v_init_bias).detach()
    w_scale = scale.reshape(-1, *([1] * (syn.weight.dim() - 1))) if scale.numel() > 1 else scale
    real_bias = (_channel_view(syn.bias.detach(), target) * scale).clone()
    kw = dict(stride=syn.stride, padding=syn.padding, dilation=syn.dilation, groups=syn.groups) if conv else {}
    fwd = nn.functional.conv2d if conv else nn.functional.linear
    if binary:
        sign = syn.weight.detach()
        gain = torch.ones_like(theta, requires_grad=True)
        real_bias.requires_grad_(True)
        params = [gain, real_bias]
    else:
        real_weight = (syn.weight.detach() * w_scale).clone().requires_grad_(True)
        params = [real_weight]

    def output(xb: torch.Tensor) -> torch.Tensor:
        z = gain * scale * fwd(xb, sign, None, **kw) + real_bias if binary else \
            fwd(xb, real_weight, None, **kw) + real_bias
        return lam * quantised_count(z, lam, timesteps, v0, neuron.levels) / timesteps

    def loss_all() -> float:
        with torch.no_grad():
            return float(sum(layer_loss(output(xb), tb) * len(xb)
                             for xb, tb in zip(x_avg.split(256), target.split(256))) / len(x_avg))

    before = loss_all()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.iterations), eta_min=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.iterations):
        idx = torch.randperm(len(x_avg), generator=gen)[:cfg.batch_size]
        opt.zero_grad()
        layer_loss(output(x_avg[idx]), target[idx]).backward()
        opt.step()
        sched.step()
        if binary:
            with torch.no_grad():
                gain.clamp_(min=1e-3)  # a spike threshold must stay positive
    after = loss_all()
    with torch.no_grad():
        if binary:  # g·s·(sign(W) x) + b_real against λ == (sign(W) x + b_real/(s·g)) against θ/g: still ±1
            g = gain.detach()
            neuron.threshold.copy_(theta / g)
            syn.bias.copy_((real_bias.detach() / (scale * g)).reshape(syn.bias.shape))
        else:
            syn.weight.copy_(real_weight.detach() / w_scale)
    return before, after


def calibrate_weights_(snn: SpikingNetwork, gm: fx.GraphModule, x: torch.Tensor, timesteps: int,
                       cfg: WeightCalibration | None = None, time_chunk: int = 16) -> dict[str, dict[str, float]]:
    """The advanced pipeline's weight calibration, layer by layer in graph order (each layer fitted on the
    inputs of the already calibrated earlier layers), in place.

    Args:
        snn: converted network.
        gm: the captured ANN it was converted from.
        x: calibration inputs ``[N, C, H, W]``.
        timesteps: the T the layers are fitted for.
        cfg: optimiser settings (default :class:`WeightCalibration`).

    Returns:
        IF layer -> ``{"loss_before", "loss_after"}`` (the layers that were fitted).
    """
    cfg = cfg or WeightCalibration()
    ann = ann_activations(gm, x)
    binary = {l["name"]: bool(l["binary"]) for l in snn.layers}
    out = {}
    for name, syn in synapse_of(snn).items():
        neuron = snn.graph_module.get_submodule(name)
        x_avg = time_averaged_input(snn, syn, x, timesteps, time_chunk)
        with torch.enable_grad():
            before, after = calibrate_layer_(snn, name, syn, binary[syn], x_avg, ann[neuron.name], timesteps, cfg)
        out[name] = {"loss_before": before, "loss_after": after}
    return out


@torch.no_grad()
def calibrate_snn_(snn: SpikingNetwork, gm: fx.GraphModule, x: torch.Tensor, timesteps: int,
                   mode: str = "bias", time_chunk: int = 16, weights: WeightCalibration | None = None,
                   joint_timesteps: list[int] | tuple[int, ...] = ()) -> dict[str, float]:
    """Correct ``snn`` in place, layer by layer, against the ANN ``gm`` on the calibration batch ``x``.

    Args:
        snn: converted network (its IF layers' ``i_bias`` or ``v_init_bias`` are updated; ``advanced`` also fits
            the synapses first, see :func:`calibrate_weights_`, and records their losses in
            ``snn.meta["weight_calibration"]``).
        gm: the captured ANN the SNN was converted from (activation names match ``IFNeuron.name``).
        x: calibration inputs ``[B, C, H, W]``.
        timesteps: the T the SNN is calibrated for.
        mode: ``"bias"``, ``"potential"`` or ``"advanced"`` (weight calibration, then ``potential``).
        weights: the weight calibration's settings (``advanced`` only; default :class:`WeightCalibration`).
        joint_timesteps: ``potential`` (and ``advanced``'s potential step) only: when given, each layer's
            initial-membrane correction is the mean of ``e_c(T)·T/λ`` over these T (the charge that would zero
            the mean error at each T, least squares) instead of its value at ``timesteps``; still a bounded
            charge, so convergence is kept. The weight fit of ``advanced`` stays at ``timesteps``.

    Returns:
        IF layer -> mean absolute error ``|a - λ·count/T|`` before its bias / potential correction (at
        ``timesteps``, or averaged over ``joint_timesteps``).
    """
    if mode not in MODES:
        raise ConfigError(f"SNN calibration mode must be one of {MODES}, got {mode!r}")
    if mode == "advanced":
        snn.meta["weight_calibration"] = calibrate_weights_(snn, gm, x, timesteps, weights, time_chunk)
        mode = "potential"
    if joint_timesteps and mode != "potential":
        raise ConfigError(f"joint_timesteps fits the initial-membrane correction: it needs mode 'potential' or "
                          f"'advanced', got {mode!r}")
    fit_ts = tuple(joint_timesteps) or (timesteps,)
    ann = ann_activations(gm, x)
    errors = {}
    for name, neuron in snn.neurons().items():
        lam = torch.as_tensor(snn.meta["thresholds"][neuron.name]).float() / neuron.levels  # one spike's value
        target = ann[neuron.name]
        lam_b = lam.view(-1, *([1] * (target.dim() - 2))) if lam.numel() > 1 else lam
        charge, abs_err = 0.0, 0.0  # charge: the per-channel e_c(T)·T (activation units) summed over fit_ts
        for t in fit_ts:
            out = lam_b * snn_layer_output(snn, name, x, t, time_chunk) / t
            err = _channel_mean(target - out)
            charge = charge + err * t
            abs_err += (target - out).abs().mean().item()
        errors[name] = abs_err / len(fit_ts)
        lam_c = lam_b.reshape(err.shape) if lam.numel() > 1 else lam
        if mode == "bias":
            neuron.i_bias += err / lam_c
            neuron.i_bias_steps.fill_(timesteps)
        else:
            neuron.v_init_bias += charge / len(fit_ts) / lam_c
    return errors
