"""The end-to-end pipeline behind ``bsnn run`` and the stage commands, driven by a :class:`Config`.

Run folder layout (``run.out_dir``; its lock, records and overwrite rules: :mod:`bsnn.runfolder`; model files:
:mod:`bsnn.modelfile`)::

    config.yaml            resolved configuration (of the latest command)
    log.txt                log of every stage
    run.lock               held by the process working in the folder (removed when it ends)
    metrics.json           per-stage metrics (history, val/test accuracy), each with its record: output files'
                           SHA-256, the model's content hash and what it was derived from (committed last)
    teacher.pt, student.pt final model checkpoints (architecture + state_dict + content hash, weights_only)
    teacher_<i>.pt         further teachers of multi-teacher methods (model.teachers; ca_mkd)
    assistant_<i>.pt       teacher assistants (model.assistants; takd)
    online_teacher.pt      the teacher trained online with the student (bd_kd)
    student_tandem.pt      the student after tandem fine-tuning (tandem.enabled; then the network converted)
    snn.pt                 the converted network (±1 weights checked on load)
    sweep.*, cost.*        accuracy-vs-T sweep and hardware cost (their JSON names the network's content hash)
    checkpoints/*_last.pt  resumable training checkpoints
    checkpoints/teacher_epoch<k>.pt  teachers kept after the epochs of train.keep_epochs (selection candidates)
    teacher_selection.*    early-stopped teacher selection (student.select_epochs; bsnn distill --select-teacher)
    knowledge_levels.*     knowledge-level analysis (bsnn distill --analyze: bsnn.distill.analysis)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from bsnn.config import Config, DistillConfig, TrainConfig
from bsnn.convert import convert
from bsnn.convert.calibrate import Percentile, calibrate
from bsnn.convert.checks import warn_architecture
from bsnn.data import Loaders, build_loaders, calibration_loader
from bsnn.distill import METHODS, DistillWarning
from bsnn.distill.analysis import kept_candidates, kept_epochs, kept_file, select_teacher, write_selection
from bsnn.distributed import DistEnv, barrier, init_distributed
from bsnn.early_exit import early_exit_curve, fixed_T_needed, validated_early_exit
from bsnn.errors import ConfigError
from bsnn.hardware.constraints import apply_constraints
from bsnn.hardware.report import COST_FILES, run_cost
from bsnn.io import digest, file_sha256, model_digest, write_failure
from bsnn.modelfile import (build_model, check_binary, load_model, load_snn, load_state_dict_file, save_model,
                            save_snn)
from bsnn.report import plot_sweep, sweep_rows, write_table
from bsnn.runfolder import (STAGES, TEACHER_INDEPENDENT, TEACHER_SECTIONS, TRAINING_SECTIONS, Entry, RunFolder,
                            config_digest, merge_fields)
from bsnn.simulate import SimResult, simulate
from bsnn.snn.network import SpikingNetwork
from bsnn.tandem import check_tandem_ready, tandem_finetune
from bsnn.train import evaluate, fidelity, resolve_device, set_seed, train_student, train_teacher
from bsnn.zoo import PREFIX as ZOO_PREFIX
from bsnn.zoo import card as zoo_card
from bsnn.zoo import is_zoo, load_any

__all__ = ["STAGES", "TEACHER_INDEPENDENT", "TEACHER_SECTIONS", "TRAINING_SECTIONS", "Context", "RunFolder",
           "build_model", "check_binary", "check_models", "fit_schedules", "load_model", "load_snn", "make_context", "run_pipeline",
           "save_model", "save_snn", "stage_convert", "stage_cost", "stage_simulate", "stage_student",
           "stage_teacher", "takd_chain"]

log = logging.getLogger("bsnn")

#: config the stages' outputs depend on (hashed into each record's ``derived_from``)
TEACHER_CONFIG = ("data", "model", "train", "run.seed")
STUDENT_CONFIG = (*TRAINING_SECTIONS, "run.seed")
TANDEM_CONFIG = ("data", "tandem", "run.seed")
CONVERT_CONFIG = ("data", "convert")
SIMULATE_CONFIG = ("data", "simulate", "run.seed")


# ----------------------------------------------------------------------------------------- logging
def setup_logging(log_file: Path | None, quiet: bool = False) -> None:
    """Log to stderr (INFO, or WARNING when quiet) and to ``log_file`` (INFO)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler()
    sh.setLevel(logging.WARNING if quiet else logging.INFO)
    sh.setFormatter(fmt)
    log.addHandler(sh)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
        except OSError as e:
            raise write_failure(log_file, e) from None
        fh.setFormatter(fmt)
        log.addHandler(fh)


