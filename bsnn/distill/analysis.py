"""Teacher-quality tools for distillation: choosing the teacher checkpoint that distils best, and measuring which
level of the teacher's knowledge the student's gain comes from.

* :func:`select_teacher` (Cho & Hariharan, "On the efficacy of knowledge distillation", ICCV 2019: more accurate
  teachers often do not distil better, and stopping the teacher's training early mitigates it): a short student
  (``select_epochs`` epochs, the same initialisation, data order and settings for every candidate) is distilled from
  each candidate teacher and the candidate whose student has the best **validation** accuracy is chosen (never test
  labels; ties: the first candidate). The paper compares fully trained students of teachers stopped at hand-picked
  epochs; the short students here are a cheaper proxy for that comparison, made automatically. The pipeline
  (:func:`bsnn.pipeline.stage_student`) runs it with ``student.select_epochs > 0`` over the teacher checkpoints kept
  at ``train.keep_epochs`` (:func:`kept_candidates`) plus the final teacher, and ``bsnn distill --select-teacher
  A.pt,B.pt`` over given model files.
* :func:`knowledge_levels` (Tang et al., "Understanding and Improving Knowledge Distillation", 2020): the same
  student and budget trained four times: CE only; *universe* (:class:`~bsnn.distill.levels.UniverseLS`: label
  smoothing at the teacher's mean confidence); *domain* (:class:`~bsnn.distill.levels.DomainKD`: each class's mean
  teacher distribution); *instance* (KD, the per-sample teacher distribution). Reported: validation and test
  accuracy, top-1 agreement with the teacher and ``KL(teacher ‖ student)`` on the test split, and the share of
  KD's gain (instance − CE) each level adds: universe ``(U − CE) / (I − CE)``, domain ``(D − U) / (I − CE)``,
  instance ``(I − D) / (I − CE)``; the three shares sum to 1 (:func:`gain_fractions`). ``bsnn distill --analyze``
  writes it as ``knowledge_levels.{md,csv,json}``.

Neither paper's authors published code for these procedures; they are implemented from the papers as described
here. This module sits above :mod:`bsnn.train` (it trains students), so ``bsnn.distill``'s package namespace does
not import it: ``from bsnn.distill.analysis import ...``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsnn.data import unpack_batch
from bsnn.distill.base import METHODS
from bsnn.distill.config import DistillConfig
from bsnn.errors import CheckpointError, ConfigError
from bsnn.modelfile import load_model
from bsnn.report import markdown_table, write_table
from bsnn.train import TrainConfig, evaluate, fidelity, set_seed, train_student

__all__ = ["LEVELS", "LEVEL_METHODS", "choose_candidate", "gain_fractions", "kept_candidates", "kept_epochs",
           "kept_file", "knowledge_levels", "levels_table", "select_teacher", "selection_table", "table_markdown",
           "teacher_statistics", "write_selection"]

log = logging.getLogger("bsnn")

#: the knowledge levels, nested: each adds to the one before
LEVELS = ("ce", "universe", "domain", "instance")
#: the registered method that trains each level
LEVEL_METHODS = {"ce": "ce", "universe": "universe_ls", "domain": "domain_kd", "instance": "kd"}


# ------------------------------------------------------------------------------------------ teacher statistics


@torch.no_grad()
def teacher_statistics(teacher: nn.Module, loader, temperature: float = 1.0, num_classes: int | None = None,
                       device: torch.device | str = "cpu") -> dict:
    """Training-set statistics of the teacher's distribution ``p = softmax(z_t / T)``: its mean max-probability
    (``confidence``, the universe level's) and each class's mean distribution (``class_targets``, the domain
    level's), as :class:`~bsnn.distill.levels.UniverseLS` / :class:`~bsnn.distill.levels.DomainKD` take them.

    Args:
        teacher: the (frozen) teacher; evaluated in eval mode, its mode restored after.
        loader: yields ``(x [B, ...], y [B])`` (or with an index), e.g. the training loader.
        temperature: T of the distillation the statistics are for.
        num_classes: K (default: the teacher's number of outputs).
        device: where to run the teacher.

    Returns:
        ``{"confidence": float, "class_targets": K x K list (row k: class k's mean; a class without samples: its
        one-hot row), "class_counts": [K], "samples": int, "temperature": T}``.
    """
    device = torch.device(device)
    was_training = teacher.training
    teacher.eval()
    conf, n, sums, counts = 0.0, 0, None, None
    try:
        for step, batch in enumerate(loader):
            x, y, _ = unpack_batch(batch, "teacher_statistics", step)
            p = F.softmax(teacher(x.to(device)).double() / float(temperature), dim=1)
            k = int(num_classes or p.shape[1])
            if sums is None:
                sums = torch.zeros(k, k, dtype=torch.float64, device=device)
                counts = torch.zeros(k, dtype=torch.float64, device=device)
            y = y.to(device)
            conf += float(p.max(dim=1).values.sum())
            sums.index_add_(0, y, p)
            counts += torch.bincount(y, minlength=k).double()
            n += y.numel()
    finally:
        teacher.train(was_training)
    if n == 0:
        raise ConfigError("teacher_statistics: the loader yielded no samples; give the (non-empty) training loader")
    eye = torch.eye(sums.shape[0], dtype=sums.dtype, device=device)
    table = torch.where(counts.unsqueeze(1) == 0, eye, sums / counts.clamp_min(1.0).unsqueeze(1))
    return {"confidence": conf / n, "class_targets": table.cpu().tolist(), "class_counts": counts.cpu().tolist(),
            "samples": n, "temperature": float(temperature)}


# ------------------------------------------------------------------------------------------ knowledge levels


def gain_fractions(accuracy: dict[str, float | None]) -> dict[str, float | None]:
    """Share of KD's gain ``I − CE`` that each level adds: ``universe = (U − CE)/(I − CE)``, ``domain =
    (D − U)/(I − CE)``, ``instance = (I − D)/(I − CE)`` (they sum to 1), and the cumulative shares
    ``<level>_cumulative = (level − CE)/(I − CE)``. All None when KD gains nothing (``I == CE``) or an accuracy is
    missing.

    Args:
        accuracy: ``{"ce", "universe", "domain", "instance"}`` -> accuracy (%).
    """
    a = {k: accuracy.get(k) for k in LEVELS}
    keys = ["universe", "domain", "instance", "universe_cumulative", "domain_cumulative", "instance_cumulative"]
    if any(v is None for v in a.values()) or a["instance"] == a["ce"]:
        return dict.fromkeys(keys)
    gain = a["instance"] - a["ce"]
    out = {"universe": (a["universe"] - a["ce"]) / gain, "domain": (a["domain"] - a["universe"]) / gain,
           "instance": (a["instance"] - a["domain"]) / gain}
    out.update({f"{k}_cumulative": (a[k] - a["ce"]) / gain for k in ("universe", "domain", "instance")})
    return {k: v + 0.0 for k, v in out.items()}  # + 0.0: no -0.0 in the tables


def _level_config(level: str, distill: DistillConfig | None, stats: dict) -> DistillConfig:
    """The level's :class:`DistillConfig`: CE only (weight 1), or KD's form with ``distill``'s temperature and
    weights where set (else KD's published ones) and the level's soft-label statistics."""
    if level == "ce":
        return DistillConfig(method="ce")
    base = distill or DistillConfig()
    params = {"universe": {"confidence": stats["confidence"]}, "domain": {"class_targets": stats["class_targets"]},
              "instance": {}}[level]
    return DistillConfig(method=LEVEL_METHODS[level], temperature=base.temperature, ce_weight=base.ce_weight,
                         kd_weight=base.kd_weight, params=params)


def knowledge_levels(teacher: nn.Module, make_student: Callable[[], nn.Module], train_loader, val_loader,
                     test_loader, cfg: TrainConfig, distill: DistillConfig | None = None, *,
                     device: torch.device | str = "cpu", seed: int = 0, quiet: bool = False) -> dict:
    """Train the student at each knowledge level (:data:`LEVELS`) with the same budget, initialisation and data
    order, and measure it (module docstring).

    Args:
        teacher: the trained teacher (frozen).
        make_student: builds a fresh student (called after seeding with ``seed``, once per level).
        train_loader: training loader (also the statistics' loader).
        val_loader: validation loader, or None (then validation accuracies are None).
        test_loader: test loader.
        cfg: the student's training settings (the budget: ``cfg.epochs``).
        distill: temperature / weights for the three KD-form levels where set (None: KD's, CE 0.1, KD 0.9, T = 4).
        device: training device.
        seed: seed of every level's student initialisation.
        quiet: no progress bars.

    Returns:
        ``{"levels": [{"level", "method", "val_acc", "test_acc", "agreement", "kl", "share", "cumulative_share"},
        ...], "gain_fractions": {"test": ..., "val": ...}, "statistics": teacher_statistics(...) without the table
        (``confidence``, ``samples``, ``temperature``), "class_targets": K x K, "epochs", "temperature",
        "ce_weight", "kd_weight"}``.
    """
    device = torch.device(device)
    kd = METHODS.get("kd")
    t = float(distill.temperature if distill is not None and distill.temperature is not None else
              kd.default_temperature)
    stats = teacher_statistics(teacher, train_loader, t, device=device)
    rows = []
    for level in LEVELS:
        dcfg = _level_config(level, distill, stats)
        set_seed(seed)
        student = make_student().to(device)
        train_student(student, None if level == "ce" else teacher, train_loader, dcfg, cfg, device=device,
                      quiet=quiet, desc=f"levels[{level}]")
        f = fidelity(student, teacher, test_loader, device)
        rows.append({"level": level, "method": dcfg.method,
                     "val_acc": evaluate(student, val_loader, device)["accuracy"] if val_loader is not None else None,
                     "test_acc": evaluate(student, test_loader, device)["accuracy"], "agreement": f["agreement"],
                     "kl": f["kl"]})
        log.info("knowledge level %s (%s): test accuracy %.2f %%, agreement %.2f %%, KL %.4f", level, dcfg.method,
                 rows[-1]["test_acc"], f["agreement"], f["kl"])
    fractions = {split: gain_fractions({r["level"]: r[f"{split}_acc"] for r in rows}) for split in ("test", "val")}
    for r in rows:
        r["share"] = None if r["level"] == "ce" else fractions["test"][r["level"]]
        r["cumulative_share"] = None if r["level"] == "ce" else fractions["test"][f"{r['level']}_cumulative"]
    base = distill or DistillConfig()
    return {"levels": rows, "gain_fractions": fractions, "epochs": cfg.epochs, "temperature": t,
            "ce_weight": float(kd.default_ce_weight if base.ce_weight is None else base.ce_weight),
            "kd_weight": float(kd.default_kd_weight if base.kd_weight is None else base.kd_weight),
            "statistics": {k: stats[k] for k in ("confidence", "samples", "temperature", "class_counts")},
            "class_targets": stats["class_targets"]}


def _fmt(v, digits: int = 2):
    return None if v is None else round(float(v), digits)


def levels_table(report: dict) -> tuple[list[str], list[list]]:
    """Headers and rows of a :func:`knowledge_levels` report (shares of KD's test-accuracy gain)."""
    headers = ["level", "method", "val accuracy (%)", "test accuracy (%)", "agreement with teacher (%)",
               "KL(teacher ‖ student), nats", "share of KD's gain", "cumulative share"]
    rows = [[r["level"], r["method"], _fmt(r["val_acc"]), _fmt(r["test_acc"]), _fmt(r["agreement"]),
             _fmt(r["kl"], 4), _fmt(r["share"], 3), _fmt(r["cumulative_share"], 3)] for r in report["levels"]]
    return headers, rows


# ------------------------------------------------------------------------------------------ teacher selection


def choose_candidate(student_val_acc: Sequence[float]) -> int:
    """Index of the best student validation accuracy (the first on ties)."""
    if not student_val_acc:
        raise ConfigError("teacher selection: no candidate teachers")
    best = max(student_val_acc)
    return next(i for i, a in enumerate(student_val_acc) if a == best)


def select_teacher(candidates: Sequence[tuple[str, nn.Module]], make_student: Callable[[], nn.Module],
                   train_loader, val_loader, distill: DistillConfig, cfg: TrainConfig, select_epochs: int, *,
                   device: torch.device | str = "cpu", seed: int = 0, quiet: bool = False) -> dict:
    """Distil a short student from every candidate teacher and choose the one whose student is best on validation.

    Every candidate's student is built by ``make_student`` after seeding with ``seed`` (the same initialisation) and
    trained by ``distill`` for ``select_epochs`` epochs with ``cfg``'s other settings (its schedule fitted to the
    short run); only validation labels are read.

    Args:
        candidates: ``(name, teacher)`` pairs, e.g. the teacher checkpoints of several epochs.
        make_student: builds a fresh student.
        train_loader: training loader.
        val_loader: validation loader (required: the choice is made on it).
        distill: the distillation of the real run.
        cfg: the student's training settings.
        select_epochs: epochs of each short student (>= 1).
        device, seed, quiet: as :func:`knowledge_levels`.

    Returns:
        ``{"chosen": index, "chosen_name": name, "select_epochs": n, "selected_on": "validation split",
        "candidates": [{"name", "teacher_val_acc", "student_val_acc"}, ...]}``.

    Raises:
        ConfigError: no candidates, no validation loader, ``select_epochs < 1``, or a method that does not distil
            from one given teacher (multi-teacher, assistant-chain and online-teacher methods).
    """
    if not candidates:
        raise ConfigError("teacher selection: no candidate teachers; keep checkpoints with train.keep_epochs=[...] "
                          "or pass bsnn distill --select-teacher A.pt,B.pt")
    if val_loader is None:
        raise ConfigError("teacher selection chooses on the validation split, and this run has none: set "
                          "data.val_fraction > 0 (never on test labels)")
    if int(select_epochs) < 1:
        raise ConfigError(f"teacher selection: select_epochs must be >= 1, got {select_epochs}")
    cls = METHODS.get(distill.method)
    if cls.min_teachers > 1 or cls.uses_assistants or cls.trains_teacher or not cls.needs_teacher:
        raise ConfigError(f"teacher selection needs a method that distils from one given teacher; "
                          f"distill.method={distill.method} does not (choose e.g. kd, dkd, dist)")
    device = torch.device(device)
    short = dataclasses.replace(cfg, epochs=int(select_epochs), keep_epochs=[], select_epochs=0,
                                warmup_epochs=min(cfg.warmup_epochs, float(select_epochs)))
    rows = []
    for i, (name, teacher) in enumerate(candidates):
        set_seed(seed)
        student = make_student().to(device)
        train_student(student, teacher, train_loader, distill, short, device=device, quiet=quiet,
                      desc=f"select[{i + 1}/{len(candidates)}]")
        rows.append({"name": name, "teacher_val_acc": evaluate(teacher, val_loader, device)["accuracy"],
                     "student_val_acc": evaluate(student, val_loader, device)["accuracy"]})
        log.info("teacher selection: %s: teacher val %.2f %%, %d-epoch student val %.2f %%", name,
                 rows[-1]["teacher_val_acc"], short.epochs, rows[-1]["student_val_acc"])
    chosen = choose_candidate([r["student_val_acc"] for r in rows])
    log.info("teacher selection: chose %s", rows[chosen]["name"])
    return {"chosen": chosen, "chosen_name": rows[chosen]["name"], "select_epochs": short.epochs,
            "selected_on": "validation split", "candidates": rows}


def selection_table(selection: dict) -> tuple[list[str], list[list]]:
    """Headers and rows of a :func:`select_teacher` result."""
    headers = ["candidate teacher", "teacher val accuracy (%)",
               f"{selection['select_epochs']}-epoch student val accuracy (%)", "chosen"]
    rows = [[r["name"], _fmt(r["teacher_val_acc"]), _fmt(r["student_val_acc"]),
             "**chosen**" if i == selection["chosen"] else ""] for i, r in enumerate(selection["candidates"])]
    return headers, rows


def kept_epochs(cfg: TrainConfig) -> list[int]:
    """The epochs of ``cfg.keep_epochs`` before the last (the last one is the final teacher itself), sorted."""
    return sorted(k for k in set(cfg.keep_epochs) if k < cfg.epochs)


def kept_file(epoch: int) -> str:
    """Run-folder path of the teacher kept after ``epoch`` (``train.keep_epochs``)."""
    return f"checkpoints/teacher_epoch{epoch}.pt"


def kept_candidates(root: str | Path, train: TrainConfig, select_epochs: int, teacher: nn.Module | None,
                    device: torch.device | str = "cpu") -> list[tuple[str, nn.Module]]:
    """A run's teacher candidates: with ``select_epochs > 0``, the teachers kept at ``train.keep_epochs`` in the run
    folder ``root`` (:func:`kept_file`) and the final ``teacher`` (``"teacher.pt"``); none when ``select_epochs`` is 0.

    Raises:
        ConfigError: selection asked for but no epoch kept (or no teacher). CheckpointError: a kept file is missing.
    """
    if select_epochs <= 0:
        return []
    kept = kept_epochs(train)
    if not kept or teacher is None:
        raise ConfigError(f"student.select_epochs={select_epochs} (this config or the run folder's config.yaml) "
                          "chooses among the teacher checkpoints kept at train.keep_epochs, and there are none: set "
                          "train.keep_epochs=[...] (epochs before train.epochs) and train the teacher again, give the "
                          "candidates with bsnn distill --select-teacher A.pt,B.pt, or set student.select_epochs=0 "
                          "to distil from the teacher alone")
    out = []
    for k in kept:
        path = Path(root) / kept_file(k)
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} not found: the teacher was trained without epoch {k} in "
                                  "train.keep_epochs; train it again (bsnn train --overwrite) or give the candidates "
                                  "with bsnn distill --select-teacher A.pt,B.pt")
        out.append((kept_file(k), load_model(path, device)[0]))
    return out + [("teacher.pt", teacher)]


def write_selection(root: str | Path, selection: dict) -> list[str]:
    """``teacher_selection.{md,csv,json}`` of a :func:`select_teacher` result in ``root`` (the table is also
    logged). Returns the file names."""
    headers, rows = selection_table(selection)
    log.info("teacher selection (chosen on the validation split):\n%s", table_markdown(headers, rows))
    return [p.name for p in write_table(Path(root) / "teacher_selection", headers, rows, selection).values()]


def table_markdown(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """The markdown of a table (as written to ``*.md``), for printing."""
    return markdown_table(headers, rows)

