"""``bsnn cost``: the hardware cost report from a layer table or a run folder, and its files.

Wiring (in ``bsnn/cli.py``): ``from bsnn.hardware.cli import add_cost_parser`` and call
``add_cost_parser(sub)`` inside ``build_parser``; the sub-command sets ``fn=cmd_cost`` like the others.
``bsnn run`` calls :func:`bsnn.hardware.report.run_cost` (the library side, re-exported here) after the
simulation stage.

Files written into ``--out``: ``cost.json`` (top-level ``total`` with ``energy_pj``, ``latency_ns``, ``area_um2``,
``layers``, ``breakdown_pj``, ``comparisons``, ``vs_T``), ``cost.md`` (with the sources of the constants),
``cost_breakdown.png`` and ``cost_vs_T.png``; with ``--adc-front 3,4,5,6,8`` (and ``--run``) also
``cost_adc_front.{json,md,png}`` (:func:`bsnn.hardware.front.adc_front`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

from bsnn.config import load_config
from bsnn.data import build_loaders
from bsnn.errors import ConfigError, DataError
from bsnn.hardware.config import HardwareConfig, list_presets, load_hardware_config, preset
from bsnn.hardware.cost import MODES, Activity, estimate
from bsnn.hardware.front import adc_front, write_adc_front
from bsnn.hardware.mapping import load_layer_table
from bsnn.hardware.report import (COST_FILES, _save, _ts_up_to, plot_breakdown, plot_vs_t,  # noqa: F401 (re-exports)
                                  operating_point, run_cost, write_cost_report, add_early_exit_)
from bsnn.io import file_sha256, model_digest
from bsnn.modelfile import load_snn
from bsnn.runfolder import Entry, RunLock, check_out_dir, commit_entries



def add_cost_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``cost`` sub-command (handler :func:`cmd_cost`) on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "cost", help="energy / latency / area on an in-memory-computing accelerator",
        description="Cost a layer table (--layers) or a converted run (--run) on an IMC preset. Hardware fields "
                    "can be overridden as key=value (e.g. energy.adc_pj=1.5 pe_per_tile=4).")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted hardware-config overrides")
    p.add_argument("--preset", default="spikesim-rram-65nm", help=f"hardware preset: {', '.join(list_presets())}")
    p.add_argument("--hw-config", type=Path, default=None, help="hardware YAML (see configs/hardware/); "
                   "replaces --preset")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--layers", type=Path, help="layer table CSV: name,in_channels,out_channels,in_size,"
                     "out_size,kernel")
    src.add_argument("--run", type=Path, help="run folder with snn.pt (and sweep.json for event-driven costs)")
    p.add_argument("--xbar", type=int, default=None, help="crossbar size (rows = columns)")
    p.add_argument("--pe-per-tile", type=int, default=None)
    p.add_argument("--clock-mhz", type=float, default=None)
    p.add_argument("--adc-bits", type=int, default=None)
    p.add_argument("--mapping", choices=["spikesim", "unrolled"], default=None)
    p.add_argument("--sign-handling", choices=["none", "popcount", "paired"], default=None)
    p.add_argument("--timesteps", type=int, default=None, help="T (default with --run: the operating point, the "
                   "smallest simulated T within --tolerance of the ANN; with --layers: 5)")
    p.add_argument("--tolerance", type=float, default=1.0, help="accuracy points below the ANN that count as "
                   "reaching it (operating point; default 1)")
    p.add_argument("--mode", choices=list(MODES), default="dense")
    p.add_argument("--rate", type=float, default=None, help="uniform input spike rate for event_driven costs of "
                   "a layer table")
    p.add_argument("--ann-bits", type=int, default=None, help="activation bits of the bit-serial ANN comparison")
    p.add_argument("--adc-front", type=str, default=None, metavar="BITS",
                   help="with --run: also simulate the network under each ADC resolution (comma list, e.g. "
                        "3,4,5,6,8) at T and cost it on the matching hardware -> cost_adc_front.{json,md,png}")
    p.add_argument("--adc-front-rows", type=str, default=None, metavar="ROWS",
                   help="crossbar heights of the ADC front (comma list; default: the hardware's)")
    p.add_argument("--adc-front-samples", type=int, default=256,
                   help="test samples the ADC front simulates (default 256; each setting is one simulation)")
    p.add_argument("--out", type=Path, default=Path("cost"), help="output folder")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(fn=cmd_cost)
    return p


def hardware_from_args(args: argparse.Namespace) -> HardwareConfig:
    """The hardware config named by ``--preset``/``--hw-config`` with the CLI flags and overrides applied."""
    ov = list(getattr(args, "overrides", None) or [])
    flags = {"pe_per_tile": args.pe_per_tile, "clock_mhz": args.clock_mhz, "adc_bits": args.adc_bits,
             "mapping": args.mapping, "sign_handling": args.sign_handling}
    if args.xbar is not None:
        flags.update(xbar_rows=args.xbar, xbar_cols=args.xbar)
    ov += [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.hw_config is not None:
        return load_hardware_config(args.hw_config, ov)
    return preset(args.preset, ov)


def _load_run(run_dir: Path):
    """The run's network and, if there is one, its sweep (``sweep.json``), checked to come from this network.

    Raises:
        DataError: no ``snn.pt`` or an unreadable ``sweep.json``.
        ConfigError: ``sweep.json`` was simulated from another ``snn.pt`` (converted again since): costing it
            would mix two networks. A sweep that records no network (older bsnn, hand-made) is used with a warning.
    """
    snn_path = run_dir / "snn.pt"
    if not snn_path.is_file():
        raise DataError(f"run folder {str(run_dir)!r} has no snn.pt; run `bsnn convert` first")
    snn, _ = load_snn(snn_path)
    sweep = run_dir / "sweep.json"
    result = None
    if sweep.is_file():
        try:
            result = json.loads(sweep.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{str(sweep)!r} is not valid JSON: {e}") from None
        source = (result.get("derived_from") or {}).get("snn") if isinstance(result, dict) else None
        if source is None:
            warnings.warn(f"{str(sweep)!r} does not record which network it simulated (older bsnn, or written by "
                          "hand), so it cannot be checked to belong to snn.pt; rerun `bsnn simulate` to be sure",
                          UserWarning, stacklevel=2)
        elif source != model_digest(snn):
            raise ConfigError(f"{str(sweep)!r} was simulated from another snn.pt than the one now in the folder "
                              "(converted again since), so its activity is not this network's; run "
                              f"`bsnn simulate --out {run_dir}` first")
    return snn, result


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} must be comma-separated positive integers (e.g. 3,4,5,6,8), got {text!r}")
    return values


def _adc_front_settings(args: argparse.Namespace) -> tuple[list[int], list[int] | None] | None:
    """``(bits, rows)`` of ``--adc-front`` / ``--adc-front-rows`` (None without ``--adc-front``), checked before
    any work is done."""
    if not args.adc_front:
        return None
    if args.run is None:
        raise ConfigError("--adc-front needs --run DIR: it simulates the run's network (snn.pt) on the run's test "
                          "data; a layer table has neither")
    if args.adc_front_samples < 1:
        raise ConfigError(f"--adc-front-samples must be >= 1, got {args.adc_front_samples}")
    rows = _int_list(args.adc_front_rows, "--adc-front-rows") if args.adc_front_rows else None
    return _int_list(args.adc_front, "--adc-front"), rows


def _adc_front_of_run(args: argparse.Namespace, network, hw: HardwareConfig, T: int, bits: list[int],
                      rows: list[int] | None) -> dict:
    """The ADC front of ``--run``'s network on the first ``--adc-front-samples`` test samples of the run's own
    data and simulation settings (its ``config.yaml``)."""
    config = Path(args.run) / "config.yaml"
    if not config.is_file():
        raise DataError(f"run folder {str(args.run)!r} has no config.yaml, so its test data is unknown; --adc-front "
                        "works on folders written by `bsnn run` / `bsnn convert`")
    cfg = load_config(config)
    sim = dataclasses.replace(cfg.simulate, max_samples=args.adc_front_samples)
    return adc_front(network, build_loaders(cfg.data, seed=cfg.run.seed).test, hw, T, adc_bits=bits, xbar_rows=rows,
                     sim_cfg=sim, device=cfg.run.device, quiet=args.quiet)


def _run_early_exit(run: Path) -> dict | None:
    """The early-exit rule the run chose on validation (``metrics.json``'s ``early_exit.chosen``), if it recorded
    predictions; None otherwise."""
    path = Path(run) / "metrics.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text(encoding="utf-8")).get("early_exit") or {}).get("chosen")


def cmd_cost(args: argparse.Namespace) -> int:
    """Handler of ``bsnn cost``: estimate, then write cost.json / cost.md / plots into ``--out``.

    With ``--out`` equal to ``--run`` the report replaces the run's own ``cost.*``: the run folder is locked and
    the ``cost`` record of ``metrics.json`` is committed after the files.
    """
    if args.timesteps is not None and args.timesteps < 1:
        raise ConfigError(f"--timesteps must be an integer >= 1, got {args.timesteps}")
    front_settings = _adc_front_settings(args)
    hw = hardware_from_args(args)
    out = check_out_dir(args.out)
    in_run = args.run is not None and out.resolve() == Path(args.run).resolve()
    lock = RunLock(out).acquire() if in_run else None
    try:
        derived = None
        if args.run is not None:
            network, activity = _load_run(args.run)
            if args.mode == "event_driven" and activity is None:
                raise ConfigError(f"--mode event_driven needs {args.run / 'sweep.json'} (run `bsnn simulate`)")
            if args.timesteps:
                T, reason = args.timesteps, f"T={args.timesteps}: set by --timesteps"
            elif activity:
                T, reason = operating_point(activity, args.tolerance)
            else:
                T, reason = 5, "T=5: no sweep.json to choose an operating point from (run `bsnn simulate`)"
            sweep = args.run / "sweep.json"
            derived = {"snn": model_digest(network), "sweep.json": file_sha256(sweep) if activity else None,
                       "hardware": dataclasses.asdict(hw)}
        else:
            network, activity = args.layers, None
            T = args.timesteps or 5
            reason = f"T={T}: " + ("set by --timesteps" if args.timesteps else "the default for a layer table")
            if args.rate is not None:
                if not 0.0 <= args.rate <= 1.0:
                    raise ConfigError(f"--rate must be in [0, 1], got {args.rate}")
                network = load_layer_table(args.layers)
                activity = Activity.uniform(network, args.rate, T)
            elif args.mode == "event_driven":
                raise ConfigError("--mode event_driven with --layers needs --rate R (uniform input spike rate)")
        report = estimate(network, activity, hw, timesteps=T, mode=args.mode, ann_bits=args.ann_bits)
        report.operating_point = {"timesteps": T, "reason": reason}
        report.notes.insert(1, f"operating point {reason}")
        early_exit = _run_early_exit(args.run) if args.run is not None and activity else None
        if early_exit:
            add_early_exit_(report, network, activity, hw, args.mode, early_exit)
        paths = write_cost_report(report, out, network, activity, hw, derived_from=derived)
        front = None
        if front_settings is not None:
            front = _adc_front_of_run(args, network, hw, T, *front_settings)
            paths.update(write_adc_front(front, out))
        if in_run:
            commit_entries(out, "cost", {"cost": Entry({"preset": report.hardware, "mode": report.mode,
                                                        "total": report.to_dict()["total"]},
                                                       [p.name for p in paths.values()], derived)}, replace=True)
    finally:
        if lock is not None:
            lock.release()
    if not args.quiet:
        t = report.total
        lat = "n/a" if t.latency_ns is None else f"{t.latency_ns:.4g} ns"
        area = "n/a" if t.area_um2 is None else f"{t.area_um2:.4g} µm²"
        print(f"{report.hardware} [{report.mode}] T={report.timesteps}: energy {t.energy_pj:.4g} pJ, latency {lat}, "
              f"area {area}, {t.tops_per_w:.3g} TOPS/W")
        for n in report.notes[1:]:
            print(f"  - {n}")
        for key in hw.unverified:
            print(f"  - unverified {key}: {hw.sources.get(key, 'no source given').split('] ', 1)[-1]}")
        if hw.sources:
            print(f"  - every constant's source: {paths['md']} (section 'Sources of the constants')")
        if front is not None:
            print(f"  - ADC front: {front['summary']}")
        print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0