# ----------------------------------------------------------------------------------------- stages
@dataclasses.dataclass
class Context:
    """Everything a stage needs: config, run folder, device, data. ``with ctx:`` (or :meth:`close`) releases
    the run folder's lock at the end."""

    cfg: Config
    run: RunFolder
    device: torch.device
    loaders: Loaders
    env: DistEnv
    student_arch: dict | None = None  # set by the student stage: the architecture the student was built with

    def val_loader(self):
        """The validation loader, or None when the split is empty (``data.val_fraction=0``)."""
        return self.loaders.val if len(self.loaders.splits.val) else None

    def arch(self, role: str, entry: str | dict | None = None) -> dict:
        """Architecture record of the ``teacher`` or the ``student``; ``entry`` (a ``model.teachers`` /
        ``model.assistants`` entry: a name or ``{name, kwargs}``) overrides the teacher's architecture (full
        precision, the teacher's activation). Once the student stage has run, the student's record is the
        architecture it was built with (a method may shape it from the teacher: ``prune_distill``)."""
        if role == "student" and entry is None and self.student_arch is not None:
            return self.student_arch
        m = self.cfg.model
        kwargs = dict(m.kwargs)
        if entry is None:
            name = m.teacher if role == "teacher" else (m.student or m.teacher)
            if is_zoo(name):  # a released teacher's architecture
                released = zoo_card(name[len(ZOO_PREFIX):])["arch"]
                name, kwargs = released["name"], {**dict(released.get("kwargs") or {}), **kwargs}
        elif isinstance(entry, dict):
            name, kwargs = entry["name"], {**kwargs, **dict(entry.get("kwargs") or {})}
        else:
            name = entry
        s = self.loaders.splits
        kind = m.activation if role == "student" else m.teacher_activation
        return {"name": name, "num_classes": s.num_classes, "in_channels": s.in_channels, "kwargs": kwargs,
                "binary": dataclasses.asdict(self.cfg.binary) if role == "student" else None,
                "activation": {"kind": kind, "clip": m.act_clip, "levels": m.act_levels}}

    def close(self, failed: bool = False) -> None:
        """Release the run folder (its lock); ``failed``: see :meth:`RunFolder.close`."""
        _close_log(self.run.path("log.txt"))
        self.run.close(failed=failed)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def _close_log(log_file: Path) -> None:
    """Stop logging into ``log_file`` (the run is over; messages still reach stderr)."""
    target = os.path.abspath(log_file)
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler) and h.baseFilename == target:
            log.removeHandler(h)
            h.close()


def make_context(cfg: Config, resume: bool = False, overwrite: bool = False,
                 reuse: tuple[str, ...] | None = None, stage: str = "teacher") -> Context:
    """Resolve device, join torchrun's process group if any, open and lock the run folder (see
    :class:`RunFolder`; ``stage``: the first stage the caller computes, the scope of ``overwrite``), seed, build
    the data."""
    device = resolve_device(cfg.run.device)
    env = init_distributed(device)
    if env.distributed and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    run = RunFolder(cfg, resume=resume, overwrite=overwrite, env=env, reuse=reuse, stage=stage)
    try:
        setup_logging(run.path("log.txt") if env.is_main else None, quiet=cfg.run.quiet or not env.is_main)
        for note in run.notes:
            log.log(logging.WARNING if note.startswith("took over") else logging.INFO, "%s", note)
        set_seed(cfg.run.seed)
        loaders = build_loaders(cfg.data, seed=cfg.run.seed, distributed=env.distributed)
    except BaseException:
        _close_log(run.path("log.txt"))
        run.close(failed=True)
        raise
    s = loaders.splits
    log.info("data %s: %d train / %d val / %d test, %d classes, %dx%dx%d", s.name, len(s.train), len(s.val),
             len(s.test), s.num_classes, s.in_channels, *s.image_size)
    return Context(cfg, run, device, loaders, env)


def _digests(models) -> str | list | None:
    """Content hash of a model, of each model of a list, or None."""
    if models is None:
        return None
    if isinstance(models, (list, tuple)):
        return [_digests(m) for m in models]
    return model_digest(models)


def _finish(ctx: Context, stage: str, key: str, model: nn.Module, history: list[dict], files: list[str],
            derived_from: dict, extra: dict | None = None) -> dict:
    """Evaluate ``model`` and commit its record (``files`` are written already): the stage's last step."""
    test = evaluate(model, ctx.loaders.test, ctx.device)
    val = evaluate(model, ctx.loaders.val, ctx.device) if len(ctx.loaders.splits.val) else {"accuracy": None}
    values = {"test_acc": test["accuracy"], "test_loss": test["loss"], "val_acc": val["accuracy"],
              "params": sum(p.numel() for p in model.parameters()), "history": history, **(extra or {})}
    ctx.run.commit(stage, {key: Entry(values, files, derived_from, model_digest(model))})
    log.info("%s: test accuracy %.2f %% (val %s)", key, test["accuracy"],
             "n/a" if val["accuracy"] is None else f"{val['accuracy']:.2f} %")
    return values


def _config_digests(ctx: Context, keys: Sequence[str], ignore: dict | None = None) -> tuple[str, str]:
    """The config digest of ``keys`` a stage records, and the one a bsnn that lacked the run folder's
    :attr:`~bsnn.runfolder.RunFolder.legacy_fields` recorded (equal when there are none)."""
    return (config_digest(ctx.cfg, keys, ignore),
            config_digest(ctx.cfg, keys, merge_fields(ignore or {}, ctx.run.legacy_fields)))


def _same_settings(ctx: Context, key: str, entry: dict, derived_from: dict, legacy_config: str | None = None) -> None:
    """On resume: refuse a finished ``key`` whose record names other settings or other source models
    (``legacy_config``: the config digest as a bsnn without the fields added since would have recorded it)."""
    old = (entry.get("record") or {}).get("derived_from")
    if old is None:  # recorded before derived_from existed
        return
    diff = [k for k, v in derived_from.items() if old.get(k) != v
            and not (k == "config" and legacy_config is not None and old.get(k) == legacy_config)]
    if diff:
        what = " and ".join("settings" if k == "config" else f"{k} weights" for k in diff)
        raise ConfigError(f"{key} in {str(ctx.run.root)!r} was made from other {what} than this run uses, so it "
                          "cannot be resumed; use --overwrite to redo it, or a new --out")


