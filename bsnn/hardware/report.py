"""The cost report's files: ``cost.json`` (top-level ``total`` with ``energy_pj``, ``latency_ns``, ``area_um2``,
``layers``, ``breakdown_pj``, ``comparisons``, ``vs_T``), ``cost.md``, ``cost_breakdown.png`` and ``cost_vs_T.png``.

The library side of ``bsnn cost`` (:mod:`bsnn.hardware.cli`) and of the pipeline's cost stage
(:func:`run_cost`), so the pipeline never imports a CLI module.
"""

from __future__ import annotations

import os
from pathlib import Path

from bsnn.hardware.config import HardwareConfig, resolve_hardware, source_status
from bsnn.hardware.cost import CostReport, estimate, sweep_timesteps
from bsnn.hardware.front import accuracy_energy_front, front_markdown, plot_front
from bsnn.hardware.ops import operation_counts, operations_markdown
from bsnn.io import atomic_write_json, atomic_write_text, output_dir
from bsnn.report import markdown_table, save_figure

#: the files :func:`run_cost` writes into a run folder
COST_FILES = ("cost.json", "cost.md", "cost_breakdown.png", "cost_vs_T.png", "cost_front.md", "cost_front.png")


def operating_point(result, tolerance: float = 1.0) -> tuple[int, str]:
    """The T at which a network is run: the smallest simulated T whose accuracy is within ``tolerance`` points of
    the ANN's on the same samples — on the **validation** sweep when the result carries one (``validation``), so the
    choice never reads test labels — with the reason in words.

    Args:
        result: a :class:`~bsnn.simulate.SimResult` or its ``to_dict()`` (``sweep.json``): ``accuracy`` per T,
            ``ann_accuracy`` and optionally ``validation``.
        tolerance: accuracy points below the ANN that count as reaching it.

    Returns:
        ``(T, reason)``; without an ANN reference, or when no simulated T comes within ``tolerance``, the largest
        simulated T (the reason says which).
    """
    d = result if isinstance(result, dict) else result.to_dict()
    split = "validation" if d.get("validation") else "test (no validation sweep)"
    d = d.get("validation") or d
    acc = {int(t): float(a) for t, a in d["accuracy"].items()}
    t_max, ann = max(acc), d.get("ann_accuracy")
    if ann is None:
        return t_max, f"T={t_max}: the largest simulated T (no ANN accuracy to compare with)"
    t = next((t for t in sorted(acc) if acc[t] >= ann - tolerance), None)
    if t is None:
        return t_max, (f"T={t_max}: the largest simulated T; no simulated T reaches the ANN's {ann:.2f} % within "
                       f"{tolerance:g} point(s) on the {split} split (best {max(acc.values()):.2f} %)")
    return t, (f"T={t}: the smallest simulated T within {tolerance:g} point(s) of the ANN on the {split} split "
               f"({acc[t]:.2f} % vs {ann:.2f} %)")


def _ts_up_to(T: int) -> list[int]:
    """1..T for T <= 16, else the powers of two below T and T."""
    return list(range(1, T + 1)) if T <= 16 else sorted({2 ** i for i in range(T.bit_length()) if 2 ** i < T} | {T})


