"""Benchmark: a binary-weight student distilled by every registered method from the same teacher.

Two suites, one results file each (``benchmarks/results/<stem>.{json,md}``; ``--quick`` adds ``_quick``):

**mnist5k** (``distillation``): for each seed every method trains the same binary-weight student (first/last layer
full precision) under the same fixed budget from the same frozen full-precision teacher trained here (cached); the
test accuracy is taken after every epoch (last and best epoch reported), then the student is converted with the
default conversion recipe of ``configs/default.yaml`` and simulated to T = 32 (accuracy at T = 8 and 32).

Every method runs with the defaults a user gets: ``DistillConfig(method=m)`` with no temperature, weight or
``params`` override (None = the method's published value: KD CE 0.1 / KD 0.9 / T 4, DKD α 1 β 8 T 4, NKD T 3
γ 3.5, DML T 1, ...; the resolved values are recorded per run and tabulated), and epoch-based schedules fitted to
the run by :func:`bsnn.pipeline.fit_schedules`, as the pipeline does (DKD's warm-up 20/240 of the epochs,
CA-MKD's feature-term delay 1/240; CRD's ``nce_k`` is capped at the training-set size by the method itself).

Multi-model methods (mnist5k): the teacher assistant (a smaller full-precision model) is trained once (cached,
seed 0) by the first step of the TAKD chain, :func:`bsnn.pipeline.takd_chain` (TAKD's loss from the teacher);
``takd`` then trains the student by the ``takd`` method from the chain ``[teacher, assistant]`` (it distils from
the last model: the chain's last step); ``ca_mkd`` gets ``[teacher, assistant]`` as its two teachers; ``bd_kd``
gets a freshly initialised copy of the teacher architecture (seeded like the student) that it trains online
with the student, as the method's docstring and the pipeline do (the paper trains both from scratch; the
online teacher's final test accuracy is recorded); ``dml`` trains the student with one re-initialised peer
(no teacher); ``ce``, ``tf_nkd``, ``zipf_ls`` and ``bake`` are teacher-free.

**cifar10** (``distillation_cifar10``): the teacher is the zoo's ``cifar10_vgg_teacher`` (full-precision
``plain_vgg8`` width 64, 87.6 % test), used frozen exactly as released (its weights are checked unchanged after
every run), with the splits it was trained on (``benchmarks/_zoo.py``: bsnn's npz loader, 45,000 train / 5,000
validation / 10,000 test, the train split's normalisation). The student is a binary-weight ``plain_vgg8``
(``bsnn.binarize_`` defaults: α·sign(W) per output channel, first and last layer full precision), width
``--cifar-width``, ReLU, trained from scratch on the first ``--cifar-train`` images of the teacher's training
split (random crop + flip) for ``--cifar-epochs`` epochs, Adam lr 2e-3 with bsnn's ``onecycle`` schedule (linear
warm-up over the first 10 % of the steps, then linear decay to 0, stepped per batch), batch 128, no weight decay:
the same budget for every method, the data order and augmentation seeded by the run's seed. The epoch is chosen
on the first ``--cifar-val`` images of the teacher's validation split (best validation accuracy, earliest on
ties), never on test; at that epoch the student is measured on the first ``--cifar-test`` test images: accuracy,
top-1 agreement with the teacher and KL(teacher ‖ student) (``bsnn.train.fidelity``, from logits computed once
per model), then converted with the default ``ConvertConfig()`` on the zoo's calibration images (first 2,048
training images, not augmented) and simulated on the first ``--snn-test`` test images (accuracy at T = 4 and 8).
Methods needing a teacher get the zoo teacher (``metadistil`` trains its own copy of it, the released model is
not changed); methods that train their teacher online (``trains_teacher``: ``switokd``, ``bd_kd``) get what the
pipeline gives them, a freshly initialised model of the teacher's architecture (``plain_vgg8`` width 64, full
precision), built right after the student from the same seeded stream; its validation accuracy after training is
recorded. Teacher-free methods (``needs_teacher`` false: ``ce``, ...) get none; their agreement / KL are still
measured against the zoo teacher. Each method's "beats KD" line is computed from the seeds: the difference of
the test means is beyond noise when it exceeds twice its standard error ``sqrt(s_m²/n_m + s_kd²/n_kd)``.

``--cifar-teacher`` / ``--cifar-student`` run another zoo teacher (an entry trained by ``bsnn run``, e.g.
``cifar10_airbench_teacher``) and another registered student architecture (binarised the same way, at its defaults,
e.g. ``airbench_snn``) under the same protocol; online teachers are then fresh models of that teacher's
architecture (with its data-dependent initialisation). Their results go to ``distillation_cifar10_<teacher>_<student>``.

Runs are ordered seed-major (all methods for seed 0, then seed 1, ...) and the results file is rewritten after
every run; an interrupted benchmark resumes where it stopped (``--fresh`` starts over; a results file made with
another recipe or budget is started over, never mixed).

Usage::

    python benchmarks/distillation.py --datasets mnist5k --seeds 0   # one seed
    nice -n 15 python benchmarks/distillation.py --datasets mnist5k --threads 1 --fresh   # the committed table
    python benchmarks/distillation.py --datasets cifar10 --threads 2          # the CIFAR-10 table (11 methods x 3)
    python benchmarks/distillation.py --datasets cifar10 --quick              # smoke run (tiny budget, 3 methods)
    python benchmarks/distillation.py --datasets cifar10 --cifar-teacher cifar10_airbench_teacher \
        --cifar-student airbench_snn --cifar-train 45000 --cifar-epochs 1      # the airbench teacher and student
    python benchmarks/distillation.py --quick                                 # both smoke runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, load_average, log, machine_info, machine_markdown,  # noqa: E402
                     markdown_table, now_iso, write_results)
from _zoo import available as zoo_available, first, load_network  # noqa: E402

from bsnn.config import BinaryConfig, DistillConfig, SimConfig, TrainConfig, load_config  # noqa: E402
from bsnn.convert import ConvertConfig, convert  # noqa: E402
from bsnn.data import build_loaders, calibration_loader  # noqa: E402
from bsnn.distill import METHODS, list_methods  # noqa: E402
from bsnn.io import model_digest  # noqa: E402
from bsnn.pipeline import build_model, fit_schedules, load_model, save_model, takd_chain  # noqa: E402
from bsnn.simulate import simulate  # noqa: E402
from bsnn.train import evaluate, fidelity, set_seed, train_student, train_teacher  # noqa: E402

NAME = "distillation"
SNN_T = [8, 32]
TEACHER_FREE = ("ce", "tf_nkd", "zipf_ls", "bake", "dml")
RECIPE = "published-defaults"  # results of another recipe in an old results file are discarded, never mixed


def _rel(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _cached(path: Path, arch: dict, train_fn, what: str) -> tuple[torch.nn.Module, dict]:
    """Load ``path`` or build ``arch``, train it with ``train_fn(model) -> info`` and save it."""
    if path.is_file():
        model, rec = load_model(path)
        return model.eval(), {**rec.get("budget", {}), "source": f"cached: {_rel(path)}"}
    log(f"training {what} -> {_rel(path)}")
    model = build_model(arch)
    with Timer() as t:
        info = train_fn(model)
    info = {**info, "train_time_s": round(t.s, 1), "trained_at": now_iso()}
    save_model(path, model, arch, {"budget": info})
    return model.eval(), {**info, "source": f"trained by this benchmark, cached in {_rel(path)}"}


def _test_subset(ds, n: int) -> DataLoader:
    return DataLoader(Subset(ds, list(range(min(n, len(ds))))), batch_size=500, shuffle=False)


def prepare_mnist(args) -> dict:
    """mnist5k: loaders, teacher, assistant, student architecture and training budget."""
    name = "mnist5k"
    cache = ROOT / args.cache
    cfg = load_config(ROOT / "configs" / "default.yaml")
    dcfg = cfg.data
    loaders = build_loaders(dcfg, seed=0)
    s = loaders.splits
    base = {"num_classes": s.num_classes, "in_channels": s.in_channels}
    t_arch = {**base, "name": "small_cnn", "kwargs": {}, "binary": None}
    a_arch = {**base, "name": "small_cnn", "kwargs": {"width": 16}, "binary": None}
    s_arch = {**base, "name": "small_cnn", "kwargs": {}, "binary": dataclasses.asdict(BinaryConfig())}
    t_cfg = dataclasses.replace(cfg.train, epochs=1 if args.quick else cfg.train.epochs)
    s_cfg = dataclasses.replace(cfg.student, epochs=1 if args.quick else args.mnist_epochs)
    budget = (f"{s_cfg.epochs} epochs x {len(s.train)} images (mnist5k train split), batch {dcfg.batch_size}, "
              f"Adam lr {s_cfg.lr:g} cosine, no augmentation")
    n_test = 200 if args.quick else len(s.test)
    tag = "mnist5k" + ("_quick" if args.quick else "")
    test = _test_subset(s.test, n_test)
    set_seed(0)
    teacher, t_info = _cached(cache / f"distill_{tag}_teacher_e{t_cfg.epochs}.pt", t_arch,
                              lambda m: {"recipe": f"{t_arch['name']} {t_arch['kwargs']} full precision, CE, "
                                                   f"{t_cfg.epochs} epochs",
                                         "history": train_teacher(m, loaders.train, t_cfg, quiet=True)},
                              f"{name} teacher")
    set_seed(0)
    assistant, a_info = _cached(
        cache / f"distill_{tag}_assistant_takd_e{t_cfg.epochs}.pt", a_arch,
        lambda m: {"recipe": f"{a_arch['name']} {a_arch['kwargs']} full precision, TAKD chain step 1 from the "
                             f"teacher (bsnn.pipeline.takd_chain, DistillConfig(method='takd')), "
                             f"{t_cfg.epochs} epochs",
                   "history": takd_chain(teacher, [], m, loaders.train, DistillConfig(method="takd"), t_cfg,
                                         quiet=True)[0]},
        f"{name} teacher assistant")
    t_acc = evaluate(teacher, test)["accuracy"]
    a_acc = evaluate(assistant, test)["accuracy"]
    log(f"{name}: teacher {t_acc:.2f} %, assistant {a_acc:.2f} % on {len(test.dataset)} test images")
    return {"loaders": loaders, "test": test, "teacher": teacher, "assistant": assistant, "student_arch": s_arch,
            "teacher_arch": t_arch, "train_cfg": s_cfg,
            "calib": calibration_loader(s, dcfg, 512 if args.quick else 2048),
            "info": {"budget": budget, "test_samples": len(test.dataset), "teacher": {**t_info, "accuracy": t_acc},
                     "assistant": {**a_info, "accuracy": a_acc},
                     "teacher_arch": t_arch, "assistant_arch": a_arch, "student_arch": s_arch}}


def distill_config(method: str, epochs: int) -> DistillConfig:
    """The user's default ``DistillConfig(method=method)``, epoch-based schedules fitted to ``epochs``."""
    return fit_schedules(DistillConfig(method=method), epochs)