def _resumed(ctx: Context, stage: str, final: Path, derived: dict, legacy_config: str | None = None
             ) -> nn.Module | None:
    """On ``--resume``, the finished model of ``stage`` (its file *and* record present, same settings), else None;
    a model file without its record is logged as unfinished and trained again from its checkpoint."""
    if not ctx.run.resume:
        return None
    done = ctx.run.finished(stage, (final.name,))
    if done is not None:
        _same_settings(ctx, stage, done, derived, legacy_config)
        log.info("%s: found %s, skipping training", stage, final)
        return load_model(final, ctx.device)[0]
    if final.is_file():
        log.info("%s: %s has no record (the run stopped before the stage finished): finishing it", stage, final)
    return None


def stage_teacher(ctx: Context) -> nn.Module:
    """Train (or, on resume, reload) the full-precision teacher; writes ``teacher.pt``, then its record.

    On resume a ``teacher.pt`` without its record (the run was killed before the record was written) is not
    trusted: training resumes from ``checkpoints/teacher_last.pt`` and the stage finishes."""
    final = ctx.run.path("teacher.pt")
    digest_now, digest_then = _config_digests(ctx, TEACHER_CONFIG, TEACHER_INDEPENDENT)
    derived = {"config": digest_now}
    resumed = _resumed(ctx, "teacher", final, derived, digest_then)
    if resumed is not None:
        return resumed
    if is_zoo(ctx.cfg.model.teacher):  # a released teacher: copied into the run folder, not trained
        model, record = load_any(ctx.cfg.model.teacher, ctx.device)
        if ctx.env.is_main:
            save_model(final, model, record["arch"], {"derived_from": derived, "zoo": ctx.cfg.model.teacher})
        _finish(ctx, "teacher", "teacher", model, [], ["teacher.pt"], derived)
        return model
    set_seed(ctx.cfg.run.seed)
    arch = ctx.arch("teacher")
    model = build_model(arch).to(ctx.device)
    kept = kept_epochs(ctx.cfg.train)
    if kept and ctx.cfg.train.ema_decay > 0:
        log.warning("train.keep_epochs with train.ema_decay: the kept checkpoints hold the raw weights, teacher.pt "
                    "the averaged ones")

    def keep(epoch: int, _metrics: dict) -> None:  # candidates for teacher selection (student.select_epochs)
        if epoch in kept and ctx.env.is_main:
            save_model(ctx.run.path(kept_file(epoch)), model, arch, {"derived_from": derived, "epoch": epoch})

    hist = train_teacher(model, ctx.loaders.train, ctx.cfg.train, val_loader=ctx.val_loader(),
                         checkpoint_path=ctx.run.path("checkpoints/teacher_last.pt"), resume=ctx.run.resume,
                         device=ctx.device, quiet=ctx.cfg.run.quiet, on_epoch_end=keep if kept else None)
    if ctx.env.is_main:
        save_model(final, model, arch, {"derived_from": derived})
    files = ["teacher.pt", *(f for f in map(kept_file, kept) if ctx.run.path(f).is_file())]
    _finish(ctx, "teacher", "teacher", model, hist, files, derived)
    return model


