"""The end-to-end pipeline behind ``bsnn run`` and the stage commands, driven by a :class:`Config`.

Run folder layout (``run.out_dir``)::

    config.yaml            resolved configuration
    log.txt                log of every stage
    metrics.json           per-stage metrics (history, val/test accuracy), updated after each stage
    teacher.pt, student.pt final model checkpoints (architecture + state_dict, loadable with weights_only)
    checkpoints/*_last.pt  resumable training checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from bsnn.activations import replace_activations_
from bsnn.binary import binarize_
from bsnn.config import BinaryConfig, Config, ConvertConfig, from_dict, save_config
from bsnn.convert import capture, convert, convert_with_thresholds
from bsnn.convert.checks import warn_architecture
from bsnn.data import Loaders, build_loaders, calibration_loader
from bsnn.distributed import DistEnv, barrier, init_distributed
from bsnn.errors import CheckpointError, ConfigError
from bsnn.io import atomic_write_json, load_checkpoint, save_checkpoint
from bsnn.models import create_model
from bsnn.report import write_sweep
from bsnn.simulate import SimResult, simulate
from bsnn.snn.network import SpikingNetwork
from bsnn.train import evaluate, resolve_device, set_seed, train_student, train_teacher

log = logging.getLogger("bsnn")


# ----------------------------------------------------------------------------------------- model files
def build_model(arch: dict) -> nn.Module:
    """Rebuild a model from its architecture record (see :func:`save_model`)."""
    model = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                         **arch.get("kwargs", {}))
    act = arch.get("activation") or {"kind": "relu"}
    replace_activations_(model, act["kind"], clip=act.get("clip", 4.0), levels=act.get("levels", 8))
    if arch.get("binary") is not None:
        binarize_(model, from_dict(arch["binary"], BinaryConfig))
    return model


def save_model(path: str | Path, model: nn.Module, arch: dict, extra: dict | None = None) -> None:
    """Atomically write ``{'arch', 'state_dict', **extra}``; loadable with ``weights_only=True``."""
    save_checkpoint({"arch": arch, "state_dict": model.state_dict(), **(extra or {})}, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a model written by :func:`save_model` without executing code. Returns ``(model, record)``."""
    ck = load_checkpoint(path, map_location=device)
    if "arch" not in ck or "state_dict" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a bsnn model file (needs 'arch' and 'state_dict' entries)")
    model = build_model(ck["arch"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: weights do not fit architecture {ck['arch']['name']!r}: {e}") from None
    return model.to(device), ck


def save_snn(path: str | Path, snn: SpikingNetwork, arch: dict) -> None:
    """Atomically save a converted network: the source ANN's architecture, the conversion record and the SNN
    state (±1 weights, thresholds, scales). Loading rebuilds the graph from these — no code is unpickled."""
    save_checkpoint({"arch": arch, "snn_meta": snn.meta, "input_shape": snn.input_shape,
                     "state_dict": snn.state_dict()}, path)


def load_snn(path: str | Path) -> tuple[SpikingNetwork, dict]:
    """Load a network written by :func:`save_snn` (``weights_only``). Returns ``(snn, record)``."""
    ck = load_checkpoint(path)
    if "snn_meta" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a bsnn spiking-network file (write one with `bsnn convert`)")
    ann = build_model(ck["arch"]).eval()
    meta = ck["snn_meta"]
    cfg = from_dict({k: v for k, v in meta["convert"].items()}, ConvertConfig)
    gm = capture(ann, torch.zeros(1, *ck["input_shape"]))
    thresholds = {k: torch.as_tensor(v) for k, v in meta["thresholds"].items()}
    snn = convert_with_thresholds(gm, thresholds, cfg, ck["input_shape"])
    try:
        snn.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: spiking-network state does not fit its architecture: {e}") from None
    snn.meta = meta
    return snn.eval(), ck


# ----------------------------------------------------------------------------------------- run folder
class RunFolder:
    """A run folder: resolved config, log, metrics and checkpoints (rank 0 writes)."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False, env: DistEnv = DistEnv(),
                 reuse: tuple[str, ...] | None = None):
        """Open (or create) the run folder ``cfg.run.out_dir``.

        Args:
            resume: continue the run: finished stages are skipped, training resumes from checkpoints.
            overwrite: replace an existing run (its model files are deleted).
            reuse: work on an existing run's outputs (e.g. distil from its teacher, convert its student): the
                named config sections must equal the stored ones. None: the folder must be new, or
                ``resume`` / ``overwrite`` given.
        """
        self.cfg, self.env = cfg, env
        self.root = Path(cfg.run.out_dir)
        cfg_path = self.root / "config.yaml"
        if cfg_path.exists() and not (resume or overwrite or reuse is not None):
            raise ConfigError(f"run folder {str(self.root)!r} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
        if cfg_path.exists() and (resume or reuse is not None) and not overwrite:
            sections = TRAINING_SECTIONS if resume or reuse is None else reuse
            old, new = yaml.safe_load(cfg_path.read_text()), cfg.to_dict()
            changed = [k for k in sections if old.get(k) != new.get(k)]
            if changed:
                raise ConfigError(f"run folder {str(self.root)!r} was made with other {', '.join(changed)} settings "
                                  "than this config, so its models cannot be reused; use a new --out or --overwrite")
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "checkpoints").mkdir(exist_ok=True)
            save_config(cfg, cfg_path)
            if overwrite and not resume:
                for p in list(self.root.glob("*.pt")) + list((self.root / "checkpoints").glob("*.pt")):
                    p.unlink()
        barrier()
        self.resume = resume

    def path(self, name: str) -> Path:
        return self.root / name

    def metrics(self) -> dict:
        p = self.path("metrics.json")
        return json.loads(p.read_text()) if p.is_file() else {}

    def update_metrics(self, stage: str, values: dict) -> None:
        if self.env.is_main:
            m = self.metrics()
            m[stage] = values
            atomic_write_json(self.path("metrics.json"), m)


TRAINING_SECTIONS = ("data", "model", "train", "binary", "student", "distill")
TEACHER_SECTIONS = ("data", "model", "train")


def setup_logging(log_file: Path | None, quiet: bool = False) -> None:
    """Log to stderr (INFO, or WARNING when quiet) and to ``log_file`` (INFO)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler()
    sh.setLevel(logging.WARNING if quiet else logging.INFO)
    sh.setFormatter(fmt)
    log.addHandler(sh)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


# ----------------------------------------------------------------------------------------- stages
@dataclasses.dataclass
class Context:
    """Everything a stage needs: config, run folder, device, data."""

    cfg: Config
    run: RunFolder
    device: torch.device
    loaders: Loaders
    env: DistEnv

    def arch(self, role: str) -> dict:
        m = self.cfg.model
        name = m.teacher if role == "teacher" else (m.student or m.teacher)
        s = self.loaders.splits
        kind = m.teacher_activation if role == "teacher" else m.activation
        return {"name": name, "num_classes": s.num_classes, "in_channels": s.in_channels, "kwargs": dict(m.kwargs),
                "binary": dataclasses.asdict(self.cfg.binary) if role == "student" else None,
                "activation": {"kind": kind, "clip": m.act_clip, "levels": m.act_levels}}


def make_context(cfg: Config, resume: bool = False, overwrite: bool = False,
                 reuse: tuple[str, ...] | None = None) -> Context:
    """Resolve device, join torchrun's process group if any, seed, build data and the run folder."""
    device = resolve_device(cfg.run.device)
    env = init_distributed(device)
    if env.distributed and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    run = RunFolder(cfg, resume=resume, overwrite=overwrite, env=env, reuse=reuse)
    setup_logging(run.path("log.txt") if env.is_main else None, quiet=cfg.run.quiet or not env.is_main)
    set_seed(cfg.run.seed)
    loaders = build_loaders(cfg.data, seed=cfg.run.seed, distributed=env.distributed)
    s = loaders.splits
    log.info("data %s: %d train / %d val / %d test, %d classes, %dx%dx%d", s.name, len(s.train), len(s.val),
             len(s.test), s.num_classes, s.in_channels, *s.image_size)
    return Context(cfg, run, device, loaders, env)


def _finish(ctx: Context, stage: str, model: nn.Module, history: list[dict]) -> dict:
    test = evaluate(model, ctx.loaders.test, ctx.device)
    val = evaluate(model, ctx.loaders.val, ctx.device) if len(ctx.loaders.splits.val) else {"accuracy": None}
    values = {"test_acc": test["accuracy"], "test_loss": test["loss"], "val_acc": val["accuracy"],
              "params": sum(p.numel() for p in model.parameters()), "history": history}
    ctx.run.update_metrics(stage, values)
    log.info("%s: test accuracy %.2f %% (val %s)", stage, test["accuracy"],
             "n/a" if val["accuracy"] is None else f"{val['accuracy']:.2f} %")
    return values


def stage_teacher(ctx: Context) -> nn.Module:
    """Train (or, on resume, reload) the full-precision teacher; writes ``teacher.pt``."""
    final = ctx.run.path("teacher.pt")
    if ctx.run.resume and final.is_file():
        log.info("teacher: found %s, skipping training", final)
        return load_model(final, ctx.device)[0]
    set_seed(ctx.cfg.run.seed)
    arch = ctx.arch("teacher")
    model = build_model(arch).to(ctx.device)
    hist = train_teacher(model, ctx.loaders.train, ctx.cfg.train, val_loader=ctx.loaders.val,
                         checkpoint_path=ctx.run.path("checkpoints/teacher_last.pt"), resume=ctx.run.resume,
                         device=ctx.device, quiet=ctx.cfg.run.quiet)
    if ctx.env.is_main:
        save_model(final, model, arch)
    _finish(ctx, "teacher", model, hist)
    return model


def stage_student(ctx: Context, teacher: nn.Module | None) -> nn.Module:
    """Distil the binary-weight student from ``teacher``; writes ``student.pt``."""
    final = ctx.run.path("student.pt")
    if ctx.run.resume and final.is_file():
        log.info("student: found %s, skipping training", final)
        return load_model(final, ctx.device)[0]
    set_seed(ctx.cfg.run.seed + 1)
    arch = ctx.arch("student")
    student = build_model(arch).to(ctx.device)
    if ctx.env.is_main:  # hear about max-pools and the like before training, not after
        warn_architecture(student, ctx.cfg.convert.v_init, ctx.cfg.convert.snn_calibration, where="student: ")
    hist = train_student(student, teacher, ctx.loaders.train, ctx.cfg.distill, ctx.cfg.student,
                         val_loader=ctx.loaders.val, checkpoint_path=ctx.run.path("checkpoints/student_last.pt"),
                         resume=ctx.run.resume, device=ctx.device, quiet=ctx.cfg.run.quiet)
    if ctx.env.is_main:
        save_model(final, student, arch, {"distill": dataclasses.asdict(ctx.cfg.distill)})
    _finish(ctx, "student", student, hist)
    return student


def stage_convert(ctx: Context, ann: nn.Module, arch: dict) -> SpikingNetwork:
    """Convert ``ann`` (calibrated on the un-augmented training split); writes ``snn.pt``."""
    calib = calibration_loader(ctx.loaders.splits, ctx.cfg.data, ctx.cfg.convert.calib_samples)
    snn = convert(ann.eval(), calib, ctx.cfg.convert, device=ctx.device)
    if ctx.env.is_main:
        save_snn(ctx.run.path("snn.pt"), snn, arch)
    log.info("converted: %d synaptic layers (%d binary, weights ±1), %d IF layers", len(snn.layers),
             sum(l["binary"] for l in snn.layers), len(snn.neuron_names))
    return snn


def stage_simulate(ctx: Context, snn: SpikingNetwork, ann: nn.Module | None, stem: str = "sweep") -> SimResult:
    """Accuracy-vs-T sweep on the test split; writes ``sweep.{md,csv,json,png}`` and metrics['snn']."""
    res = simulate(snn, ctx.loaders.test, cfg=ctx.cfg.simulate, device=ctx.device, ann=ann,
                   quiet=ctx.cfg.run.quiet or not ctx.env.is_main, seed=ctx.cfg.run.seed)
    if ctx.env.is_main:
        write_sweep(res, ctx.run.root, stem, title=f"{ctx.loaders.splits.name}: binary SNN vs ANN")
    ctx.run.update_metrics("snn", {"accuracy": {str(k): v for k, v in res.accuracy.items()},
                                   "ann_accuracy": res.ann_accuracy, "samples": res.samples,
                                   "firing_rates": res.firing_rates(), "wall_time_s": res.wall_time_s})
    for t in res.timesteps:
        log.info("SNN T=%d: %.2f %%", t, res.accuracy[t])
    if res.predictions is not None:
        _early_exit_report(ctx, res, stem)
    constraints = ctx.cfg.simulate.constraint_config()
    if constraints is not None:
        from bsnn.hardware.constraints import apply_constraints
        from bsnn.report import write_table

        with apply_constraints(snn, constraints):
            hw = simulate(snn, ctx.loaders.test, cfg=ctx.cfg.simulate, device=ctx.device,
                          quiet=ctx.cfg.run.quiet or not ctx.env.is_main, seed=ctx.cfg.run.seed)
        rows = [[t, res.accuracy[t], hw.accuracy[t], res.accuracy[t] - hw.accuracy[t]] for t in res.timesteps]
        if ctx.env.is_main:
            write_table(ctx.run.path(f"{stem}_constrained"), ["T", "ideal SNN (%)", "with constraints (%)",
                                                              "drop (points)"], rows,
                        {"constraints": ctx.cfg.simulate.constraints, "ideal": res.to_dict(), "constrained": hw.to_dict()})
        ctx.run.update_metrics("snn_constrained", {"constraints": ctx.cfg.simulate.constraints,
                                                   "accuracy": {str(k): v for k, v in hw.accuracy.items()}})
    return res


def _early_exit_report(ctx: Context, res: SimResult, stem: str) -> None:
    """``<stem>_early_exit.{md,csv,json}``: accuracy vs *average* timesteps of the per-sample early-exit rule
    (:mod:`bsnn.early_exit`) next to the fixed T that reaches the same accuracy. There are no warm-up steps, so
    the latency of a sample is the number of timesteps it ran."""
    from bsnn.early_exit import early_exit_curve, fixed_T_needed
    from bsnn.report import write_table

    rows = []
    for r in early_exit_curve(res):
        fixed = fixed_T_needed(res, r["accuracy"])
        rows.append([r["patience"], r["margin"], r["accuracy"], r["mean_timesteps"],
                     fixed if fixed is not None else "not reached"])
    if ctx.env.is_main:
        write_table(ctx.run.path(f"{stem}_early_exit"), ["patience", "margin", "accuracy (%)", "average timesteps",
                                                         "fixed T for the same accuracy"], rows,
                    {"rule": "exit at the first step whose prediction has been stable for `patience` steps and whose "
                             "time-averaged logit margin is >= `margin` (Pareto-optimal rules of the grid)",
                     "simulated_T": max(res.timesteps)})
    ctx.run.update_metrics("early_exit", {"curve": [dict(zip(("patience", "margin", "accuracy", "mean_timesteps",
                                                              "fixed_T"), r)) for r in rows]})


def stage_cost(ctx: Context, snn: SpikingNetwork, res: SimResult) -> dict:
    """In-memory-hardware cost at ``cost.timesteps``; writes ``cost.{json,md,png}`` and metrics['cost']."""
    from bsnn.hardware.cli import run_cost

    c = ctx.cfg.cost
    report = run_cost(snn, res, ctx.run.root, hw=c.preset, timesteps=c.timesteps, mode=c.mode)
    total = report.to_dict()["total"]
    ctx.run.update_metrics("cost", {"preset": c.preset, "mode": c.mode, "total": total})
    log.info("cost (%s, %s, T=%s): %.4g pJ, %.4g ns, %.4g um2", c.preset, c.mode, report.timesteps,
             total["energy_pj"], total["latency_ns"] or float("nan"), total["area_um2"] or float("nan"))
    return total


def run_pipeline(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """teacher -> binary student by distillation -> conversion -> accuracy-vs-T sweep -> hardware cost.

    Returns the metrics dict (also in ``metrics.json``).
    """
    ctx = make_context(cfg, resume=resume, overwrite=overwrite)
    teacher = stage_teacher(ctx)
    student = stage_student(ctx, teacher)
    if ctx.env.is_main:
        snn = stage_convert(ctx, student, ctx.arch("student"))
        res = stage_simulate(ctx, snn, student)
        if cfg.cost.enabled:
            stage_cost(ctx, snn, res)
    barrier()
    return ctx.run.metrics()