def resolved(dcfg: DistillConfig) -> dict:
    """The weights, temperature and params the method actually uses (None in ``dcfg`` = published)."""
    cls = METHODS.get(dcfg.method)
    pick = lambda v, d: float(d if v is None else v)  # noqa: E731
    return {"ce": pick(dcfg.ce_weight, cls.default_ce_weight), "kd": pick(dcfg.kd_weight, cls.default_kd_weight),
            "temperature": pick(dcfg.temperature, cls.default_temperature),
            "params": {k: v for k, v in cls.check_params(dcfg.params).items() if v is not None}}


def run_mnist(ctx: dict, method: str, seed: int, snn_samples: int) -> dict:
    """mnist5k: train one student by ``method`` with ``seed``; return accuracies, SNN accuracies and times."""
    loaders, test = ctx["loaders"], ctx["test"]
    dcfg = distill_config(method, ctx["train_cfg"].epochs)
    set_seed(seed)
    student = build_model(ctx["student_arch"])
    if method in TEACHER_FREE:
        teacher, source = None, "none"
    elif method in ("takd", "ca_mkd"):
        teacher, source = [ctx["teacher"], ctx["assistant"]], "[teacher, assistant]"
    elif METHODS.get(method).trains_teacher:  # bd_kd: a fresh teacher trained online (seeded after the student)
        teacher, source = build_model(ctx["teacher_arch"]), "fresh teacher architecture, trained online"
    else:
        teacher, source = ctx["teacher"], "teacher"
    with Timer() as t:
        hist = train_student(student, teacher, loaders.train, dcfg, ctx["train_cfg"], val_loader=test, quiet=True,
                             desc=f"{method} seed {seed}")
    accs = [h["val_acc"] for h in hist]
    extra = {}
    if METHODS.get(method).trains_teacher:
        extra["online_teacher_acc"] = evaluate(teacher.eval(), test)["accuracy"]
    student.eval()
    conv_cfg = load_config(ROOT / "configs" / "default.yaml").convert
    with Timer() as tc:
        snn = convert(student, ctx["calib"], conv_cfg)
        sim_loader = DataLoader(Subset(test.dataset, list(range(min(snn_samples, len(test.dataset))))),
                                batch_size=128, shuffle=False)
        res = simulate(snn, sim_loader, SNN_T, SimConfig(timesteps=SNN_T), quiet=True)
    return {"method": method, "seed": seed, "last": accs[-1], "best": max(accs), "per_epoch": accs,
            "snn": {str(k): v for k, v in res.accuracy.items()}, "snn_samples": res.samples,
            "train_time_s": round(t.s, 1), "snn_time_s": round(tc.s, 1), "teacher": source,
            "weights": {"ce": dcfg.ce_weight, "kd": dcfg.kd_weight, "temperature": dcfg.temperature},
            "params": dcfg.params, "resolved": resolved(dcfg), **extra}