def check_models(cfg: Config) -> None:
    """Refuse a distillation method the configured models cannot serve (before anything is trained).

    Raises:
        ConfigError: ``tandem.enabled`` with a ReLU student (no trained thresholds);
            ``ca_mkd`` (or any multi-teacher method) without ``model.teachers``; ``takd`` without
            ``model.assistants``; ``born_again`` (a ``same_architecture`` method) with a ``model.student`` other than
            ``model.teacher``.
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
    strict = cfg.distill.params.get("strict", True)
    if cls.same_architecture and strict and m.student is not None and m.student != m.teacher and not is_zoo(m.teacher):
        raise ConfigError(f"distill.method={method} distils from a teacher of the student's own architecture, but "
                          f"model.student={m.student} differs from model.teacher={m.teacher}: leave model.student "
                          f"unset (it defaults to the teacher's) or set it to {m.teacher}")
    if cfg.tandem.enabled and m.activation == "relu":
        raise ConfigError("tandem.enabled fine-tunes the student through its SNN with its trained thresholds, but "
                          "model.activation=relu has none: set model.activation=qcfs (or clip), e.g. fine-tuning a "
                          "trained ReLU student with model.student_init=..., or leave tandem.enabled=false")
    if m.teachers and cls.min_teachers < 2:
        log.warning("model.teachers is only used by multi-teacher methods (ca_mkd); %s ignores it", method)
    if m.assistants and not cls.uses_assistants:
        log.warning("model.assistants is only used by takd; %s ignores it", method)


def _train_or_load(ctx: Context, entry: str | dict, file: str, recipe: dict, seed: int, train) -> nn.Module:
    """A full-precision helper model: the model file ``entry`` (``*.pt``), else ``<run>/<file>`` when it holds the
    same ``recipe``, else ``build -> train(model, checkpoint) -> save``."""
    if isinstance(entry, str) and entry.endswith(".pt"):
        return load_model(entry, ctx.device)[0]
    final, key = ctx.run.path(file), Path(file).stem
    derived = {"recipe": digest(recipe)}
    if ctx.run.finished(key, (file,)) is not None:
        model, record = load_model(final, ctx.device)
        if record.get("recipe") == recipe:
            log.info("%s: found %s, skipping training", key, final)
            return model
    set_seed(seed)
    arch = ctx.arch("teacher", entry)
    model = build_model(arch).to(ctx.device)
    hist = train(model, ctx.run.path(f"checkpoints/{key}_last.pt"))
    if ctx.env.is_main:
        save_model(final, model, arch, {"recipe": recipe, "derived_from": derived})
    _finish(ctx, "student", key, model, hist, [file], derived)
    return model


def stage_teachers(ctx: Context, teacher: nn.Module) -> list[nn.Module]:
    """``[teacher, *model.teachers]``: each further teacher loaded from its file or trained like the teacher
    (``train`` settings, seed ``run.seed + 100 + i``) and saved as ``teacher_<i>.pt``."""
    out = [teacher]
    for i, entry in enumerate(ctx.cfg.model.teachers, 1):
        recipe = {"entry": entry, "train": dataclasses.asdict(ctx.cfg.train)}
        out.append(_train_or_load(
            ctx, entry, f"teacher_{i}.pt", recipe, ctx.cfg.run.seed + 100 + i,
            lambda m, ck: train_teacher(m, ctx.loaders.train, ctx.cfg.train, val_loader=ctx.val_loader(),
                                        checkpoint_path=ck, resume=ctx.run.resume, device=ctx.device,
                                        quiet=ctx.cfg.run.quiet, desc=f"teacher_{i}")))
    return out


def stage_assistants(ctx: Context, teacher: nn.Module, distill: DistillConfig) -> list[nn.Module]:
    """The TAKD chain ``[teacher, *assistants]``: assistant i learns from model i−1 by ``distill`` (TAKD's loss)
    with the ``train`` settings (full precision, seed ``run.seed + 200 + i``); saved as ``assistant_<i>.pt``."""
    chain = [teacher]
    for i, entry in enumerate(ctx.cfg.model.assistants, 1):
        prev = chain[-1]
        recipe = {"chain": list(ctx.cfg.model.assistants[:i]), "teacher": ctx.cfg.model.teacher,
                  "distill": dataclasses.asdict(distill), "train": dataclasses.asdict(ctx.cfg.train),
                  "from": model_digest(prev)}  # distilled from these weights: a retrained teacher retrains it
        chain.append(_train_or_load(
            ctx, entry, f"assistant_{i}.pt", recipe, ctx.cfg.run.seed + 200 + i,
            lambda m, ck, prev=prev, i=i: train_student(
                m, prev, ctx.loaders.train, distill, ctx.cfg.train, val_loader=ctx.val_loader(), checkpoint_path=ck,
                resume=ctx.run.resume, device=ctx.device, quiet=ctx.cfg.run.quiet, desc=f"assistant_{i}")))
    return chain


def fit_schedules(distill: DistillConfig, epochs: int) -> DistillConfig:
    """``distill`` with its method's epoch-based schedules left at None fitted to a run of ``epochs`` epochs
    (e.g. DKD's warm-up: 20 of 240 epochs -> ``20 · epochs / 240``); see ``Distiller.schedule_defaults``."""
    cls = METHODS.get(distill.method)
    return dataclasses.replace(distill, params=cls.resolve_schedule(dict(distill.params), epochs))


def later_generations(ctx: Context, student: nn.Module, hist: list[dict], teacher: nn.Module, arch: dict,
                      distill: DistillConfig, derived: dict) -> tuple[nn.Module, list[dict], nn.Module]:
    """Born-again generations (Furlanello 2018), ``distill.params.generations`` = G: ``student`` (generation 1,
    trained from ``teacher``) is saved as ``student_gen1.pt`` with its record, then generation g = 2..G, a fresh
    student (seed ``run.seed + g``), is distilled by ``distill`` from generation g - 1, and so on; generation G is
    returned for ``student.pt``. Returns ``(last generation, its history, its teacher)``: the arguments when G = 1."""
    n = int(distill.params.get("generations") or 1)
    for g in range(2, n + 1):
        file = f"student_gen{g - 1}.pt"
        if ctx.env.is_main:
            save_model(ctx.run.path(file), student, arch, {"distill": dataclasses.asdict(distill),
                                                           "derived_from": derived, "generation": g - 1})
        _finish(ctx, "student", f"student_gen{g - 1}", student, hist, [file], derived)
        set_seed(ctx.cfg.run.seed + g)
        teacher, student = student, build_model(arch).to(ctx.device)
        hist = train_student(student, teacher, ctx.loaders.train, distill, ctx.cfg.student,
                             val_loader=ctx.val_loader(), resume=ctx.run.resume, device=ctx.device,
                             checkpoint_path=ctx.run.path(f"checkpoints/student_gen{g}_last.pt"),
                             quiet=ctx.cfg.run.quiet, desc=f"student[{distill.method} generation {g}/{n}]")
    return student, hist, teacher


#: Percentile of a trained ReLU student's activations that a QCFS / clip λ it lacks starts at (``model.student_init``).
STUDENT_INIT_CLIP_PERCENTILE = 99.9


def start_student_from(ctx: Context, student: nn.Module, arch: dict) -> dict:
    """Load ``model.student_init`` into ``student`` (built from ``arch``); λ of activations the source lacks start
    at the :data:`STUDENT_INIT_CLIP_PERCENTILE`-th percentile of the source's activation there on the calibration
    images. Returns ``{"source", "clips": {layer: λ}}``.

    Raises:
        ConfigError: another architecture, binarisation or width than the student's, or weights that do not fit.
    """
    ref = ctx.cfg.model.student_init
    source, record = load_any(ref, ctx.device)
    src = record["arch"]
    for key in ("name", "kwargs", "binary"):
        if (src.get(key) or None) != (arch.get(key) or None):
            raise ConfigError(f"model.student_init={ref!r}: its {key} {src.get(key)!r} differs from the student's "
                              f"{arch.get(key)!r}; start from a model of the student's architecture (or drop "
                              "model.student_init)")
    missing, unexpected = student.load_state_dict(source.state_dict(), strict=False)
    clips = {k.rpartition(".")[0] for k in missing if k.endswith(".clip")}
    others = [k for k in missing if k.rpartition(".")[0] not in clips] + list(unexpected)
    if others:
        raise ConfigError(f"model.student_init={ref!r}: its weights do not fit the student ({others[:4]}); start from "
                          "a model of the student's architecture")
    set_to = {}
    if clips:  # e.g. a ReLU network into a QCFS student: λ from the source's activations at those places
        modules = {n: source.get_submodule(n) for n in clips}
        stat = Percentile(STUDENT_INIT_CLIP_PERCENTILE)
        values = calibrate(source, modules, calibration_loader(ctx.loaders.splits, ctx.cfg.data,
                                                               ctx.cfg.convert.calib_samples), stat,
                           device=ctx.device)
        with torch.no_grad():
            for n, v in values.items():
                student.get_submodule(n).clip.fill_(max(float(v), 1e-3))
                set_to[n] = float(student.get_submodule(n).clip.detach())
        log.info("student: started from %s; %d activation clips set at the p%g of its activations", ref, len(set_to),
                 STUDENT_INIT_CLIP_PERCENTILE)
    else:
        log.info("student: started from %s", ref)
    return {"source": ref, "clips": set_to}


def stage_student(ctx: Context, teacher: nn.Module | None,
                  candidates: list[tuple[str, nn.Module]] | None = None) -> nn.Module:
    """Distil the binary-weight student from ``teacher``; writes ``student.pt``, then its record.

    Multi-model methods get their models here: ``ca_mkd`` the teacher plus ``model.teachers``
    (:func:`stage_teachers`), ``takd`` the chain through ``model.assistants`` (:func:`stage_assistants`), ``bd_kd``
    a freshly initialised ``model.teacher`` trained online with the student (the paper's setting; ``teacher`` is
    not used), saved as ``online_teacher.pt``; ``born_again`` trains ``distill.params.generations`` generations
    (:func:`later_generations`). With ``candidates`` (``(name, teacher)`` pairs) or ``student.select_epochs > 0``
    (the teacher checkpoints kept at ``train.keep_epochs`` and ``teacher``:
    :func:`bsnn.distill.analysis.kept_candidates`) the teacher is first chosen among them
    (:func:`bsnn.distill.analysis.select_teacher`: ``student.select_epochs``-epoch students from the student's own
    initialisation, the best on validation wins), recorded as the student's ``teacher_selection`` and in
    ``teacher_selection.{md,csv,json}``. On resume, a finished student is reused
    only if it was distilled from ``teacher``'s weights (and the same candidates) with these settings.
    """
    check_models(ctx.cfg)
    final = ctx.run.path("student.pt")
    cls = METHODS.get(ctx.cfg.distill.method)
    digest_now, digest_then = _config_digests(ctx, STUDENT_CONFIG)
    derived = {"config": digest_now, "teacher": None if cls.trains_teacher else _digests(teacher)}
    if ctx.cfg.model.student_init is not None:  # the weights it starts from, not just their name
        derived["student_init"] = model_digest(load_any(ctx.cfg.model.student_init, "cpu")[0])
    candidates = list(candidates or []) or kept_candidates(ctx.run.root, ctx.cfg.train, ctx.cfg.student.select_epochs,
                                                           teacher, ctx.device)
    if candidates:
        derived["candidates"] = [model_digest(m) for _, m in candidates]
    resumed = _resumed(ctx, "student", final, derived, digest_then)
    if resumed is not None:
        ctx.student_arch = load_model(final, "cpu")[1]["arch"]
        return resumed
    distill = fit_schedules(ctx.cfg.distill, ctx.cfg.student.epochs)
    selection, selection_files = None, []
    if candidates:
        arch = ctx.arch("student")
        selection = select_teacher(candidates, lambda: build_model(arch), ctx.loaders.train, ctx.val_loader(),
                                   ctx.cfg.distill, ctx.cfg.student, ctx.cfg.student.select_epochs, device=ctx.device,
                                   seed=ctx.cfg.run.seed + 1, quiet=ctx.cfg.run.quiet)
        teacher = candidates[selection["chosen"]][1]
        selection_files = write_selection(ctx.run.root, selection) if ctx.env.is_main else []
    if cls.trains_teacher:
        set_seed(ctx.cfg.run.seed)
        teacher = build_model(ctx.arch("teacher")).to(ctx.device)
        log.info("%s: training a fresh %s teacher online with the student", distill.method, ctx.cfg.model.teacher)
    elif cls.min_teachers > 1:
        teacher = stage_teachers(ctx, teacher)
        derived["teachers"] = _digests(teacher[1:])
    elif cls.uses_assistants:
        teacher = stage_assistants(ctx, teacher, fit_schedules(ctx.cfg.distill, ctx.cfg.train.epochs))
        derived["assistants"] = _digests(teacher[1:])
    if teacher is not None and not cls.trains_teacher and ctx.cfg.train.label_smoothing > 0 and \
            not is_zoo(ctx.cfg.model.teacher) and ctx.env.is_main:
        warnings.warn(f"the teacher was trained with label smoothing {ctx.cfg.train.label_smoothing:g}: smoothed "
                      "teachers distil worse (Müller et al., 'When does label smoothing help?', 2019: it erases the "
                      "class relations KD transfers); train the teacher with train.label_smoothing=0 to distil from it",
                      DistillWarning, stacklevel=2)
    set_seed(ctx.cfg.run.seed + 1)
    arch = ctx.arch("student")
    shaped = cls.student_kwargs(teacher, distill) if teacher is not None else {}
    if shaped:  # prune_distill's student from the pruned teacher (fixed by the teacher's weights and the config)
        arch = {**arch, "kwargs": {**arch["kwargs"], **shaped}}
        log.info("%s: student %s built with %s from the teacher", distill.method, arch["name"], shaped)
    ctx.student_arch = arch
    student = build_model(arch).to(ctx.device)
    if ctx.cfg.model.student_init is not None:
        start_student_from(ctx, student, arch)
    if ctx.env.is_main:  # hear about max-pools and the like before training, not after
        warn_architecture(student, ctx.cfg.convert.v_init, ctx.cfg.convert.snn_calibration, where="student: ")
    hist = train_student(student, teacher, ctx.loaders.train, distill, ctx.cfg.student,
                         data_init=ctx.cfg.model.student_init is None,
                         val_loader=ctx.val_loader(), checkpoint_path=ctx.run.path("checkpoints/student_last.pt"),
                         resume=ctx.run.resume, device=ctx.device, quiet=ctx.cfg.run.quiet)
    if "generations" in cls.param_defaults:  # born_again: generation g learns from generation g - 1
        student, hist, teacher = later_generations(ctx, student, hist, teacher, arch, distill, derived)
    if ctx.env.is_main:
        if cls.trains_teacher:
            save_model(ctx.run.path("online_teacher.pt"), teacher, ctx.arch("teacher"), {"derived_from": derived})
        save_model(final, student, arch, {"distill": dataclasses.asdict(distill), "derived_from": derived})
    if cls.trains_teacher:
        _finish(ctx, "student", "online_teacher", teacher, [], ["online_teacher.pt"], derived)
    main_teacher = teacher[0] if isinstance(teacher, (list, tuple)) else teacher
    extra = {} if selection is None else {"teacher_selection": selection}
    if main_teacher is not None:  # fidelity to the teacher on the test set, next to accuracy
        f = fidelity(student, main_teacher, ctx.loaders.test, ctx.device)
        extra.update(teacher_agreement=f["agreement"], teacher_kl=f["kl"])
        log.info("student: %.2f %% top-1 agreement with the teacher, KL(teacher || student) %.4f nats", f["agreement"],
                 f["kl"])
    _finish(ctx, "student", "student", student, hist, ["student.pt", *selection_files], derived, extra)
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


def converted_student(cfg: Config) -> tuple[str, str, str]:
    """The run-folder model a run converts and simulates against: ``(stage, file, command that makes it)`` —
    ``student_tandem.pt`` when ``tandem.enabled``, else ``student.pt``."""
    return ("tandem", "student_tandem.pt", "run") if cfg.tandem.enabled else ("student", "student.pt", "distill")


def stage_tandem(ctx: Context, student: nn.Module, teacher: nn.Module | list | None) -> nn.Module:
    """Tandem fine-tuning of the distilled student (``tandem.enabled``, :mod:`bsnn.tandem`): trained through its
    converted SNN at ``tandem.timesteps`` with KD from the (first) teacher, or cross-entropy when there is none;
    writes ``student_tandem.pt`` (what the run then converts), then the record ``tandem``. On resume it is reused
    only if it was made from this student and teacher with these settings."""
    check_tandem_ready(student)
    main_teacher = teacher[0] if isinstance(teacher, (list, tuple)) else teacher
    final = ctx.run.path("student_tandem.pt")
    digest_now, digest_then = _config_digests(ctx, TANDEM_CONFIG)
    derived = {"config": digest_now, "student": model_digest(student), "teacher": _digests(main_teacher)}
    resumed = _resumed(ctx, "tandem", final, derived, digest_then)
    if resumed is not None:
        return resumed
    set_seed(ctx.cfg.run.seed + 2)
    hist = tandem_finetune(student, ctx.loaders.train, ctx.cfg.tandem, teacher=main_teacher,
                           val_loader=ctx.val_loader(), device=ctx.device, quiet=ctx.cfg.run.quiet,
                           checkpoint_path=ctx.run.path("checkpoints/tandem_last.pt"), resume=ctx.run.resume)
    if ctx.env.is_main:
        save_model(final, student, ctx.arch("student"),
                   {"tandem": dataclasses.asdict(ctx.cfg.tandem), "derived_from": derived})
    _finish(ctx, "tandem", "tandem", student, hist, ["student_tandem.pt"], derived)
    return student


def imported_model(ctx: Context, name: str, weights: Path, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """A user's trained ANN: architecture ``name`` (a bsnn model or ``torchvision:<name>``) with the state dict in
    ``weights`` (loaded without running code), for the run's data (its input channels; ``num_classes`` defaults
    to the data's). Returns ``(model, architecture record)``."""
    s = ctx.loaders.splits
    arch = {"name": name, "num_classes": int(num_classes or s.num_classes), "in_channels": s.in_channels,
            "kwargs": {}, "binary": None, "activation": {"kind": "relu"}}
    if arch["num_classes"] != s.num_classes:
        raise ConfigError(f"--num-classes {arch['num_classes']} but data.name={ctx.cfg.data.name!r} has "
                          f"{s.num_classes} classes; convert with the data the weights were trained on")
    model = load_state_dict_file(weights, build_model(arch))
    return model.to(ctx.device).eval(), arch


def stage_convert(ctx: Context, ann: nn.Module, arch: dict, keep_ann: bool = False) -> SpikingNetwork:
    """Convert ``ann`` (calibrated on the un-augmented training split); writes ``snn.pt`` (and, with ``keep_ann``,
    the ANN itself as the bsnn model file ``ann.pt``: the reference of ``bsnn simulate``), then its record."""
    derived = {"config": config_digest(ctx.cfg, CONVERT_CONFIG), "student": model_digest(ann)}
    calib = calibration_loader(ctx.loaders.splits, ctx.cfg.data, ctx.cfg.convert.calib_samples)
    snn = convert(ann.eval(), calib, ctx.cfg.convert, device=ctx.device)
    values = {"layers": len(snn.layers), "binary_layers": sum(bool(l["binary"]) for l in snn.layers),
              "if_layers": len(snn.neuron_names)}
    files = ["snn.pt", "ann.pt"] if keep_ann else ["snn.pt"]
    if ctx.env.is_main:
        save_snn(ctx.run.path("snn.pt"), snn, arch, {"derived_from": derived})
        if keep_ann:
            save_model(ctx.run.path("ann.pt"), ann, arch, {"derived_from": derived})
    ctx.run.commit("convert", {"convert": Entry(values, files, derived, model_digest(snn))}, replace=True)
    log.info("converted: %d synaptic layers (%d binary, weights ±1), %d IF layers", values["layers"],
             values["binary_layers"], values["if_layers"])
    return snn


def write_sweep_files(res: SimResult, root: Path, derived_from: dict, title: str, stem: str = "sweep") -> list[str]:
    """``<stem>.{md,csv,json,png}`` of ``res`` in ``root``; the JSON also names what the sweep was derived from.
    Returns the file names."""
    headers, rows = sweep_rows(res)
    paths = write_table(root / stem, headers, rows, {**res.to_dict(), "derived_from": derived_from})
    paths["png"] = plot_sweep(res, root / f"{stem}.png", title)
    return [p.name for p in paths.values()]


def stage_simulate(ctx: Context, snn: SpikingNetwork, ann: nn.Module | None, stem: str = "sweep") -> SimResult:
    """Accuracy-vs-T sweep on the test split (and, with a validation split, on it too: ``res.validation``, what the
    operating point and the early-exit rule are chosen on); writes ``sweep.{md,csv,json,png}`` (and, when asked, the early-exit
    and constrained tables), then the records ``snn`` (+ ``early_exit``, ``snn_constrained``). Earlier tables of
    this stage that this run does not make are removed."""
    derived = {"config": config_digest(ctx.cfg, SIMULATE_CONFIG), "snn": model_digest(snn),
               "ann": None if ann is None else model_digest(ann)}
    main = ctx.env.is_main
    res = simulate(snn, ctx.loaders.test, cfg=ctx.cfg.simulate, device=ctx.device, ann=ann,
                   quiet=ctx.cfg.run.quiet or not main, seed=ctx.cfg.run.seed)
    val = None
    if ctx.val_loader() is not None:  # the split choices are made on (operating point, early-exit rule)
        val = simulate(snn, ctx.val_loader(), cfg=ctx.cfg.simulate, device=ctx.device, ann=ann,
                       quiet=ctx.cfg.run.quiet or not main, seed=ctx.cfg.run.seed)
        res.validation = {"accuracy": val.accuracy, "ann_accuracy": val.ann_accuracy, "samples": val.samples}
    files = write_sweep_files(res, ctx.run.root, derived, f"{ctx.loaders.splits.name}: binary SNN vs ANN",
                              stem) if main else []
    entries = {"snn": Entry({"accuracy": {str(k): v for k, v in res.accuracy.items()},
                             "ann_accuracy": res.ann_accuracy, "samples": res.samples,
                             "val_accuracy": None if val is None else {str(k): v for k, v in val.accuracy.items()},
                             "firing_rates": res.firing_rates(), "wall_time_s": res.wall_time_s}, files, derived)}
    for t in res.timesteps:
        log.info("SNN T=%d: %.2f %%", t, res.accuracy[t])
    if res.predictions is not None:
        entries["early_exit"] = _early_exit_report(ctx, res, val, stem, derived)
    constraints = ctx.cfg.simulate.constraint_config()
    if constraints is not None:
        with apply_constraints(snn, constraints):
            hw = simulate(snn, ctx.loaders.test, cfg=ctx.cfg.simulate, device=ctx.device,
                          quiet=ctx.cfg.run.quiet or not main, seed=ctx.cfg.run.seed)
        rows = [[t, res.accuracy[t], hw.accuracy[t], res.accuracy[t] - hw.accuracy[t]] for t in res.timesteps]
        files = []
        if main:
            paths = write_table(ctx.run.path(f"{stem}_constrained"), ["T", "ideal SNN (%)", "with constraints (%)",
                                                                      "drop (points)"], rows,
                                {"constraints": ctx.cfg.simulate.constraints, "ideal": res.to_dict(),
                                 "constrained": hw.to_dict(), "derived_from": derived})
            files = [p.name for p in paths.values()]
        entries["snn_constrained"] = Entry({"constraints": ctx.cfg.simulate.constraints,
                                            "accuracy": {str(k): v for k, v in hw.accuracy.items()}}, files, derived)
    ctx.run.commit("simulate", entries, replace=True)
    return res


def _early_exit_report(ctx: Context, res: SimResult, val: SimResult | None, stem: str, derived: dict) -> Entry:
    """``<stem>_early_exit.{md,csv,json}``: accuracy vs *average* timesteps of the per-sample early-exit rules
    (:mod:`bsnn.early_exit`), next to the fixed T that reaches the same test accuracy. The rules are chosen on the
    validation sweep (validation labels only) and reported on the test split; the chosen rule
    is the cheapest within 1 point of the ANN on validation. Without a validation split the front is computed on
    the test split and the table says so (optimistic). There are no warm-up steps, so the latency of a sample is the
    number of timesteps it ran. ``val``: the validation sweep of :func:`stage_simulate` (same settings), None
    without a validation split. Returns the ``early_exit`` entry."""
    if val is not None:
        report = validated_early_exit(val, res, val.ann_accuracy)
        chosen, selected_on = report["chosen"], "validation split"
        curve = report["rows"]
    else:
        curve = [{**r, "val_accuracy": None, "val_mean_timesteps": None} for r in early_exit_curve(res)]
        chosen, selected_on = None, "test split (no validation split: optimistic)"
    rows = []
    for r in curve:
        fixed = fixed_T_needed(res, r["accuracy"])
        rows.append([r["patience"], r["margin"], r["val_accuracy"], r["val_mean_timesteps"], r["accuracy"],
                     r["mean_timesteps"], fixed if fixed is not None else "not reached",
                     "**chosen**" if chosen is r else ""])
    files = []
    if ctx.env.is_main:
        paths = write_table(ctx.run.path(f"{stem}_early_exit"),
                            ["patience", "margin", "val accuracy (%)", "val average T", "test accuracy (%)",
                             "test average T", "fixed T for the same test accuracy", "rule"], rows,
                            {"rule": "exit at the first step whose prediction has been stable for `patience` steps "
                                     "and whose time-averaged logit margin is >= `margin`",
                             "selected_on": selected_on, "chosen": chosen, "simulated_T": max(res.timesteps),
                             "derived_from": derived})
        files = [p.name for p in paths.values()]
    keys = ("patience", "margin", "val_accuracy", "val_mean_timesteps", "accuracy", "mean_timesteps", "fixed_T")
    return Entry({"selected_on": selected_on, "chosen": chosen,
                  "curve": [dict(zip(keys, r[:7])) for r in rows]}, files, derived)


def stage_cost(ctx: Context, snn: SpikingNetwork, res: SimResult) -> dict:
    """In-memory-hardware cost at ``cost.timesteps``; writes ``cost.{json,md}`` and its plots, then the record
    ``cost``."""
    c = ctx.cfg.cost
    sweep = ctx.run.path("sweep.json")
    derived = {"config": config_digest(ctx.cfg, ("cost",)), "snn": model_digest(snn),
               "sweep.json": file_sha256(sweep) if sweep.is_file() else None}
    early_exit = (ctx.run.metrics().get("early_exit") or {}).get("chosen")  # recorded predictions: the chosen rule
    report = run_cost(snn, res, ctx.run.root, hw=c.preset, timesteps=c.timesteps, mode=c.mode,
                      derived_from=derived, tolerance=c.accuracy_tolerance,
                      early_exit=early_exit) if ctx.env.is_main else None
    total = report.to_dict()["total"] if report is not None else {}
    point = report.operating_point if report is not None else {}
    files = [f for f in COST_FILES if ctx.run.path(f).is_file()]
    ctx.run.commit("cost", {"cost": Entry({"preset": c.preset, "mode": c.mode, "timesteps": point.get("timesteps"),
                                           "operating_point": point.get("reason"), "total": total}, files,
                                          derived)}, replace=True)
    if report is not None:
        log.info("cost (%s, %s, operating point %s): %.4g pJ, %.4g ns, %.4g um2", c.preset, c.mode, point["reason"],
                 total["energy_pj"], total["latency_ns"] or float("nan"), total["area_um2"] or float("nan"))
    return total


def run_pipeline(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """teacher(s) -> binary student by distillation (-> tandem fine-tuning, ``tandem.enabled``) -> conversion ->
    accuracy-vs-T sweep -> hardware cost.

    The run folder is locked for the whole run. Returns the metrics dict (also in ``metrics.json``).
    """
    check_models(cfg)
    with make_context(cfg, resume=resume, overwrite=overwrite) as ctx:
        online = METHODS.get(cfg.distill.method).trains_teacher  # bd_kd: the student stage trains its own teacher
        teacher = None if online else stage_teacher(ctx)
        student = stage_student(ctx, teacher)
        if cfg.tandem.enabled:
            student = stage_tandem(ctx, student, teacher)
        # every rank converts (the calibration's SNN runs are dealt to the ranks; all get rank 0's network, bit
        # for bit), then simulates its share of the test set: no rank waits in a barrier meanwhile
        snn = stage_convert(ctx, student, ctx.arch("student"))
        res = stage_simulate(ctx, snn, student)  # the test set is dealt to the ranks
        if ctx.env.is_main and cfg.cost.enabled:
            stage_cost(ctx, snn, res)
        barrier()
        return ctx.run.metrics()
