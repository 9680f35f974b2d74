"""Conversion-friendliness checks of an ANN, run before training and at conversion.

Findings are returned as messages and emitted as :class:`ConversionWarning` (a ``UserWarning``), so a user hears
*before* spending hours of training that a network will convert badly or not at all:

* **activations other than ReLU / ReLU6 / Hardtanh(0, a) / clip / QCFS** (GELU, SiLU, LeakyReLU, ...): IF neurons only realise ReLU-like
  rate functions; conversion will fail.
* **bias after BatchNorm folding**: a conv/linear followed by BatchNorm (or with its own bias) becomes a layer
  with a bias, i.e. a constant current injected every timestep. It converts correctly, but at few timesteps it
  shifts the first spikes; the θ/2 shift (``convert.v_init=0.5``) and bias calibration
  (``convert.snn_calibration=bias``) compensate. Reported once with the number of layers, only when neither
  compensation is enabled.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

_NON_RELU = (nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.PReLU, nn.Mish)


class ConversionWarning(UserWarning):
    """A network feature that will make ANN→SNN conversion fail or need more timesteps."""


def architecture_findings(model: nn.Module, v_init: float = 0.0, snn_calibration: str = "none") -> list[str]:
    """Conversion-friendliness findings of ``model`` (module-level; functional ops are checked at conversion).
    ``v_init`` / ``snn_calibration``: the conversion settings that compensate biases."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Hardtanh) and m.min_val != 0:
            found.append(f"{name or 'model'}: {type(m).__name__}(min_val={m.min_val}) is not a clipped ReLU; IF "
                         "neurons realise min(max(x, 0), a) only (nn.Hardtanh(0, a), nn.ReLU6) — conversion will fail")
        elif isinstance(m, _NON_RELU):
            found.append(f"{name or 'model'}: {type(m).__name__} is not a ReLU; IF neurons realise ReLU / clip / "
                         "QCFS only — conversion will fail")
    biased = _biased_layers(model)
    if biased and v_init == 0.0 and snn_calibration == "none":
        found.append(f"{len(biased)} layer(s) ({', '.join(biased[:4])}{', ...' if len(biased) > 4 else ''}) carry a "
                     "bias after BatchNorm folding: a constant current every timestep that distorts the first "
                     "spikes; consider convert.v_init=0.5 and convert.snn_calibration=bias")
    return found


def _biased_layers(model: nn.Module) -> list[str]:
    """Conv/linear layers that will carry a bias after BN folding (own bias, or followed by a BatchNorm in
    module order — the layout of every sequential / bsnn model)."""
    mods = list(model.named_modules())
    out = []
    for i, (name, m) in enumerate(mods):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nxt = next((x for _, x in mods[i + 1:] if not isinstance(x, (nn.Sequential, nn.ModuleList))), None)
            if m.bias is not None or isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)):
                out.append(name)
    return out


def warn_architecture(model: nn.Module, v_init: float = 0.0, snn_calibration: str = "none",
                      where: str = "") -> list[str]:
    """Emit every finding of :func:`architecture_findings` as a :class:`ConversionWarning`; returns them."""
    found = architecture_findings(model, v_init, snn_calibration)
    for msg in found:
        warnings.warn(f"{where}{msg}", ConversionWarning, stacklevel=2)
    return found