def _ms(values: list[float], digits: int = 2) -> str:
    """``mean ± sample std`` of ``values`` (the value alone for one, "" for none)."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def finished_runs(runs: list[dict], method: str) -> list[dict]:
    """The runs of ``method`` that finished (no ``error`` record)."""
    return [r for r in runs if r["method"] == method and "error" not in r]


def summary_rows(runs: list[dict], methods: list[str]) -> list[list]:
    rows = []
    for m in methods:
        rs = finished_runs(runs, m)
        if not rs:
            continue
        rows.append([m, len(rs), _ms([r["last"] for r in rs]), _ms([r["best"] for r in rs]),
                     _ms([r["snn"]["8"] for r in rs]), _ms([r["snn"]["32"] for r in rs]),
                     f"{statistics.mean(r['train_time_s'] for r in rs):.0f}"])
    return rows


def defaults_lines(runs: list[dict], methods: list[str]) -> list[str]:
    """The resolved (published) settings of every method run, and BD-KD's online teacher accuracy."""
    rows = []
    for m in methods:
        rs = [r for r in finished_runs(runs, m) if "resolved" in r]
        if not rs:
            continue
        res = rs[0]["resolved"]
        params = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res["params"].items())
        online = _ms([r["online_teacher_acc"] for r in rs if "online_teacher_acc" in r])
        kd, temp = (("—", "—") if m == "ce" else (f"{res['kd']:g}", f"{res['temperature']:g}"))
        rows.append([m, f"{res['ce']:g}", kd, temp, params or "—",
                     rs[0].get("teacher", ""), online])
    if not rows:
        return []
    return ["Settings each method ran with (its published defaults, schedules fitted to the run; T matters only "
            "to methods that soften logits; CRD caps `nce_k` at the training-set size − 1 itself):", "",
            markdown_table(["method", "CE weight", "KD weight", "T", "params", "teacher(s)", "online teacher %"],
                           rows), ""]


