"""The end-to-end pipeline behind ``bsnn run`` and the stage commands, driven by a :class:`Config`.

Run folder layout (``run.out_dir``)::

    config.yaml            resolved configuration
    log.txt                log of every stage
    metrics.json           per-stage metrics (history, val/test accuracy), updated after each stage
    teacher.pt, student.pt final model checkpoints (architecture + state_dict, loadable with weights_only)
    teacher_<i>.pt         further teachers of multi-teacher methods (model.teachers; ca_mkd)
    assistant_<i>.pt       teacher assistants (model.assistants; takd)
    online_teacher.pt      the teacher trained online with the student (bd_kd)
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
from bsnn.config import BinaryConfig, Config, ConvertConfig, DistillConfig, TrainConfig, from_dict, save_config
from bsnn.convert import capture, convert, convert_with_thresholds
from bsnn.convert.checks import warn_architecture
from bsnn.data import Loaders, build_loaders, calibration_loader
from bsnn.distill import METHODS
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
            ignored = {} if sections == TRAINING_SECTIONS else TEACHER_INDEPENDENT
            changed = [k for k in sections if _without(old.get(k), ignored.get(k, ())) !=
                       _without(new.get(k), ignored.get(k, ()))]
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
#: keys that do not change ``teacher.pt``: ignored when a run's teacher is reused (``bsnn distill``)
TEACHER_INDEPENDENT = {"model": ("teachers", "assistants")}


def _without(section: dict | None, keys: tuple) -> dict | None:
    return section if not isinstance(section, dict) else {k: v for k, v in section.items() if k not in keys}


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

    def arch(self, role: str, entry: str | dict | None = None) -> dict:
        """Architecture record of the ``teacher`` or the ``student``; ``entry`` (a ``model.teachers`` /
        ``model.assistants`` entry: a name or ``{name, kwargs}``) overrides the teacher's architecture (full
        precision, the teacher's activation)."""
        m = self.cfg.model
        kwargs = dict(m.kwargs)
        if entry is None:
            name = m.teacher if role == "teacher" else (m.student or m.teacher)
        elif isinstance(entry, dict):
            name, kwargs = entry["name"], {**kwargs, **dict(entry.get("kwargs") or {})}
        else:
            name = entry
        s = self.loaders.splits
        kind = m.activation if role == "student" else m.teacher_activation
        return {"name": name, "num_classes": s.num_classes, "in_channels": s.in_channels, "kwargs": kwargs,
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


def check_models(cfg: Config) -> None:
    """Refuse a distillation method the configured models cannot serve (before anything is trained).

    Raises:
        ConfigError: ``ca_mkd`` (or any multi-teacher method) without ``model.teachers``; ``takd`` without
            ``model.assistants``.
    """
    cls = METHODS.get(cfg.distill.method)
    m, method = cfg.model, cfg.distill.method
    if cls.min_teachers > 1 and 1 + len(m.teachers) < cls.min_teachers:
        raise ConfigError(f"distill.method={method} distils from at least {cls.min_teachers} teachers: model.teacher "
                          f"plus model.teachers=[...] (architectures to train, or *.pt model files), got "
                          f"{1 + len(m.teachers)}")
    if cls.uses_assistants and not m.assistants:
        raise ConfigError(f"distill.method={method} distils through teacher assistants: set model.assistants=[...] "
                          "(architectures between the teacher and the student, largest first, or *.pt files)")
    if m.teachers and cls.min_teachers < 2:
        log.warning("model.teachers is only used by multi-teacher methods (ca_mkd); %s ignores it", method)
    if m.assistants and not cls.uses_assistants:
        log.warning("model.assistants is only used by takd; %s ignores it", method)


def _train_or_load(ctx: Context, entry: str | dict, file: str, recipe: dict, seed: int, train) -> nn.Module:
    """A full-precision helper model: the model file ``entry`` (``*.pt``), else ``<run>/<file>`` when it holds the
    same ``recipe``, else ``build -> train(model, checkpoint) -> save``."""
    if isinstance(entry, str) and entry.endswith(".pt"):
        return load_model(entry, ctx.device)[0]
    final = ctx.run.path(file)
    if final.is_file():
        model, record = load_model(final, ctx.device)
        if record.get("recipe") == recipe:
            log.info("%s: found %s, skipping training", Path(file).stem, final)
            return model
    set_seed(seed)
    arch = ctx.arch("teacher", entry)
    model = build_model(arch).to(ctx.device)
    hist = train(model, ctx.run.path(f"checkpoints/{Path(file).stem}_last.pt"))
    if ctx.env.is_main:
        save_model(final, model, arch, {"recipe": recipe})
    _finish(ctx, Path(file).stem, model, hist)
    return model


def stage_teachers(ctx: Context, teacher: nn.Module) -> list[nn.Module]:
    """``[teacher, *model.teachers]``: each further teacher loaded from its file or trained like the teacher
    (``train`` settings, seed ``run.seed + 100 + i``) and saved as ``teacher_<i>.pt``."""
    out = [teacher]
    for i, entry in enumerate(ctx.cfg.model.teachers, 1):
        recipe = {"entry": entry, "train": dataclasses.asdict(ctx.cfg.train)}
        out.append(_train_or_load(
            ctx, entry, f"teacher_{i}.pt", recipe, ctx.cfg.run.seed + 100 + i,
            lambda m, ck: train_teacher(m, ctx.loaders.train, ctx.cfg.train, val_loader=ctx.loaders.val,
                                        checkpoint_path=ck, resume=ctx.run.resume, device=ctx.device,
                                        quiet=ctx.cfg.run.quiet, desc=f"teacher_{i}")))
    return out


def stage_assistants(ctx: Context, teacher: nn.Module, distill: DistillConfig) -> list[nn.Module]:
    """The TAKD chain ``[teacher, *assistants]``: assistant i learns from model i−1 by ``distill`` (TAKD's loss)
    with the ``train`` settings (full precision, seed ``run.seed + 200 + i``); saved as ``assistant_<i>.pt``."""
    chain = [teacher]
    for i, entry in enumerate(ctx.cfg.model.assistants, 1):
        recipe = {"chain": list(ctx.cfg.model.assistants[:i]), "teacher": ctx.cfg.model.teacher,
                  "distill": dataclasses.asdict(distill), "train": dataclasses.asdict(ctx.cfg.train)}
        prev = chain[-1]
        chain.append(_train_or_load(
            ctx, entry, f"assistant_{i}.pt", recipe, ctx.cfg.run.seed + 200 + i,
            lambda m, ck, prev=prev, i=i: train_student(
                m, prev, ctx.loaders.train, distill, ctx.cfg.train, val_loader=ctx.loaders.val, checkpoint_path=ck,
                resume=ctx.run.resume, device=ctx.device, quiet=ctx.cfg.run.quiet, desc=f"assistant_{i}")))
    return chain


def fit_schedules(distill: DistillConfig, epochs: int) -> DistillConfig:
    """``distill`` with its method's epoch-based schedules left at None fitted to a run of ``epochs`` epochs
    (e.g. DKD's warm-up: 20 of 240 epochs -> ``20 · epochs / 240``); see ``Distiller.schedule_defaults``."""
    cls = METHODS.get(distill.method)
    return dataclasses.replace(distill, params=cls.resolve_schedule(dict(distill.params), epochs))


def stage_student(ctx: Context, teacher: nn.Module | None) -> nn.Module:
    """Distil the binary-weight student from ``teacher``; writes ``student.pt``.

    Multi-model methods get their models here: ``ca_mkd`` the teacher plus ``model.teachers``
    (:func:`stage_teachers`), ``takd`` the chain through ``model.assistants`` (:func:`stage_assistants`), ``bd_kd``
    a freshly initialised ``model.teacher`` trained online with the student (the paper's setting; ``teacher`` is
    not used), saved as ``online_teacher.pt``.
    """
    check_models(ctx.cfg)
    final = ctx.run.path("student.pt")
    if ctx.run.resume and final.is_file():
        log.info("student: found %s, skipping training", final)
        return load_model(final, ctx.device)[0]
    cls = METHODS.get(ctx.cfg.distill.method)
    distill = fit_schedules(ctx.cfg.distill, ctx.cfg.student.epochs)
    if cls.trains_teacher:
        set_seed(ctx.cfg.run.seed)
        teacher = build_model(ctx.arch("teacher")).to(ctx.device)
        log.info("%s: training a fresh %s teacher online with the student", distill.method, ctx.cfg.model.teacher)
    elif cls.min_teachers > 1:
        teacher = stage_teachers(ctx, teacher)
    elif cls.uses_assistants:
        teacher = stage_assistants(ctx, teacher, fit_schedules(ctx.cfg.distill, ctx.cfg.train.epochs))
    set_seed(ctx.cfg.run.seed + 1)
    arch = ctx.arch("student")
    student = build_model(arch).to(ctx.device)
    if ctx.env.is_main:  # hear about max-pools and the like before training, not after
        warn_architecture(student, ctx.cfg.convert.v_init, ctx.cfg.convert.snn_calibration, where="student: ")
    hist = train_student(student, teacher, ctx.loaders.train, distill, ctx.cfg.student,
                         val_loader=ctx.loaders.val, checkpoint_path=ctx.run.path("checkpoints/student_last.pt"),
                         resume=ctx.run.resume, device=ctx.device, quiet=ctx.cfg.run.quiet)
    if ctx.env.is_main:
        save_model(final, student, arch, {"distill": dataclasses.asdict(distill)})
        if cls.trains_teacher:
            save_model(ctx.run.path("online_teacher.pt"), teacher, ctx.arch("teacher"))
    if cls.trains_teacher:
        _finish(ctx, "online_teacher", teacher, [])
    _finish(ctx, "student", student, hist)
    return student


def takd_chain(teacher: nn.Module, assistants: list[nn.Module], student: nn.Module, train_loader,
               distill: DistillConfig | None = None, cfg: TrainConfig | list[TrainConfig] | None = None,
               *, checkpoint_path: str | Path | None = None, **fit_kwargs) -> list[list[dict]]:
    """Train teacher → assistant_1 → ... → assistant_n → student (Mirzadeh 2020), each step by
    :func:`bsnn.train.train_student` with ``distill`` (default ``DistillConfig(method="takd")``: TAKD's loss from
    the previous, trained and then frozen model). The teacher must already be trained.

    Args:
        teacher: trained full-precision teacher.
        assistants: intermediate models, largest first (each trained here, then frozen as the next teacher).
        student: the final student.
        train_loader: training loader for every step.
        distill: distillation config of every step.
        cfg: one :class:`TrainConfig` for all steps or one per step (``len(assistants) + 1``).
        checkpoint_path: if given, step ``i`` checkpoints to ``<stem>_step<i><suffix>`` (resumable per step).
        **fit_kwargs: passed to :func:`bsnn.train.train_student` (``val_loader``, ``device``, ``quiet``, ...).

    Returns:
        The per-epoch history of every step, in chain order.
    """
    distill = distill or DistillConfig(method="takd")
    models = [teacher, *assistants, student]
    steps = len(models) - 1
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg or TrainConfig()] * steps
    if len(cfgs) != steps:
        raise ConfigError(f"takd_chain: {steps} steps need {steps} train configs, got {len(cfgs)}")
    histories = []
    for i in range(steps):
        kwargs = dict(fit_kwargs)
        if checkpoint_path is not None:
            p = Path(checkpoint_path)
            kwargs["checkpoint_path"] = p.with_name(f"{p.stem}_step{i + 1}{p.suffix}")
        kwargs.setdefault("desc", f"takd[{i + 1}/{steps}]")
        step = fit_schedules(distill, cfgs[i].epochs)
        histories.append(train_student(models[i + 1], models[i], train_loader, step, cfgs[i], **kwargs))
    return histories


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
    """teacher(s) -> binary student by distillation -> conversion -> accuracy-vs-T sweep -> hardware cost.

    Returns the metrics dict (also in ``metrics.json``).
    """
    check_models(cfg)
    ctx = make_context(cfg, resume=resume, overwrite=overwrite)
    online = METHODS.get(cfg.distill.method).trains_teacher  # bd_kd: the student stage trains its own teacher
    teacher = None if online else stage_teacher(ctx)
    student = stage_student(ctx, teacher)
    if ctx.env.is_main:
        snn = stage_convert(ctx, student, ctx.arch("student"))
        res = stage_simulate(ctx, snn, student)
        if cfg.cost.enabled:
            stage_cost(ctx, snn, res)
    barrier()
    return ctx.run.metrics()
