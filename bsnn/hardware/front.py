"""The accuracy–energy front: at what accuracy does the SNN beat the ANN on this accelerator?

For every simulated T of a sweep: the SNN's accuracy (measured) against its energy per inference on the
in-memory accelerator (dense and event-driven), latency and EDP, and on the digital baseline; beside them the same
network as an ANN — bit-serial on the same accelerator with ``ann_bits``-bit activations and on the digital
baseline — at the ANN's measured accuracy. Written as ``cost_front.{md,png}`` next to ``cost.json`` by
:func:`bsnn.hardware.report.write_cost_report` whenever the activity carries accuracies (a sweep).
"""

from __future__ import annotations

import os
from pathlib import Path

from bsnn.hardware.config import HardwareConfig, preset
from bsnn.hardware.cost import estimate, sweep_timesteps
from bsnn.report import markdown_table


def accuracy_energy_front(network, result, hw: HardwareConfig, ann_bits: int = 8) -> dict:
    """The front of a simulated network.

    Args:
        network: the SpikingNetwork (or layer table) that was simulated.
        result: its :class:`~bsnn.simulate.SimResult` or ``to_dict()`` (``sweep.json``) with ``accuracy`` per T.
        hw: the in-memory accelerator.
        ann_bits: activation bits of the bit-serial ANN reference.

    Returns:
        ``{"rows": [per T: T, accuracy, energy_dense_pj, energy_event_pj, latency_ns, edp_event_pj_ns,
        energy_digital_pj], "ann": {accuracy, energy_bit_serial_pj, latency_bit_serial_ns, energy_digital_pj,
        ann_bits}, "snn_wins_up_to_T": the largest T whose event-driven energy is below the bit-serial ANN's (or
        None), "summary": one sentence}``.
    """
    d = result if isinstance(result, dict) else result.to_dict()
    acc = {int(t): float(a) for t, a in d["accuracy"].items()}
    ts = sorted(acc)
    dense = {r["T"]: r for r in sweep_timesteps(network, d, hw, ts, "dense")}
    event = {r["T"]: r for r in sweep_timesteps(network, d, hw, ts, "event_driven")}
    digital = {r["T"]: r for r in sweep_timesteps(network, d, preset("digital-45nm"), ts, "event_driven")}
    ref = estimate(network, d, hw, timesteps=ts[-1], mode="dense", ann_bits=ann_bits)
    ann = {"accuracy": d.get("ann_accuracy"), "ann_bits": ann_bits,
           "energy_bit_serial_pj": ref.comparisons["ann_bit_serial_imc"]["energy_pj"],
           "latency_bit_serial_ns": ref.comparisons["ann_bit_serial_imc"]["latency_ns"],
           "energy_digital_pj": ref.comparisons["digital_ann"]["energy_pj"]}
    rows = [{"T": t, "accuracy": acc[t], "energy_dense_pj": dense[t]["energy_pj"],
             "energy_event_pj": event[t]["energy_pj"], "latency_ns": event[t]["latency_ns"],
             "edp_event_pj_ns": event[t]["edp_pj_ns"], "energy_digital_pj": digital[t]["energy_pj"]} for t in ts]
    wins = [r for r in rows if r["energy_event_pj"] < ann["energy_bit_serial_pj"]]
    best = max(wins, key=lambda r: r["T"]) if wins else None
    if best is None:
        summary = (f"on {hw.name} the SNN (event-driven) uses more energy than the {ann_bits}-bit bit-serial ANN at "
                   f"every simulated T (from T={ts[0]})")
    else:
        summary = (f"on {hw.name} the SNN (event-driven) uses less energy than the {ann_bits}-bit bit-serial ANN up "
                   f"to T={best['T']}, where it reaches {best['accuracy']:.2f} %"
                   + (f" (ANN {ann['accuracy']:.2f} %)" if ann["accuracy"] is not None else ""))
    return {"rows": rows, "ann": ann, "snn_wins_up_to_T": best["T"] if best else None, "summary": summary,
            "hardware": hw.name}


def front_markdown(front: dict) -> str:
    """The front as a markdown table with the ANN references and the summary."""
    rows = [[r["T"], f"{r['accuracy']:.2f}", f"{r['energy_dense_pj']:.4g}", f"{r['energy_event_pj']:.4g}",
             None if r["latency_ns"] is None else f"{r['latency_ns']:.4g}",
             None if r["edp_event_pj_ns"] is None else f"{r['edp_event_pj_ns']:.4g}", f"{r['energy_digital_pj']:.4g}"]
            for r in front["rows"]]
    a = front["ann"]
    acc = "n/a" if a["accuracy"] is None else f"{a['accuracy']:.2f}"
    rows.append([f"ANN ({a['ann_bits']}-bit bit-serial)", acc, f"{a['energy_bit_serial_pj']:.4g}", "",
                 None if a["latency_bit_serial_ns"] is None else f"{a['latency_bit_serial_ns']:.4g}", "",
                 f"{a['energy_digital_pj']:.4g}"])
    return (f"# Accuracy vs energy per inference ({front['hardware']})\n\n"
            + markdown_table(["T", "accuracy (%)", "energy dense (pJ)", "energy event-driven (pJ)", "latency (ns)",
                              "EDP event-driven (pJ·ns)", "energy digital 45 nm (pJ)"], rows)
            + f"\n{front['summary']}.\n")


def plot_front(front: dict, path: str | os.PathLike) -> Path:
    """Accuracy vs energy (log) for the SNN (dense, event-driven, digital) over T, the ANN as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, a = front["rows"], front["ann"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    acc = [r["accuracy"] for r in rows]
    for key, label in (("energy_event_pj", "SNN, event-driven IMC"), ("energy_dense_pj", "SNN, dense IMC"),
                       ("energy_digital_pj", "SNN, digital 45 nm")):
        ax.plot([r[key] for r in rows], acc, "o-", ms=3, label=label)
    for r in rows:
        ax.annotate(f"T={r['T']}", (r["energy_event_pj"], r["accuracy"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    if a["accuracy"] is not None:
        ax.plot([a["energy_bit_serial_pj"]], [a["accuracy"]], "k*", ms=10,
                label=f"ANN, {a['ann_bits']}-bit bit-serial IMC")
        ax.plot([a["energy_digital_pj"]], [a["accuracy"]], "kD", ms=6, label="ANN, digital 45 nm")
    ax.set_xscale("log")
    ax.set_xlabel("energy per inference (pJ)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs energy ({front['hardware']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
