"""The accuracy–energy front: at what accuracy does the SNN beat the ANN on this accelerator?

For every simulated T of a sweep: the SNN's accuracy (measured) against its energy per inference on the
in-memory accelerator (dense and event-driven), latency and EDP, and on the digital baseline; beside them the same
network as an ANN — bit-serial on the same accelerator with ``ann_bits``-bit activations and on the digital
baseline — at the ANN's measured accuracy. Written as ``cost_front.{md,png}`` next to ``cost.json`` by
:func:`bsnn.hardware.report.write_cost_report` whenever the activity carries accuracies (a sweep).

The ADC front (:func:`adc_front`): accuracy against energy at one T for several ADC resolutions and crossbar
heights, each from its own constrained simulation (:mod:`bsnn.hardware.constraints`) costed on the matching
hardware; ``bsnn cost --run DIR --adc-front 3,4,5,6,8`` writes it as ``cost_adc_front.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from bsnn.errors import ConfigError
from bsnn.hardware.config import ConstraintConfig, HardwareConfig, preset, resolve_hardware
from bsnn.hardware.constraints import apply_constraints, exact_adc_bits
from bsnn.hardware.cost import estimate, sweep_timesteps
from bsnn.io import atomic_write_json, atomic_write_text, output_dir
from bsnn.report import markdown_table, save_figure
from bsnn.simulate import SimConfig, simulate


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
    return save_figure(fig, path)


# --------------------------------------------------------------------------------- the ADC-resolution front
def _setting_hardware(hw: HardwareConfig, rows: int, bits: int) -> HardwareConfig:
    """``hw`` with ``rows``-row crossbars (square crossbars stay square) and a ``bits``-bit ADC."""
    cols = rows if hw.xbar_cols == hw.xbar_rows else hw.xbar_cols
    return hw.replace(xbar_rows=rows, xbar_cols=cols, adc_bits=bits)


def adc_front(network, loader, hw: HardwareConfig | str, timesteps: int, adc_bits=(3, 4, 5, 6, 8),
              xbar_rows=None, *, membrane_bits: int | None = None, sim_cfg: SimConfig | None = None,
              device="cpu", quiet: bool = True) -> dict:
    """Accuracy against energy for several ADC resolutions (and crossbar heights): one constrained simulation
    and one cost estimate per setting.

    For every ``rows`` in ``xbar_rows`` and ``bits`` in ``adc_bits``: the hardware becomes ``hw`` with
    ``rows``-row crossbars (square ones stay square) and a ``bits``-bit ADC; the network is simulated to T under
    that hardware's constraints (:meth:`~bsnn.hardware.config.ConstraintConfig.from_hardware`: crossbar row
    groups with ADC-quantised partial sums, +1 sign bit for popcount/paired sign handling; ``membrane_bits``
    optionally fixes the membranes too), and costed on that hardware: dense (every crossbar read every step,
    activity-independent) and event-driven (the spike rates measured in *this* constrained simulation). The ideal
    network is simulated once on the same samples for reference.

    Args:
        network: converted :class:`~bsnn.snn.network.SpikingNetwork`.
        loader: yields ``(x [B, C, H, W], y [B])``; the samples the accuracies are measured on.
        hw: an in-memory accelerator (config, preset name or YAML path; not the digital baseline).
        timesteps: T at which accuracy and cost are reported.
        adc_bits: ADC resolutions (the hardware's ``adc_bits`` field; energy per conversion scales as
            2^(bits − adc_ref_bits), or by the hardware's ``adc_scaling_pj`` where its source gives one).
        xbar_rows: crossbar heights (None: the hardware's).
        membrane_bits: fixed-point membrane width in every setting (None: float membranes).
        sim_cfg: simulation settings (chunking, encoding, sample limit); its timesteps and constraints are
            replaced.

    Returns:
        ``{"rows": [per setting: xbar_rows, adc_bits, constraint_adc_bits (signed, as simulated),
        exact_adc_bits (the signed bits at which every quantised layer would be exact: rows per conversion over
        the input quantum, :func:`~bsnn.hardware.constraints.exact_adc_bits`; None if no layer is quantised), T,
        accuracy,
        accuracy_drop (ideal − constrained, points), energy_dense_pj, energy_event_pj, adc_event_pj,
        adc_pj_per_conversion, latency_ns, area_um2], "ideal": {accuracy, T, samples}, "hardware", "timesteps",
        "samples", "summary", "constrained_layers": the layers computed as ADC-quantised crossbars, "ideal_layers":
        layer -> why it stays exact (:func:`~bsnn.hardware.constraints.constraint_plan`)}``; rows ordered by
        xbar_rows, then adc_bits.

    Raises:
        ConfigError: the digital baseline, an empty setting list, or a setting the constraints refuse (fewer
            than 2 signed ADC bits).
    """
    hw = resolve_hardware(hw)
    if hw.is_digital:
        raise ConfigError(f"adc_front: {hw.name!r} is the digital baseline (no ADC); pick an in-memory preset "
                          "such as spikesim-rram-65nm or isaac-rram-32nm")
    bits_list = sorted({int(b) for b in adc_bits})
    rows_list = sorted({int(r) for r in (xbar_rows or [hw.xbar_rows])})
    if not bits_list or not rows_list:
        raise ConfigError("adc_front: give at least one ADC resolution and one crossbar height")
    T = int(timesteps)
    base = dataclasses.replace(sim_cfg or SimConfig(), timesteps=[T], constraints=None, record_predictions=False)
    ideal = simulate(network, loader, cfg=base, device=device, quiet=quiet)
    out = []
    for rows in rows_list:
        for bits in bits_list:
            hw_s = _setting_hardware(hw, rows, bits)
            cons = ConstraintConfig.from_hardware(hw_s, membrane_bits=membrane_bits)
            with apply_constraints(network, cons) as plan:
                res = simulate(network, loader, cfg=base, device=device, quiet=quiet)
                xbars = [network.graph_module.get_submodule(k) for k, v in plan.items() if v == "crossbar+adc"]
                exact = max((exact_adc_bits(m.full_scale, m.unit) for m in xbars), default=None)
            event = estimate(network, res, hw_s, timesteps=T, mode="event_driven", compare=False)
            dense = estimate(network, None, hw_s, timesteps=T, mode="dense", compare=False)
            out.append({"xbar_rows": rows, "adc_bits": bits, "constraint_adc_bits": cons.adc_bits,
                        "exact_adc_bits": exact,
                        "T": T, "accuracy": res.accuracy[T], "accuracy_drop": ideal.accuracy[T] - res.accuracy[T],
                        "energy_dense_pj": dense.total.energy_pj, "energy_event_pj": event.total.energy_pj,
                        "adc_event_pj": event.total.breakdown_pj.get("adc", 0.0),
                        "adc_pj_per_conversion": hw_s.adc_energy_pj, "latency_ns": dense.total.latency_ns,
                        "area_um2": dense.total.area_um2})
    near = [r for r in out if r["accuracy_drop"] <= 1.0]
    cheapest = min(near, key=lambda r: r["energy_event_pj"]) if near else None
    summary = (f"on {hw.name} at T={T} the cheapest setting within 1 point of the ideal SNN "
               f"({ideal.accuracy[T]:.2f} %) is {cheapest['adc_bits']}-bit ADCs on {cheapest['xbar_rows']}-row "
               f"crossbars: {cheapest['accuracy']:.2f} % at {cheapest['energy_event_pj']:.4g} pJ (event-driven)"
               if cheapest else f"on {hw.name} at T={T} no setting comes within 1 point of the ideal SNN "
                                f"({ideal.accuracy[T]:.2f} %)")
    layers = {k: v for k, v in plan.items() if k in {l["name"] for l in network.layers}}
    return {"rows": out, "ideal": {"accuracy": ideal.accuracy[T], "T": T, "samples": ideal.samples},
            "hardware": hw.name, "timesteps": T, "samples": ideal.samples, "summary": summary,
            "constrained_layers": [k for k, v in layers.items() if v.startswith("crossbar")],
            "ideal_layers": {k: v for k, v in layers.items() if not v.startswith("crossbar")}}


def adc_front_markdown(front: dict) -> str:
    """The ADC front as a markdown table with the ideal SNN and the summary."""
    rows = [[r["xbar_rows"], r["adc_bits"], r["constraint_adc_bits"], r["exact_adc_bits"], f"{r['accuracy']:.2f}",
             f"{r['accuracy_drop']:+.2f}", f"{r['energy_event_pj']:.4g}", f"{r['energy_dense_pj']:.4g}",
             f"{r['adc_event_pj']:.4g}", f"{r['adc_pj_per_conversion']:.4g}",
             None if r["latency_ns"] is None else f"{r['latency_ns']:.4g}",
             None if r["area_um2"] is None else f"{r['area_um2']:.4g}"] for r in front["rows"]]
    i = front["ideal"]
    return (f"# Accuracy vs ADC resolution ({front['hardware']}, T={front['timesteps']}, {front['samples']} "
            f"samples)\n\nEach row: the SNN simulated under that crossbar height and ADC resolution "
            f"(bsnn.hardware.constraints) and costed on the same hardware; event-driven energy uses the spike rates "
            f"of that constrained simulation. Ideal SNN (exact partial sums): {i['accuracy']:.2f} %.\n\n"
            f"ADC-quantised layers: {', '.join(front['constrained_layers']) or 'none'}; kept exact: "
            + ("; ".join(f"{k} ({v.removeprefix('ideal: ')})" for k, v in front["ideal_layers"].items()) or "none")
            + ".\n\n"
            + markdown_table(["crossbar rows", "ADC bits", "simulated ADC bits (signed)", "exact (signed)",
                              "accuracy (%)", "drop vs ideal (points)", "energy event-driven (pJ)",
                              "energy dense (pJ)", "ADC energy event-driven (pJ)", "pJ per conversion",
                              "latency (ns)", "area (µm²)"], rows)
            + f"\n{front['summary']}.\n")


def plot_adc_front(front: dict, path: str | os.PathLike) -> Path:
    """Accuracy vs event-driven energy (log), one line per crossbar height, points labelled by ADC bits; the ideal
    SNN's accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rows in sorted({r["xbar_rows"] for r in front["rows"]}):
        pts = [r for r in front["rows"] if r["xbar_rows"] == rows]
        ax.plot([r["energy_event_pj"] for r in pts], [r["accuracy"] for r in pts], "o-", ms=4,
                label=f"{rows}-row crossbars")
        for r in pts:
            ax.annotate(f"{r['adc_bits']}b", (r["energy_event_pj"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(front["ideal"]["accuracy"], color="k", ls="--", lw=1, label="ideal SNN (exact partial sums)")
    ax.set_xscale("log")
    ax.set_xlabel("energy per inference, event-driven (pJ)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs ADC resolution ({front['hardware']}, T={front['timesteps']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


#: the files :func:`write_adc_front` writes
ADC_FRONT_FILES = ("cost_adc_front.json", "cost_adc_front.md", "cost_adc_front.png")


def write_adc_front(front: dict, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write ``cost_adc_front.{json,md}`` (and ``.png`` with ``plots``) into ``out_dir``; returns the paths.

    Raises:
        OutputError: ``out_dir`` cannot be created or written.
    """
    out = output_dir(out_dir)
    paths = {"adc_front_json": out / ADC_FRONT_FILES[0], "adc_front_md": out / ADC_FRONT_FILES[1]}
    atomic_write_json(paths["adc_front_json"], front)
    atomic_write_text(paths["adc_front_md"], adc_front_markdown(front))
    if plots:
        paths["adc_front_png"] = plot_adc_front(front, out / ADC_FRONT_FILES[2])
    return paths