def write_cost_report(report: CostReport, out_dir: str | os.PathLike, network=None, activity=None,
                      hw: HardwareConfig | None = None, stem: str = "cost", plots: bool = True,
                      derived_from: dict | None = None) -> dict[str, Path]:
    """Write ``cost.json``, ``cost.md`` and (with ``plots``) ``cost_breakdown.png`` / ``cost_vs_T.png``.

    ``network``/``activity``/``hw`` (as given to :func:`estimate`) enable the energy/latency-vs-T sweep;
    ``derived_from`` (content hashes of the network and the sweep it was costed from) goes into ``cost.json``.

    Raises:
        OutputError: ``out_dir`` cannot be created or written.
    """
    out = output_dir(out_dir)
    d = report.to_dict()
    if derived_from is not None:
        d["derived_from"] = derived_from
    d["breakdown_pj"] = report.total.breakdown_pj
    vs_t: dict[str, list] = {}
    if network is not None and hw is not None:
        ts = _ts_up_to(report.timesteps)
        vs_t["dense"] = sweep_timesteps(network, activity, hw, ts, "dense")
        if activity is not None:
            vs_t["event_driven"] = sweep_timesteps(network, activity, hw, ts, "event_driven")
    d["vs_T"] = vs_t
    sweep = activity if isinstance(activity, dict) else activity.to_dict() if hasattr(activity, "to_dict") else None
    front = accuracy_energy_front(network, sweep, hw) if network is not None and hw is not None and sweep \
        and sweep.get("accuracy") and not hw.is_digital else None
    if front is not None:
        d["front"] = front
    ops = operation_counts(network, activity if report.mode == "event_driven" else None, report.timesteps) \
        if network is not None else None
    if ops is not None:
        d["operations"] = ops
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    atomic_write_json(paths["json"], d)
    atomic_write_text(paths["md"], report.markdown() + ("\n" + operations_markdown(ops) if ops else "")
                      + "\n" + sources_markdown(report.config))
    if front is not None:
        paths["front_md"] = out / f"{stem}_front.md"
        atomic_write_text(paths["front_md"], front_markdown(front))
        if plots:
            paths["front_png"] = plot_front(front, out / f"{stem}_front.png")
    if plots:
        paths["breakdown_png"] = plot_breakdown(report, out / f"{stem}_breakdown.png")
        if vs_t:
            paths["vs_T_png"] = plot_vs_t(vs_t, report, out / f"{stem}_vs_T.png")
    return paths


def _config_value(config: dict, key: str):
    """The value of a dotted key (``energy.adc_pj``) in a nested config dict; None if absent."""
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def sources_markdown(config: dict) -> str:
    """The ``Sources`` section of ``cost.md``: every cited constant of the hardware config (``CostReport.config``,
    i.e. ``HardwareConfig.to_dict()``) with its value, status and citation, the unverified ones first; "" when
    the config cites nothing."""
    sources = config.get("sources") or {}
    if not sources:
        return ""
    order = list(sources)
    keys = sorted(order, key=lambda k: (source_status(sources[k]) != "unverified", order.index(k)))
    rows = []
    for k in keys:
        v = _config_value(config, k)
        shown = f"{v:.6g}" if isinstance(v, float) else "null" if v is None else v
        rows.append([f"`{k}`", shown, source_status(sources[k]), str(sources[k]).split("] ", 1)[-1]])
    unverified = config.get("unverified") or []
    head = f"## Sources of the constants ({config.get('name')})\n\n" + (
        f"Not verified against their source: {', '.join(f'`{k}`' for k in unverified)}.\n\n" if unverified
        else "Every cited constant is verified against its source, derived from it, a stated choice or user-set."
        "\n\n")
    return head + markdown_table(["constant", "value", "status", "source"], rows)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_breakdown(report: CostReport, path: str | os.PathLike) -> Path:
    """Energy by component (total) and per layer (stacked by component)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [k for k, v in report.total.breakdown_pj.items() if v > 0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    vals = [report.total.breakdown_pj[k] for k in comps]
    a.barh(comps, vals)
    a.set_xlabel("energy per inference (pJ)")
    a.set_title(f"{report.hardware} [{report.mode}], T={report.timesteps}")
    names = [l.name for l in report.layers]
    bottom = [0.0] * len(names)
    for k in comps:
        h = [l.breakdown_pj.get(k, 0.0) for l in report.layers]
        b.bar(range(len(names)), h, bottom=bottom, label=k)
        bottom = [x + y for x, y in zip(bottom, h)]
    b.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    b.set_ylabel("energy (pJ)")
    b.set_title("per layer")
    b.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_vs_t(vs_t: dict, report: CostReport, path: str | os.PathLike) -> Path:
    """Energy and latency vs T for each mode, with the bit-serial ANN as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, rows in vs_t.items():
        ts = [r["T"] for r in rows]
        a.plot(ts, [r["energy_pj"] for r in rows], "o-", label=f"SNN {mode}")
        if rows and rows[0]["latency_ns"] is not None:
            b.plot(ts, [r["latency_ns"] for r in rows], "o-", label=f"SNN {mode}")
    ann = report.comparisons.get("ann_bit_serial_imc")
    if ann:
        lab = f"ANN, {ann.get('activation_bits', '?')}-bit bit-serial (same hw)"
        a.axhline(ann["energy_pj"], color="k", ls="--", label=lab)
        if ann["latency_ns"] is not None:
            b.axhline(ann["latency_ns"], color="k", ls="--", label=lab)
    for ax, lab in ((a, "energy per inference (pJ)"), (b, "latency (ns)")):
        ax.set_xlabel("timesteps T")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_title(report.hardware)
    return _save(fig, Path(path))