def markdown_mnist(payload: dict) -> str:
    lines = ["# Distillation methods for binary-weight students", "",
             f"Machine: {machine_markdown(payload['machine'])}", "",
             f"Commands (runs resume across invocations; each row's seeds come from one or more of these): "
             f"{'; '.join(f'`{c}`' for c in payload.get('commands', [payload['command']]))} (started "
             f"{payload['started']}, last update {payload['updated']}).", "",
             "Every method trains the same binary-weight student (±α·sign weights, first/last layer full precision) "
             "from the same frozen teacher under the same budget; accuracy (%) on the test images after the last "
             "epoch and at the best epoch (an optimistic oracle, as commonly reported), mean ± sample std over the "
             "seeds run; SNN = the student converted with the default recipe (p99.9, θ/2 shift, bias "
             "calibration) at T = 8 / 32.", "",
             "Every method runs with the defaults a user gets, `DistillConfig(method=m)`: no temperature / weight / "
             "params override (None = the method's published value, listed below), epoch-based schedules fitted "
             "to the run's epochs (`bsnn.pipeline.fit_schedules`: DKD warm-up 20/240 of the epochs, CA-MKD "
             "feature delay 1/240). The assistant is trained once by the first step of the TAKD chain "
             "(`bsnn.pipeline.takd_chain`, TAKD's loss from the teacher); `takd` = the `takd` method given "
             "`[teacher, assistant]` (the chain's last step), `ca_mkd` = `[teacher, assistant]` as two teachers, "
             "`bd_kd` = a freshly initialised copy of the teacher architecture trained online with the student "
             "(its final accuracy in the `online teacher` column), `dml` = one re-initialised peer, no teacher.",
             ""]
    if "cifar10" not in payload["datasets"]:
        lines += ["CIFAR-10 (the zoo teacher, epochs chosen on validation): `distillation_cifar10.md`. The earlier "
                  "CIFAR-10 table (commit 6311ac8: temperature 4 for every method, DKD warm-up 1 epoch, `takd` run "
                  "as `kd` from a KD-trained assistant, non-published KD weights, best epoch picked on test) is not "
                  "comparable; see `git show 6311ac8:benchmarks/results/distillation.md`.", ""]
    for name, d in payload["datasets"].items():
        info = d["info"]
        lines += [f"## {name}", "",
                  f"Budget: {info['budget']}. Test images: {info['test_samples']} (SNN: first "
                  f"{payload['snn_samples'].get(name, '?')}). Teacher {info['teacher_arch']['name']} "
                  f"{info['teacher_arch']['kwargs']}: {info['teacher']['accuracy']:.2f} %; assistant "
                  f"{info['assistant_arch']['name']} {info['assistant_arch']['kwargs']}: "
                  f"{info['assistant']['accuracy']:.2f} %.", "",
                  markdown_table(["method", "seeds", "last epoch", "best epoch", "SNN T=8", "SNN T=32",
                                  "train s"], summary_rows(d["runs"], payload["methods"])), ""]
        lines += defaults_lines(d["runs"], payload["methods"])
        errors = [r for r in d["runs"] if "error" in r]
        if errors:
            lines += ["Failed runs: " + "; ".join(f"{r['method']} seed {r['seed']}: {r['error']}" for r in errors), ""]
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------- CIFAR-10
CIFAR_TEACHER = "cifar10_vgg_teacher"
CIFAR_SNN_T = [4, 8]
CIFAR_RECIPE = "zoo-teacher, epoch chosen on validation"
CIFAR_METHODS = ("kd", "dkd", "dist", "nkd", "crd", "sakd", "lipschitz", "metadistil", "ie_kd", "switokd", "ce")
QUICK_CIFAR_METHODS = ("ce", "kd", "switokd")
NOISE_Z = 2.0  # a difference of means beyond NOISE_Z standard errors of the difference is "beyond noise"


class TeacherChanged(RuntimeError):
    """The released teacher's weights changed during a run: every later run would distil from another teacher."""


@dataclass(frozen=True)
class CifarBudget:
    """The one training and measuring budget every CIFAR-10 method gets (recorded in the results file; a results
    file made with another budget is started over, never mixed).

    Attributes:
        width: student ``plain_vgg8`` width (channels of the first two convs).
        train_images: the first this many images of the teacher's training split (augmented).
        epochs: training epochs.
        val_images: the first this many images of the teacher's validation split: the epoch is chosen on them.
        test_images: the first this many test images: accuracy and fidelity at the chosen epoch.
        snn_images: the first this many test images simulated at T = 4 and 8.
        calib_images: the first this many of the zoo's calibration images (training images, not augmented).
        batch_size: training batch.
        lr: Adam's peak learning rate (bsnn ``onecycle`` schedule, no weight decay).
        warmup_fraction: fraction of the training steps of linear warm-up.
    """

    width: int = 32
    train_images: int = 10000
    epochs: int = 3
    val_images: int = 2000
    test_images: int = 10000
    snn_images: int = 500
    calib_images: int = 2048
    batch_size: int = 128
    lr: float = 2e-3
    warmup_fraction: float = 0.1

    @classmethod
    def from_args(cls, args) -> "CifarBudget":
        """The command line's budget (``--quick``: a tiny fixed one)."""
        if args.quick:
            return cls(width=8, train_images=64, epochs=1, val_images=64, test_images=64, snn_images=32,
                       calib_images=32)
        return cls(width=args.cifar_width, train_images=args.cifar_train, epochs=args.cifar_epochs,
                   val_images=args.cifar_val, test_images=args.cifar_test, snn_images=args.snn_test)

    def validate(self) -> None:
        for key in ("width", "train_images", "epochs", "val_images", "test_images", "snn_images", "calib_images",
                    "batch_size"):
            if getattr(self, key) < 1:
                raise SystemExit(f"cifar10 budget: {key} must be >= 1, got {getattr(self, key)}; pass a positive "
                                 "--cifar-width / --cifar-train / --cifar-epochs / --cifar-val / --cifar-test / "
                                 "--snn-test")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, optimizer="adam", lr=self.lr, weight_decay=0.0, schedule="onecycle",
                           warmup_epochs=self.warmup_fraction * self.epochs)

    def describe(self, n_train: int) -> str:
        return (f"{self.epochs} epochs x {n_train} images (the first of the teacher's training split), random crop "
                f"+ flip, batch {self.batch_size}, Adam lr {self.lr:g}, bsnn `onecycle` schedule (linear warm-up "
                f"over the first {100 * self.warmup_fraction:g} % of the steps, then linear decay to 0, per batch), "
                "no weight decay; data order and augmentation seeded by the run's seed")


