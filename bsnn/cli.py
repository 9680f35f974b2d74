"""The ``bsnn`` command line: ``bsnn run|train|distill|evaluate [--config X.yaml] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bsnn.distributed import shutdown_distributed
from bsnn.errors import BsnnError

DEFAULT_CONFIG = Path("configs/default.yaml")


def _common(p: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides, e.g. train.epochs=3 data.name=digits")
    p.add_argument("--config", type=Path, default=default_config, help="YAML config (sections as in configs/)")
    p.add_argument("--out", type=str, default=None, help="run folder (overrides run.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace what this command and the later stages wrote "
                   "in --out (only bsnn's own files, by name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def _load(args: argparse.Namespace, reuse_run: bool = False):
    """The config: ``--config``, else (for commands that work on an existing run, ``reuse_run``) the run folder's
    own ``config.yaml``, else ``configs/default.yaml``; then the overrides."""
    from bsnn.config import load_config

    from bsnn.errors import ConfigError

    overrides = list(args.overrides)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: name the run folder, e.g. --out runs/my_run")
    if args.out is not None:
        overrides.append(f"run.out_dir={args.out}")
    if args.quiet:
        overrides.append("run.quiet=true")
    config = args.config
    if config is None and reuse_run and args.out is not None and (Path(args.out) / "config.yaml").is_file():
        config = Path(args.out) / "config.yaml"
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    return load_config(config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from bsnn.pipeline import run_pipeline

    cfg = _load(args)
    metrics = run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite)
    _print_summary(metrics, cfg.run.out_dir)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bsnn.pipeline import make_context, stage_teacher

    cfg = _load(args)
    with make_context(cfg, resume=args.resume, overwrite=args.overwrite) as ctx:
        stage_teacher(ctx)
        metrics = ctx.run.metrics()
    _print_summary(metrics, cfg.run.out_dir)
    return 0


def _hint(command: str, out: str) -> str:
    return f"bsnn {command} --out {out or '<run folder>'} --resume"


def cmd_distill(args: argparse.Namespace) -> int:
    if args.list_methods:
        from bsnn.distill.catalog import method_table_markdown

        print(method_table_markdown())
        return 0
    from bsnn.errors import ConfigError
    from bsnn.pipeline import TEACHER_SECTIONS, load_model, make_context, stage_student
    from bsnn.zoo import load_any

    given = [c.strip() for c in (args.select_teacher or "").split(",") if c.strip()]
    if args.select_teacher is not None and not given:
        raise ConfigError("--select-teacher needs the candidate teachers: comma-separated model files or zoo:<name>, "
                          "e.g. --select-teacher runs/a/checkpoints/teacher_epoch4.pt,runs/a/teacher.pt")
    if given and (args.teacher or args.analyze):
        raise ConfigError("--select-teacher chooses the teacher itself: leave out --teacher and --analyze")
    if args.select_epochs is not None:
        args.overrides.append(f"student.select_epochs={args.select_epochs}")
    external = args.teacher is not None or bool(given)
    cfg = _load(args, reuse_run=not external)
    if given and cfg.student.select_epochs == 0:
        cfg.student.select_epochs = 1  # the default budget of --select-teacher (recorded in config.yaml)
    if args.teacher and cfg.student.select_epochs > 0:
        raise ConfigError("student.select_epochs chooses among the run's own kept teachers; with --teacher give the "
                          "candidates instead: --select-teacher A.pt,B.pt")
    with make_context(cfg, resume=args.resume, overwrite=args.overwrite, stage="student",
                      reuse=() if external else TEACHER_SECTIONS) as ctx:
        candidates = [(c, load_any(c, ctx.device)[0]) for c in given]
        teacher = None
        if (cfg.distill.method != "ce" or args.analyze) and not given:
            if args.teacher is None:
                ctx.run.require("teacher", "teacher.pt", _hint("train", args.out))
            teacher = (load_any(args.teacher, ctx.device) if args.teacher else
                       load_model(ctx.run.path("teacher.pt"), ctx.device))[0]
        if args.analyze:
            _analyze(ctx, teacher)
            return 0
        stage_student(ctx, teacher, candidates or None)
        metrics = ctx.run.metrics()
    _print_summary(metrics, cfg.run.out_dir)
    return 0


def _analyze(ctx, teacher) -> None:
    """``bsnn distill --analyze``: the knowledge-level table (:func:`bsnn.distill.analysis.knowledge_levels`)."""
    from bsnn.distill.analysis import knowledge_levels, levels_table, table_markdown
    from bsnn.pipeline import build_model
    from bsnn.report import write_table

    cfg = ctx.cfg
    arch = ctx.arch("student")
    report = knowledge_levels(teacher, lambda: build_model(arch), ctx.loaders.train, ctx.val_loader(),
                              ctx.loaders.test, cfg.student, cfg.distill, device=ctx.device, seed=cfg.run.seed + 1,
                              quiet=cfg.run.quiet)
    headers, rows = levels_table(report)
    if ctx.env.is_main:
        write_table(ctx.run.path("knowledge_levels"), headers, rows, report)
        f = report["gain_fractions"]["test"]
        print(f"\nknowledge levels (Tang et al. 2020), {report['epochs']} epochs each, T = {report['temperature']:g}\n"
              + table_markdown(headers, rows))
        if f["universe"] is None:
            print("KD gained nothing over CE on the test split: the shares of its gain are undefined")
        else:
            print(f"shares of KD's test gain: universe {f['universe']:.3f} + domain {f['domain']:.3f} + instance "
                  f"{f['instance']:.3f} = {f['universe'] + f['domain'] + f['instance']:.3f}")
        print(f"\nrun folder: {cfg.run.out_dir} (knowledge_levels.md / .csv / .json)")


def cmd_convert(args: argparse.Namespace) -> int:
    from bsnn.errors import ConfigError

    if args.list_ops:
        from bsnn.convert.graph import supported_operations_markdown

        print(supported_operations_markdown())
        return 0
    from bsnn.pipeline import TRAINING_SECTIONS, converted_student, imported_model, make_context, stage_convert
    from bsnn.zoo import load_any

    if (args.arch is None) != (args.weights is None) or (args.arch and args.model):
        raise ConfigError("convert: give --arch and --weights together (a state-dict file of that architecture), or "
                          "--model (a bsnn model file), or neither (the run folder's student.pt, or "
                          "student_tandem.pt when tandem.enabled)")
    external = args.model is not None or args.arch is not None
    cfg = _load(args, reuse_run=not external)
    with make_context(cfg, overwrite=args.overwrite, stage="convert",
                      reuse=() if external else TRAINING_SECTIONS) as ctx:
        if args.arch is not None:
            ann, arch = imported_model(ctx, args.arch, Path(args.weights), args.num_classes)
        else:
            stage, name, command = converted_student(cfg)  # student.pt, or student_tandem.pt after tandem
            if args.model is None:
                ctx.run.require(stage, name, _hint(command, args.out))
            ann, record = load_any(args.model if args.model else ctx.run.path(name), ctx.device)
            arch = record["arch"]
        stage_convert(ctx, ann, arch, keep_ann=args.arch is not None)
        print(f"spiking network written to {ctx.run.path('snn.pt')}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from bsnn.errors import ConfigError
    from bsnn.io import model_digest
    from bsnn.pipeline import TRAINING_SECTIONS, converted_student, load_snn, log, make_context, stage_simulate
    from bsnn.zoo import is_zoo, load_any

    if args.timesteps:
        args.overrides.append(f"simulate.timesteps=[{args.timesteps}]")
    cfg = _load(args, reuse_run=args.snn is None)
    with make_context(cfg, overwrite=args.overwrite, stage="simulate",
                      reuse=TRAINING_SECTIONS if args.snn is None else ()) as ctx:
        if args.snn is None:
            ctx.run.require("convert", "snn.pt", f"bsnn convert --out {args.out or '<run folder>'}")
        snn, record = load_snn(Path(args.snn) if args.snn else ctx.run.path("snn.pt"))
        ann_path = (args.ann if is_zoo(args.ann) else Path(args.ann) if args.ann
                    else ctx.run.path(converted_student(cfg)[1]))
        if args.ann is None and not ann_path.is_file():  # converted from --arch/--weights: the imported ANN
            ann_path = ctx.run.path("ann.pt")
        ann = load_any(ann_path, ctx.device)[0] if is_zoo(ann_path) or ann_path.is_file() else None
        source = (record.get("derived_from") or {}).get("student")
        if ann is not None and source is not None and source != model_digest(ann):
            msg = (f"{ann_path} is not the network {args.snn or ctx.run.path('snn.pt')} was converted from, so it is "
                   "no reference for it")
            if args.ann is None:
                raise ConfigError(f"{msg}; run `bsnn convert --out {args.out}` again, or pass --ann")
            log.warning("%s (kept, as --ann asks)", msg)
        stage_simulate(ctx, snn, ann)
        metrics = ctx.run.metrics()
    _print_summary(metrics, cfg.run.out_dir)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bsnn.config import load_config
    from bsnn.data import build_loaders
    from bsnn.train import evaluate, resolve_device
    from bsnn.zoo import load_any

    cfg = load_config(args.config if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None),
                      list(args.overrides))
    device = resolve_device(cfg.run.device)
    model, _ = load_any(args.checkpoint, device)
    loaders = build_loaders(cfg.data, seed=cfg.run.seed)
    res = evaluate(model, getattr(loaders, args.split), device)
    print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, **res}, indent=2))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from bsnn import zoo

    if args.action == "list":
        rows = []
        for name in zoo.names():
            c = zoo.card(name)
            rows.append(f"{name:28s} {c.get('summary', '')}")
        print("\n".join(rows) if rows else "(no released models)")
        return 0
    if not args.name:
        from bsnn.errors import ConfigError

        raise ConfigError("bsnn zoo show needs a name: bsnn zoo show <name> (bsnn zoo list names them)")
    zoo.card(args.name)  # unknown names: a clear error
    print((zoo.ZOO_DIR / f"{args.name}.md").read_text())
    return 0


def _print_summary(metrics: dict, out_dir: str) -> None:
    rows = [f"| {stage} | {m['test_acc']:.2f} |" for stage, m in metrics.items()
            if isinstance(m, dict) and "test_acc" in m]
    student = metrics.get("student", {})
    if "teacher_agreement" in student:
        rows.append(f"| student: top-1 agreement with the teacher | {student['teacher_agreement']:.2f} |")
        rows.append(f"| student: KL(teacher ‖ student), nats | {student['teacher_kl']:.4f} |")
    snn = metrics.get("snn", {})
    rows += [f"| binary SNN, T={t} | {a:.2f} |" for t, a in snn.get("accuracy", {}).items()]
    if rows:
        print("\n| stage | test accuracy (%) |\n|---|---|\n" + "\n".join(rows))
    if student.get("teacher_selection"):
        from bsnn.distill.analysis import selection_table, table_markdown

        print("\nteacher selection (chosen on the validation split):\n"
              + table_markdown(*selection_table(student["teacher_selection"])))
    print(f"\nrun folder: {out_dir}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bsnn`` command."""
    parser = argparse.ArgumentParser(prog="bsnn", description="Binary spiking networks: train, distil, convert, "
                                     "simulate and cost. Configs are YAML; any key can be overridden as a.b=value.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="whole pipeline (default: configs/default.yaml)")
    _common(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("train", help="train the full-precision teacher")
    _common(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("distill", help="distil the binary-weight student from a teacher")
    _common(p)
    p.add_argument("--teacher", type=str, default=None, help="teacher model file or zoo:<name> (default: "
                   "<out>/teacher.pt)")
    p.add_argument("--list-methods", action="store_true", help="print the registered distillation methods: paper, "
                   "code followed, default weights, temperature and params (the table of docs/distillation.md)")
    p.add_argument("--select-teacher", type=str, default=None, metavar="CKPT1,CKPT2,...",
                   help="candidate teachers (model files or zoo:<name>): a short student is distilled from each and "
                   "the teacher whose student is best on validation is used (Cho & Hariharan 2019)")
    p.add_argument("--select-epochs", type=int, default=None, help="epochs of each short student of teacher "
                   "selection (student.select_epochs; default 1 with --select-teacher)")
    p.add_argument("--analyze", action="store_true", help="knowledge-level analysis (Tang et al. 2020): the "
                   "student trained by CE, universe_ls, domain_kd and kd with the same budget; writes "
                   "knowledge_levels.{md,csv,json}, no student.pt")
    p.set_defaults(fn=cmd_distill)
    p = sub.add_parser("convert", help="convert a trained ANN into a binary spiking network (snn.pt)")
    _common(p)
    p.add_argument("--model", type=str, default=None, help="ANN model file or zoo:<name> (default: "
                   "<out>/student.pt, or <out>/student_tandem.pt with tandem.enabled)")
    p.add_argument("--arch", type=str, default=None, help="architecture of --weights: a bsnn model name or "
                   "torchvision:<name> (e.g. torchvision:resnet18)")
    p.add_argument("--weights", type=str, default=None, help="your PyTorch state-dict file for --arch "
                   "(torch.save(model.state_dict(), path); loaded with weights_only, no code runs)")
    p.add_argument("--num-classes", type=int, default=None, help="classes --weights was trained for "
                   "(default: the data's)")
    p.add_argument("--list-ops", action="store_true", help="print the operations the converter supports")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("simulate", help="accuracy-vs-timesteps sweep of a converted network")
    _common(p)
    p.add_argument("--snn", type=str, default=None, help="spiking network file (default: <out>/snn.pt)")
    p.add_argument("--ann", type=str, default=None, help="source ANN for the reference line, a model file or "
                   "zoo:<name> (default: <out>/student.pt, or <out>/student_tandem.pt with tandem.enabled)")
    p.add_argument("--timesteps", type=str, default=None, help="comma-separated T values, e.g. 1,2,4,8,16,32,64")
    p.set_defaults(fn=cmd_simulate)
    from bsnn.hardware.cli import add_cost_parser

    add_cost_parser(sub)
    p = sub.add_parser("zoo", help="released models: bsnn zoo list | bsnn zoo show <name>")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", default=None)
    p.set_defaults(fn=cmd_zoo)
    p = sub.add_parser("evaluate", help="accuracy of a model file on a data split")
    p.add_argument("checkpoint", help="model file written by bsnn (teacher.pt, student.pt) or zoo:<name>")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.set_defaults(fn=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bsnn`` console script; bsnn errors print one clear line and exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:  # overrides given after options (e.g. `bsnn run --out x train.epochs=3`)
        args.overrides = list(args.overrides) + extra
    finished = False
    try:
        code = args.fn(args)
        finished = True
        return code
    except BsnnError as e:
        print(f"bsnn: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write the stages did not wrap: still one clear line, not a traceback
        where = f" {e.filename!r}" if e.filename else ""
        print(f"bsnn: error: cannot access{where}: {e.strerror or e}; check the path, its permissions and the free "
              "disk space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bsnn: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:  # a rank that failed leaves without waiting: the others may be inside another collective
        shutdown_distributed(wait=finished)


if __name__ == "__main__":
    sys.exit(main())
