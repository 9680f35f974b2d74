"""Benchmark: a binary-weight student distilled by every registered method from the same teacher.

For each dataset (mnist5k; CIFAR-10 from ``../shared/data/cifar10.npz`` when present) and each seed, every method
trains the same binary-weight student (first/last layer full precision) under the same fixed budget from the
same frozen full-precision teacher; the test accuracy is taken after every epoch (last and best epoch reported),
then the student is converted with the default conversion recipe (``configs/default.yaml``: p99.9 thresholds,
θ/2 shift, bias calibration) and simulated to T = 32 (accuracy at T = 8 and 32).

Every method runs with the defaults a user gets: ``DistillConfig(method=m)`` with no temperature, weight or
``params`` override (None = the method's published value: KD CE 0.1 / KD 0.9 / T 4, DKD α 1 β 8 T 4, NKD T 3
γ 3.5, DML T 1, ...; the resolved values are recorded per run and tabulated), and epoch-based schedules fitted to
the run by :func:`bsnn.pipeline.fit_schedules`, as the pipeline does (DKD's warm-up 20/240 of the epochs,
CA-MKD's feature-term delay 1/240; CRD's ``nce_k`` is capped at the training-set size by the method itself).

Multi-model methods: the teacher assistant (a smaller full-precision model) is trained once (cached, seed 0) by
the first step of the TAKD chain, :func:`bsnn.pipeline.takd_chain` (TAKD's loss from the teacher); ``takd``
then trains the student by the ``takd`` method from the chain ``[teacher, assistant]`` (it distils from the
last model: the chain's last step); ``ca_mkd`` gets ``[teacher, assistant]`` as its two teachers; ``bd_kd``
gets a freshly initialised copy of the teacher architecture (seeded like the student) that it trains online
with the student, as the method's docstring and the pipeline do (the paper trains both from scratch; the
online teacher's final test accuracy is recorded); ``dml`` trains the student with one re-initialised peer
(no teacher); ``ce``, ``tf_nkd``, ``zipf_ls`` and ``bake`` are teacher-free.

Runs are ordered seed-major (all methods for seed 0, then seed 1, ...) and the results file is rewritten after
every run; an interrupted benchmark resumes where it stopped (``--fresh`` starts over).

Usage::

    python benchmarks/distillation.py                                # mnist5k + CIFAR-10, 3 seeds, every method
    python benchmarks/distillation.py --datasets mnist5k --seeds 0   # one seed
    nice -n 15 python benchmarks/distillation.py --datasets mnist5k --threads 1 --fresh   # the committed table
    python benchmarks/distillation.py --quick                        # smoke run (tiny budgets, 3 methods)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Timer, command_line, load_average, log, machine_info, machine_markdown,  # noqa: E402
                     markdown_table, now_iso, write_results)

from bsnn.config import BinaryConfig, DataConfig, DistillConfig, SimConfig, TrainConfig, load_config  # noqa: E402
from bsnn.convert import convert  # noqa: E402
from bsnn.data import build_loaders, calibration_loader  # noqa: E402
from bsnn.distill import METHODS, list_methods  # noqa: E402
from bsnn.pipeline import build_model, fit_schedules, load_model, save_model, takd_chain  # noqa: E402
from bsnn.simulate import simulate  # noqa: E402
from bsnn.train import evaluate, set_seed, train_student, train_teacher  # noqa: E402

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


def prepare(name: str, args) -> dict | None:
    """Loaders, teacher, assistant, student architecture and training budget of one dataset."""
    cache = ROOT / args.cache
    if name == "mnist5k":
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
    elif name == "cifar10":
        npz = Path(args.cifar_npz)
        npz = npz if npz.is_absolute() else ROOT / npz
        if not npz.is_file():
            log(f"cifar10: {npz} not found, skipping (the archive lives in ../shared/data/ on project machines)")
            return None
        n_train = 500 if args.quick else args.cifar_train
        dcfg = DataConfig(name=f"npz:{npz}", batch_size=128, eval_batch_size=500, val_fraction=0.0, augment=True,
                          limit_train=n_train, seed=0)
        loaders = build_loaders(dcfg, seed=0)
        s = loaders.splits
        base = {"num_classes": s.num_classes, "in_channels": s.in_channels}
        t_arch = {**base, "name": "vgg7_cifar", "kwargs": {"width": 0.25, "hidden": 256}, "binary": None}
        a_arch = {**base, "name": "vgg7_cifar", "kwargs": {"width": 0.125, "hidden": 128}, "binary": None}
        s_arch = {**t_arch, "binary": dataclasses.asdict(BinaryConfig())}
        t_cfg = TrainConfig(epochs=1 if args.quick else args.cifar_teacher_epochs, optimizer="adam", lr=2e-3,
                            weight_decay=5e-4, schedule="cosine")
        s_cfg = TrainConfig(epochs=1 if args.quick else args.cifar_epochs, optimizer="adam", lr=2e-3,
                            weight_decay=0.0, schedule="cosine")
        budget = (f"{s_cfg.epochs} epochs x {len(s.train)} images (seeded subset of the 50000 training images), "
                  "batch 128, random crop + flip, Adam lr 0.002 cosine")
        n_test = 200 if args.quick else args.cifar_test
        tag = f"cifar10_n{len(s.train)}" + ("_quick" if args.quick else "")
    else:
        raise SystemExit(f"unknown dataset {name!r}: use mnist5k or cifar10")
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


def run_one(ctx: dict, method: str, seed: int, snn_samples: int) -> dict:
    """Train one student by ``method`` with ``seed``; return accuracies, SNN accuracies and times."""
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


def _ms(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary_rows(runs: list[dict], methods: list[str]) -> list[list]:
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m and "error" not in r]
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
        rs = [r for r in runs if r["method"] == m and "error" not in r and "resolved" in r]
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


def build_markdown(payload: dict) -> str:
    lines = ["# Distillation methods for binary-weight students", "",
             f"Machine: {machine_markdown(payload['machine'])}", "",
             f"Command: `{payload['command']}` (started {payload['started']}, last update {payload['updated']}).", "",
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
        lines += ["CIFAR-10 was not re-run with these defaults. The earlier CIFAR-10 table (commit 6311ac8: "
                  "temperature 4 for every method, DKD warm-up 1 epoch, `takd` run as `kd` from a KD-trained "
                  "assistant, non-published KD weights) is not comparable and is left out here; see "
                  "`git show 6311ac8:benchmarks/results/distillation.md`.", ""]
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="mnist5k,cifar10")
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, tiny subsets, ce/kd/dkd only")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in the results file")
    p.add_argument("--mnist-epochs", type=int, default=5)
    p.add_argument("--cifar-npz", default="../shared/data/cifar10.npz")
    p.add_argument("--cifar-train", type=int, default=4000)
    p.add_argument("--cifar-epochs", type=int, default=3)
    p.add_argument("--cifar-teacher-epochs", type=int, default=8)
    p.add_argument("--cifar-test", type=int, default=1000)
    p.add_argument("--snn-samples", type=int, default=500, help="test images simulated per student")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="benchmarks/cache")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = (args.methods.split(",") if args.methods else
               (["ce", "kd", "dkd"] if args.quick else [m for m in list_methods()]))
    seeds = [int(s) for s in args.seeds.split(",")]
    stem = NAME + ("_quick" if args.quick else "")
    out = ROOT / args.out
    old = out / f"{stem}.json"
    payload = json.loads(old.read_text()) if old.is_file() and not args.fresh else {}
    if payload and payload.get("recipe") != RECIPE:
        log(f"{_rel(old)} holds another recipe ({payload.get('recipe', 'pre-published-defaults')}); "
            "starting over")
        payload = {}
    payload["recipe"] = RECIPE
    payload.update({"command": command_line(), "machine": machine_info(), "methods": methods, "seeds": seeds,
                    "snn_samples": payload.get("snn_samples", {})})
    payload.setdefault("started", now_iso())
    payload.setdefault("datasets", {})

    def save() -> None:
        payload["updated"] = now_iso()
        payload["machine"]["load_average_at_end"] = load_average()
        write_results(out, stem, payload, build_markdown(payload))

    for name in args.datasets.split(","):
        ctx = prepare(name, args)
        if ctx is None:
            continue
        d = payload["datasets"].setdefault(name, {"runs": []})
        d["info"] = ctx["info"]
        payload["snn_samples"][name] = 100 if args.quick else args.snn_samples
        done = {(r["method"], r["seed"]) for r in d["runs"] if "error" not in r}
        d["runs"] = [r for r in d["runs"] if "error" not in r]
        for seed in seeds:
            for method in methods:
                if (method, seed) in done:
                    continue
                log(f"{name}: {method} seed {seed}")
                try:
                    r = run_one(ctx, method, seed, 100 if args.quick else args.snn_samples)
                    log(f"  last {r['last']:.2f} best {r['best']:.2f} SNN T=8 {r['snn']['8']:.2f} "
                        f"T=32 {r['snn']['32']:.2f} ({r['train_time_s']:.0f} s)")
                except Exception as e:  # keep going; the failure is reported in the table
                    traceback.print_exc()
                    r = {"method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                d["runs"].append(r)
                save()
    save()
    log(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