class _Column(nn.Module):
    """``x [B, M, K] -> x[:, i] [B, K]``: the i-th of M stacked logit sets, so that :func:`bsnn.train.evaluate`
    and :func:`bsnn.train.fidelity` measure logits computed once per model (the teacher's once per benchmark)."""

    def __init__(self, i: int) -> None:
        super().__init__()
        self.i = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.i]


@torch.no_grad()
def logits_of(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, K]`` and labels ``[N]`` of ``model`` (in eval mode; its mode is restored) over ``loader``."""
    was = model.training
    model.eval()
    try:
        zs, ys = zip(*[(model(x), y) for x, y in loader])
    finally:
        model.train(was)
    return torch.cat(zs), torch.cat(ys)


def stacked(y: torch.Tensor, *logits: torch.Tensor) -> DataLoader:
    """A loader of ``(stack(logits) [B, M, K], y [B])`` for :class:`_Column` models."""
    return DataLoader(TensorDataset(torch.stack(logits, 1), y), batch_size=1000)


def scores_from_logits(z_student: torch.Tensor, z_teacher: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy (:func:`evaluate`), top-1 agreement and KL(teacher ‖ student) (:func:`fidelity`) from logits."""
    loader = stacked(y, z_student, z_teacher)
    f = fidelity(_Column(0), _Column(1), loader)
    return {"test": evaluate(_Column(0), loader)["accuracy"], "agreement": f["agreement"], "kl": f["kl"],
            "test_samples": f["samples"]}