def add_early_exit_(report: CostReport, network, activity, hw: HardwareConfig | str, mode: str, early_exit: dict
                    ) -> CostReport:
    """``activity``: the run's :class:`~bsnn.simulate.SimResult` or its ``to_dict()`` (``sweep.json``).

    State the early-exit rule chosen on validation (``validated_early_exit(...)["chosen"]``: patience, margin,
    accuracy, mean_timesteps) in ``report``: its average T and the cost at the smallest simulated T that covers it
    (an upper bound: samples that exit earlier cost less), in ``report.operating_point["early_exit"]`` and a note.
    Returns ``report``."""
    simulated = sorted(int(t) for t in (activity["accuracy"] if isinstance(activity, dict) else activity.accuracy))
    covering = min((t for t in simulated if t >= early_exit["mean_timesteps"]), default=simulated[-1])
    bound = estimate(network, activity, hw, timesteps=covering, mode=mode).total
    report.operating_point["early_exit"] = {**early_exit, "bound_timesteps": covering,
                                            "energy_pj_upper_bound": bound.energy_pj}
    report.notes.insert(2, f"early exit (rule chosen on validation: patience {early_exit['patience']}, margin "
                           f"{early_exit['margin']}): test accuracy {early_exit['accuracy']:.2f} % at an average of "
                           f"{early_exit['mean_timesteps']:.2f} timesteps per sample; at most {bound.energy_pj:.4g} pJ "
                           f"per inference (the cost at T={covering}, the smallest simulated T covering that average)")
    return report


def run_cost(snn, result, out_dir: str | os.PathLike, hw: HardwareConfig | str = "spikesim-rram-65nm",
             timesteps: int | None = None, mode: str = "event_driven", plots: bool = True,
             derived_from: dict | None = None, tolerance: float = 1.0, early_exit: dict | None = None
             ) -> CostReport:
    """For ``bsnn run``: cost the converted network at T — ``timesteps``, else the operating point
    (:func:`operating_point`: the smallest T within ``tolerance`` points of the ANN) — and write
    ``cost.{json,md}`` (+ plots; :data:`COST_FILES`) into the run folder. Returns the report.

    ``early_exit``: the early-exit rule chosen on validation (``validated_early_exit(...)["chosen"]``: patience,
    margin, accuracy, mean_timesteps), when predictions were recorded: the report also states its average T and
    the cost at the smallest simulated T that covers it (an upper bound: samples that exit earlier cost less)."""
    reason = f"T={timesteps}: set by cost.timesteps"
    if timesteps is None:
        timesteps, reason = operating_point(result, tolerance)
    report = estimate(snn, result, hw, timesteps=timesteps, mode=mode)
    report.operating_point = {"timesteps": timesteps, "reason": reason}
    report.notes.insert(1, f"operating point {reason}")
    if early_exit:
        add_early_exit_(report, snn, result, hw, mode, early_exit)
    write_cost_report(report, out_dir, snn, result, resolve_hardware(hw), plots=plots, derived_from=derived_from)
    return report
