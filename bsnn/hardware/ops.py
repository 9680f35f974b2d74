"""Operation counts of one inference, the way spikingjelly's and sinabs' counters report them.

Per synaptic layer and per T: *synaptic operations* — accumulates (ACs) for spike inputs, one per spike per
fan-out weight (``macs · rate`` per step), and multiply-accumulates (MACs) for the analog-input layer (``macs`` per
step under direct encoding) — and *neuron updates* (one per neuron the layer feeds, per step). Energies with the
45 nm digital reference of Horowitz (ISSCC 2014): 0.9 pJ per 32-bit add (an AC), 4.6 pJ per 32-bit
multiply-add (a MAC), the SNN convention; neuron updates are counted, not priced (their cost is the accelerator
model's ``neuron_pj``).
"""

from __future__ import annotations

from bsnn.hardware.config import preset
from bsnn.hardware.cost import _resolve_activity
from bsnn.hardware.mapping import resolve_layers
from bsnn.report import markdown_table

_HOROWITZ_45NM = preset("digital-45nm").energy  # the digital baseline's figures: one source for both
AC_PJ = _HOROWITZ_45NM.ac_pj  # 32-bit add, 45 nm (Horowitz 2014): 0.9 pJ
MAC_PJ = _HOROWITZ_45NM.mac_pj  # 32-bit multiply + add, 45 nm (Horowitz 2014: 3.7 + 0.9 = 4.6 pJ)


def operation_counts(network, activity, timesteps: int) -> dict:
    """ACs, MACs and neuron updates per layer over ``timesteps`` steps, one sample.

    Args:
        network: a SpikingNetwork, layer table or CSV (as :func:`bsnn.hardware.cost.estimate`).
        activity: a SimResult / ``sweep.json`` / Activity with measured rates, or None (every input spikes every
            step: the dense upper bound).
        timesteps: T.

    Returns:
        ``{"timesteps", "rates": "measured" | "dense", "layers": [{name, macs_per_step, acs, macs,
        neuron_updates}], "total": {acs, macs, neuron_updates, synaptic_ops, energy_pj}, "ann_macs"}``.
    """
    layers = resolve_layers(network)
    act = _resolve_activity(layers, activity)
    rows = []
    for s in layers:
        rates = act.steps(s.name, timesteps) if act is not None and not s.analog_input else None
        spikes = sum(rates) if rates is not None else float(timesteps)
        acs = 0.0 if s.analog_input else s.macs * spikes
        macs = float(s.macs * timesteps) if s.analog_input else 0.0
        rows.append({"name": s.name, "macs_per_step": s.macs, "acs": acs, "macs": macs,
                     "neuron_updates": s.neurons * timesteps})
    total = {k: sum(r[k] for r in rows) for k in ("acs", "macs", "neuron_updates")}
    total["synaptic_ops"] = total["acs"] + total["macs"]
    total["energy_pj"] = total["acs"] * AC_PJ + total["macs"] * MAC_PJ
    return {"timesteps": timesteps, "rates": "measured" if act is not None else "dense", "layers": rows,
            "total": total, "ann_macs": sum(s.macs for s in layers),
            "ann_energy_pj": sum(s.macs for s in layers) * MAC_PJ}


def operations_markdown(ops: dict) -> str:
    rows = [[r["name"], r["macs_per_step"], f"{r['acs']:.4g}", f"{r['macs']:.4g}", r["neuron_updates"]]
            for r in ops["layers"]]
    t = ops["total"]
    rows.append(["**total**", ops["ann_macs"], f"{t['acs']:.4g}", f"{t['macs']:.4g}", t["neuron_updates"]])
    return (f"### Operation counts (T={ops['timesteps']}, {ops['rates']} rates, one inference)\n\n"
            + markdown_table(["layer", "ANN MACs / step", "ACs (spike inputs)", "MACs (analog input)",
                              "neuron updates"], rows)
            + f"\n{t['synaptic_ops']:.4g} synaptic operations; {t['energy_pj']:.4g} pJ at 45 nm ({AC_PJ} pJ / AC, "
              f"{MAC_PJ} pJ / MAC); the same network as an ANN: {ops['ann_macs']:.4g} MACs, "
              f"{ops['ann_energy_pj']:.4g} pJ.\n")