def train_loader(ds, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches whose order is a function of ``(seed, epoch)`` (the sampler of ``bsnn.data.build_loaders``:
    the trainer calls ``set_epoch``)."""
    return DataLoader(ds, batch_size=batch_size,
                      sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed))


def check_cifar_methods(methods: list[str]) -> None:
    """Refuse methods the CIFAR-10 suite gives no models for (several teachers, a TAKD chain)."""
    for m in methods:
        cls = METHODS.get(m)  # unknown names: the registry's error lists the valid ones
        if cls.min_teachers > 1 or cls.uses_assistants:
            raise SystemExit(f"method {m!r} needs extra trained teachers/assistants, which the CIFAR-10 suite does not "
                             "train; run it on mnist5k (--datasets mnist5k) or with `bsnn run` (model.teachers / "
                             "model.assistants)")


def prepare_cifar(args) -> dict | None:
    """CIFAR-10: the zoo teacher with its splits, its logits on the val/test images, the student and the budget."""
    if not zoo_available():
        log("cifar10: ../shared/data/cifar10.npz not found, skipping (the archive lives in ../shared/data/ on "
            "project machines)")
        return None
    budget = CifarBudget.from_args(args)
    budget.validate()
    teacher_name = args.cifar_teacher
    net = load_network(teacher_name)
    if getattr(net.train, "augment", "none") == "none":
        raise SystemExit(f"{teacher_name}: its training split is not augmented; the CIFAR-10 suite needs a zoo "
                         "entry trained by `bsnn run` (its card has a normalisation section)")
    n_train = min(budget.train_images, len(net.train))
    train_ds = net.train.subset(range(n_train))
    val, test = first(net.val, budget.val_images, 500), first(net.test, budget.test_images, 500)
    with Timer() as t:
        z_val, y_val = logits_of(net.model, val)
        z_test, y_test = logits_of(net.model, test)
    t_val = evaluate(_Column(0), stacked(y_val, z_val))["accuracy"]
    t_test = evaluate(_Column(0), stacked(y_test, z_test))["accuracy"]
    log(f"cifar10: teacher {teacher_name} val {t_val:.2f} % ({len(y_val)} images), test {t_test:.2f} % "
        f"({len(y_test)} images; logits in {t.s:.0f} s)")
    card = net.card
    base = {"num_classes": card["arch"]["num_classes"], "in_channels": card["arch"]["in_channels"]}
    if args.cifar_student is None:  # the teacher's architecture at the budget's width
        s_name, s_kwargs = card["arch"]["name"], {**card["arch"]["kwargs"], "width": budget.width}
    else:  # another registered architecture, at its defaults (plain_vgg8: the budget's width)
        s_name = args.cifar_student
        s_kwargs = {"width": budget.width} if s_name == "plain_vgg8" else {}
    s_arch = {**base, "name": s_name, "kwargs": s_kwargs, "binary": dataclasses.asdict(BinaryConfig()),
              "activation": {"kind": "relu"}}
    t_arch = card["arch"]  # the released teacher's architecture: what trains_teacher methods get, fresh
    settings = {"budget": dataclasses.asdict(budget), "train_images": n_train, "teacher": teacher_name,
                "teacher_sha256": card.get("sha256"), "student_arch": s_arch, "snn_timesteps": CIFAR_SNN_T}
    return {"budget": budget, "train_cfg": budget.train_config(), "train_ds": train_ds, "val": val, "test": test,
            "teacher": net.model, "teacher_digest": model_digest(net.model), "teacher_arch": t_arch,
            "student_arch": s_arch, "z_teacher_test": z_test, "y_test": y_test,
            "calib": first(net.calib.dataset, budget.calib_images, 256),
            "snn_loader": first(net.test, budget.snn_images, 128), "settings": settings,
            "teacher_name": teacher_name,
            "stem_suffix": "" if teacher_name == CIFAR_TEACHER and args.cifar_student is None else
            f"_{teacher_name.removeprefix('cifar10_')}_{s_name}",
            "info": {"budget": budget.describe(n_train), "teacher": teacher_name, "teacher_card": card["summary"],
                     "teacher_description": card["description"], "data": net.data_note,
                     "teacher_val": t_val, "teacher_test": t_test, "val_samples": len(y_val),
                     "test_samples": len(y_test), "snn_samples": min(budget.snn_images, len(net.test)),
                     "teacher_arch": t_arch, "student_arch": s_arch}}


def run_cifar(ctx: dict, method: str, seed: int) -> dict:
    """CIFAR-10: train one student by ``method`` with ``seed``, choose its epoch on validation, measure it there."""
    cfg, cls = ctx["train_cfg"], METHODS.get(method)
    dcfg = distill_config(method, cfg.epochs)
    set_seed(seed)
    student = build_model(ctx["student_arch"])
    if cls.trains_teacher:  # as bsnn.pipeline.stage_student: a fresh model of the teacher's architecture
        teacher, source = build_model(ctx["teacher_arch"]), "fresh teacher architecture, trained online"
    elif not cls.needs_teacher:
        teacher, source = None, "none"
    else:
        teacher, source = ctx["teacher"], f"zoo {ctx['teacher_name']} (frozen)"
    chosen = {"val": -math.inf}

    def keep(epoch: int, metrics: dict) -> None:  # the best validation epoch so far (earliest on ties)
        if metrics["val_acc"] > chosen["val"]:
            chosen.update(epoch=epoch, val=metrics["val_acc"], state=copy.deepcopy(student.state_dict()))

    with Timer() as t:
        hist = train_student(student, teacher, train_loader(ctx["train_ds"], ctx["budget"].batch_size, seed), dcfg,
                             cfg, val_loader=ctx["val"], quiet=True, desc=f"{method} seed {seed}", on_epoch_end=keep)
    if model_digest(ctx["teacher"]) != ctx["teacher_digest"]:
        raise TeacherChanged(f"{method} changed the released teacher's weights or BN statistics; every later run "
                             "would distil from another teacher: fix the method (it must leave the teacher as given)")
    extra = {}
    if cls.trains_teacher:
        extra["online_teacher_acc"] = evaluate(teacher, ctx["val"])["accuracy"]  # validation, after training
    student.load_state_dict(chosen["state"])
    student.eval()
    with Timer() as te:
        z, y = logits_of(student, ctx["test"])
        if not torch.equal(y, ctx["y_test"]):
            raise RuntimeError("the test loader's labels changed between the teacher's and the student's pass")
        metrics = scores_from_logits(z, ctx["z_teacher_test"], y)
    with Timer() as tc:
        snn = convert(student, ctx["calib"], ConvertConfig())
        res = simulate(snn, ctx["snn_loader"], CIFAR_SNN_T, SimConfig(timesteps=CIFAR_SNN_T), ann=student,
                       quiet=True)
    return {"method": method, "seed": seed, "chosen_epoch": chosen["epoch"], "val": chosen["val"], **metrics,
            "val_per_epoch": [h["val_acc"] for h in hist], "train_loss_per_epoch": [h["train_loss"] for h in hist],
            "snn": {str(k): v for k, v in res.accuracy.items()}, "snn_samples": res.samples,
            "snn_ann_acc": res.ann_accuracy, "train_time_s": round(t.s, 1), "eval_time_s": round(te.s, 1),
            "snn_time_s": round(tc.s, 1), "teacher": source,
            "weights": {"ce": dcfg.ce_weight, "kd": dcfg.kd_weight, "temperature": dcfg.temperature},
            "params": dcfg.params, "resolved": resolved(dcfg), **extra}


def cifar_log_line(r: dict) -> str:
    return (f"  epoch {r['chosen_epoch']} (val {r['val']:.2f}): test {r['test']:.2f} agreement {r['agreement']:.2f} "
            f"KL {r['kl']:.4f} SNN T=4 {r['snn']['4']:.2f} T=8 {r['snn']['8']:.2f} ({r['train_time_s']:.0f} s)")


def mean_difference(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """``(mean(a) − mean(b), its standard error sqrt(s_a²/n_a + s_b²/n_b))`` with sample variances s²; None when
    either list has fewer than two values (no variance estimate)."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.mean(a) - statistics.mean(b), se


def versus(a: list[float], b: list[float], name_b: str = "KD", z: float = NOISE_Z) -> str:
    """Whether mean(a) beats mean(b) beyond noise: the difference exceeds ``z`` standard errors of it."""
    d = mean_difference(a, b)
    if d is None:
        return f"too few seeds to judge ({len(a)} vs {len(b)}; needs >= 2 each)"
    diff, se = d
    word = ("beats " + name_b + " beyond noise" if diff > z * se else
            "below " + name_b + " beyond noise" if diff < -z * se else "not beyond noise")
    return f"{diff:+.2f} pp vs {name_b} (standard error of the difference {se:.2f}, {len(a)} vs {len(b)} seeds): {word}"


def versus_kd_lines(runs: list[dict], methods: list[str], key: str = "test") -> list[str]:
    """One computed line per method: its test accuracy against KD's, beyond noise or not."""
    ok = [r for r in runs if "error" not in r]
    kd = [r[key] for r in ok if r["method"] == "kd"]
    lines = [f"- {m}: {versus([r[key] for r in ok if r['method'] == m], kd)}" for m in methods
             if m != "kd" and any(r["method"] == m for r in ok)]
    if not kd or not lines:
        return []
    return ([f"Against KD (test accuracy at the validation-chosen epoch; beyond noise = the difference of the means "
             f"exceeds {NOISE_Z:g} standard errors of the difference, sqrt(s_m²/n_m + s_kd²/n_kd), from the seeds):",
             ""] + lines + [""])


def cifar_rows(runs: list[dict], methods: list[str]) -> list[list]:
    rows = []
    for m in methods:
        rs = finished_runs(runs, m)
        if not rs:
            continue
        rows.append([m, len(rs), _ms([r["test"] for r in rs]), _ms([r["val"] for r in rs]),
                     ",".join(str(r["chosen_epoch"]) for r in rs), _ms([r["agreement"] for r in rs]),
                     _ms([r["kl"] for r in rs], 3), _ms([r["snn"]["4"] for r in rs]),
                     _ms([r["snn"]["8"] for r in rs]), f"{statistics.mean(r['train_time_s'] for r in rs):.0f}"])
    return rows


def markdown_cifar(payload: dict) -> str:
    d = payload["datasets"]["cifar10"]
    info = d["info"]
    lines = ["# Distillation methods for binary-weight students: CIFAR-10, from the zoo teacher", "",
             f"Machine: {machine_markdown(payload['machine'])}", "",
             f"Commands (runs resume across invocations; each row's seeds come from one or more of these): "
             f"{'; '.join(f'`{c}`' for c in payload.get('commands', [payload['command']]))} (started "
             f"{payload['started']}, last update {payload['updated']}).", "",
             f"Teacher: the zoo's `{info['teacher']}` ({info['teacher_description']}), used frozen as released: "
             f"{info['teacher_val']:.2f} % on the {info['val_samples']} validation images, "
             f"{info['teacher_test']:.2f} % on the {info['test_samples']} test images. Data: {info['data']}.", "",
             f"Student: binary-weight `{info['student_arch']['name']}` {info['student_arch']['kwargs']} "
             "(`bsnn.binarize_` defaults: α·sign(W) per output channel, first and last layer full precision), ReLU, "
             f"trained from scratch. Budget, the same for every method: {info['budget']}.", "",
             f"The epoch is chosen on the {info['val_samples']} validation images (best validation accuracy; "
             "`epochs` lists the chosen one per seed) and the student is measured at that epoch, never chosen on "
             f"test: test accuracy (%) on {info['test_samples']} test images, top-1 agreement with the teacher (%) "
             "and KL(teacher ‖ student) (nats, T = 1; `bsnn.train.fidelity`), then the SNN converted with the "
             f"default `ConvertConfig()` at T = 4 / 8 on the first {info['snn_samples']} test images; mean ± "
             "sample std over the seeds run; train s = wall time of training (validation included).", "",
             "Every method runs with the defaults a user gets, `DistillConfig(method=m)` (published values, listed "
             "below), epoch-based schedules fitted to the run's epochs (`bsnn.pipeline.fit_schedules`). "
             "`metadistil` trains its own copy of the teacher (the released one is unchanged: checked after every "
             "run); methods that train their teacher online (`switokd`) get a freshly initialised "
             f"`{info['teacher_arch']['name']}` {info['teacher_arch']['kwargs']}, as `bsnn run` gives them (its "
             "validation accuracy after training in the `online teacher` column); teacher-free methods (`ce`) get "
             "none, their agreement / KL is still against the zoo teacher.", "",
             markdown_table(["method", "seeds", "test", "val", "epochs", "agreement", "KL", "SNN T=4", "SNN T=8",
                             "train s"], cifar_rows(d["runs"], payload["methods"])), ""]
    lines += versus_kd_lines(d["runs"], payload["methods"])
    lines += defaults_lines(d["runs"], payload["methods"])
    errors = [r for r in d["runs"] if "error" in r]
    if errors:
        lines += ["Failed runs: " + "; ".join(f"{r['method']} seed {r['seed']}: {r['error']}" for r in errors), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- suites, main
@dataclass(frozen=True)
class Suite:
    """One dataset's benchmark: ``prepare(args) -> ctx`` (None: its data is missing, skipped), ``run(ctx, method,
    seed) -> run record``, the run's log line, ``markdown(payload)``, the results stem, the recipe (a results file
    of another recipe is started over) and the default methods (``quick`` -> names)."""

    stem: str
    recipe: str
    prepare: Callable[[argparse.Namespace], dict | None]
    run: Callable[[dict, str, int], dict]
    log_line: Callable[[dict], str]
    markdown: Callable[[dict], str]
    default_methods: Callable[[bool], list[str]]


def mnist_log_line(r: dict) -> str:
    return (f"  last {r['last']:.2f} best {r['best']:.2f} SNN T=8 {r['snn']['8']:.2f} "
            f"T=32 {r['snn']['32']:.2f} ({r['train_time_s']:.0f} s)")


SUITES = {
    "mnist5k": Suite("distillation", RECIPE, prepare_mnist,
                     lambda ctx, m, s: run_mnist(ctx, m, s, ctx["snn_samples"]), mnist_log_line, markdown_mnist,
                     lambda quick: ["ce", "kd", "dkd"] if quick else list_methods()),
    "cifar10": Suite("distillation_cifar10", CIFAR_RECIPE, prepare_cifar, run_cifar, cifar_log_line, markdown_cifar,
                     lambda quick: list(QUICK_CIFAR_METHODS if quick else CIFAR_METHODS)),
}


def load_payload(path: Path, fresh: bool, recipe: str, settings: dict | None) -> dict:
    """The earlier results at ``path`` to resume, or ``{}`` (``fresh``, missing, or another recipe / budget)."""
    payload = json.loads(path.read_text()) if path.is_file() and not fresh else {}
    if payload and payload.get("recipe") != recipe:
        log(f"{_rel(path)} holds another recipe ({payload.get('recipe', 'pre-published-defaults')}); starting over")
        payload = {}
    if payload and settings is not None and payload.get("settings") != json.loads(json.dumps(settings)):
        log(f"{_rel(path)} was made with another budget ({payload.get('settings')}); starting over")
        payload = {}
    payload["recipe"] = recipe
    if settings is not None:
        payload["settings"] = settings
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="mnist5k,cifar10", help=f"comma-separated among {', '.join(SUITES)}")
    p.add_argument("--methods", default=None,
                   help="comma-separated (default: mnist5k every registered method; cifar10 "
                        f"{','.join(CIFAR_METHODS)}; --quick: {','.join(QUICK_CIFAR_METHODS)} / ce,kd,dkd)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick 0,1)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, 3 methods, results *_quick.*")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in the results file")
    p.add_argument("--mnist-epochs", type=int, default=5)
    p.add_argument("--cifar-teacher", default=CIFAR_TEACHER, help="the zoo teacher (an entry trained by bsnn run)")
    p.add_argument("--cifar-student", default=None,
                   help="student architecture (default: the teacher's, at --cifar-width); another registered one runs "
                        "at its defaults, results in distillation_cifar10_<teacher>_<student>.*")
    p.add_argument("--cifar-width", type=int, default=32, help="student plain_vgg8 width")
    p.add_argument("--cifar-train", type=int, default=10000, help="first images of the teacher's training split")
    p.add_argument("--cifar-epochs", type=int, default=3)
    p.add_argument("--cifar-val", type=int, default=2000, help="first validation images (epoch selection)")
    p.add_argument("--cifar-test", type=int, default=10000, help="first test images (accuracy, fidelity)")
    p.add_argument("--snn-test", "--snn-samples", dest="snn_test", type=int, default=500,
                   help="first test images simulated per student")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="benchmarks/cache")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    names = args.datasets.split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}: use {', '.join(SUITES)}")
    out = ROOT / args.out
    for name in names:
        suite = SUITES[name]
        methods = args.methods.split(",") if args.methods else suite.default_methods(args.quick)
        for m in methods:
            METHODS.get(m)  # unknown names fail before any training, listing the valid ones
        if name == "cifar10":
            check_cifar_methods(methods)
        ctx = suite.prepare(args)
        if ctx is None:
            continue
        ctx["snn_samples"] = 100 if args.quick else args.snn_test
        stem = suite.stem + ctx.get("stem_suffix", "") + ("_quick" if args.quick else "")
        payload = load_payload(out / f"{stem}.json", args.fresh, suite.recipe, ctx.get("settings"))
        # the table lists every method with results in the file (runs resume across invocations), in the suite's order
        present = {r["method"] for r in payload.get("datasets", {}).get(name, {}).get("runs", [])} | set(methods)
        order = [*suite.default_methods(False), *methods, *sorted(present)]
        listed = [m for i, m in enumerate(order) if m in present and m not in order[:i]]
        history = payload.get("commands") or ([payload["command"]] if payload.get("command") else [])
        payload.update({"command": command_line(), "machine": machine_info(), "methods": listed,
                        "seeds": sorted(set(payload.get("seeds", [])) | set(seeds)),
                        "commands": [*[c for c in history if c != command_line()], command_line()],
                        "snn_samples": payload.get("snn_samples", {})})
        payload.setdefault("started", now_iso())
        payload.setdefault("datasets", {})

        def save() -> None:
            payload["updated"] = now_iso()
            payload["machine"]["load_average_at_end"] = load_average()
            write_results(out, stem, payload, suite.markdown(payload))

        d = payload["datasets"].setdefault(name, {"runs": []})
        d["info"] = ctx["info"]
        payload["snn_samples"][name] = ctx["snn_samples"] if name == "mnist5k" else ctx["info"]["snn_samples"]
        done = {(r["method"], r["seed"]) for r in d["runs"] if "error" not in r}
        d["runs"] = [r for r in d["runs"] if "error" not in r]
        for seed in seeds:
            for method in methods:
                if (method, seed) in done:
                    continue
                log(f"{name}: {method} seed {seed}")
                try:
                    r = suite.run(ctx, method, seed)
                    log(suite.log_line(r))
                except TeacherChanged:
                    raise
                except Exception as e:  # keep going; the failure is reported in the table
                    traceback.print_exc()
                    r = {"method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                d["runs"].append(r)
                save()
        save()
        log(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
