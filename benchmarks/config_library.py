"""Issue #13: bsnn's hand-written config loading vs. an omegaconf structured-config equivalent.

For a table of good and bad inputs (a YAML file plus dotted overrides), both loaders run:

* **bsnn**: ``bsnn.config.load_config(path, overrides)`` (hand-written YAML 1.2 loader, ``apply_overrides``,
  ``from_dict`` type coercion, ``validate()``).
* **omegaconf**: ``OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path),
  OmegaConf.from_dotlist(overrides))`` then ``OmegaConf.to_object`` (builds the dataclasses, so ``__post_init__``
  hooks run) and the same ``validate()``: the library does loading, merging, overrides and type checks, bsnn
  keeps only the range checks.

Compared per case: accepted/refused the same, resulting values equal (``Config.to_dict()``), and whether the
error message names the key and the valid keys / expected type (both messages are printed). Both loaders are
also timed (ms per load, median of repeats). Results: ``benchmarks/results/config_library.{md,json}``.

Run: ``python benchmarks/config_library.py`` (a few seconds, CPU only).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, machine_info, machine_markdown, markdown_table, now_iso, write_results  # noqa: E402

from bsnn.config import Config, load_config  # noqa: E402
from bsnn.errors import ConfigError  # noqa: E402

NAME = "config_library"

# (name, yaml text or bytes or None, overrides, expected: "ok" or "error", words a good error message names)
CASES: list[tuple[str, object, list[str], str, list[str]]] = [
    ("defaults", None, [], "ok", []),
    ("repo default.yaml", "@configs/default.yaml", [], "ok", []),
    ("nested dict override", "distill:\n  method: dkd\n", ["distill.params.beta=8"], "ok", []),
    ("flow-mapping override", "distill:\n  method: dkd\n", ["distill.params={beta: 8}"], "ok", []),
    ("nested dict in YAML", "model:\n  kwargs: {width: 2, depth: 3}\n", [], "ok", []),
    ("list override", None, ["convert.search_percentiles=[99.9,99.99,100]"], "ok", []),
    ("tuple field (betas)", "train:\n  betas: [0.8, 0.99]\n", [], "ok", []),
    ("float 1e30 (YAML 1.2)", "train:\n  lr: 1e30\n", [], "ok", []),
    ("override train.lr=1e30", None, ["train.lr=1e30"], "ok", []),
    ("float 1e-3 in YAML", "train:\n  lr: 1e-3\n", [], "ok", []),
    ("int into float field", "distill:\n  temperature: 2\n", ["distill.temperature=2"], "ok", []),
    ("Union[int,None] = 500", None, ["data.limit_train=500"], "ok", []),
    ("Union[int,None] = null", "data:\n  limit_train: 500\n", ["data.limit_train=null"], "ok", []),
    ("Union[float,None] = null", None, ["distill.temperature=null"], "ok", []),
    ("Any: convert.threshold max", None, ["convert.threshold=max"], "ok", []),
    ("Any: convert.threshold 99.9", "convert:\n  threshold: 99.9\n", [], "ok", []),
    ("Any: convert.threshold p99", None, ["convert.threshold=p99"], "ok", []),
    # ---- bad inputs
    ("unknown section", "trian:\n  epochs: 3\n", [], "error", ["trian", "train"]),
    ("unknown key", "train:\n  epoch: 3\n", [], "error", ["epoch", "epochs"]),
    ("unknown key (override)", None, ["train.lrr=0.1"], "error", ["lrr", "lr"]),
    ("unknown key, no close match", None, ["train.foo=1"], "error", ["foo", "epochs", "checkpoint_every"]),
    ("wrong type str->int", "train:\n  epochs: three\n", [], "error", ["train.epochs", "int"]),
    ("wrong type (override)", None, ["train.epochs=abc"], "error", ["train.epochs", "int"]),
    ("float into int field", None, ["train.epochs=2.5"], "error", ["train.epochs", "int"]),
    ("bool as int", "train:\n  epochs: true\n", [], "error", ["train.epochs", "int"]),
    ("int as bool", "run:\n  quiet: 1\n", [], "error", ["run.quiet", "true"]),
    ("quoted string as int", "train:\n  epochs: '3'\n", [], "error", ["train.epochs", "int"]),
    ("int into str field", None, ["model.student=123"], "error", ["model.student", "string"]),
    ("str 'yes' as bool (override)", None, ["run.quiet=on"], "ok", []),
    (".inf learning rate", "train:\n  lr: .inf\n", [], "error", ["train.lr", "finite"]),
    ("nan in float field", None, ["train.lr=.nan"], "error", ["train.lr", "finite"]),
    ("list into float field", None, ["train.lr=[1,2]"], "error", ["train.lr"]),
    ("Union[int,None] wrong", None, ["data.limit_train=many"], "error", ["data.limit_train", "int"]),
    ("Any: threshold bad", None, ["convert.threshold=median"], "error", ["convert.threshold", "max"]),
    ("section not a mapping", "train: 3\n", [], "error", ["train", "mapping"]),
    ("range: lr < 0", None, ["train.lr=-1"], "error", ["train.lr"]),
    ("malformed YAML", "train:\n  epochs: [1, 2\n", [], "error", ["YAML"]),
    ("top level a list", "- 1\n- 2\n", [], "error", ["mapping"]),
    ("binary file", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", [], "error", ["UTF-8"]),
    ("missing file", "@missing", [], "error", ["not found"]),
    ("override without =", None, ["train.epochs"], "error", ["train.epochs", "="]),
]


# ------------------------------------------------------------------------------------------ loaders
def load_bsnn(path, overrides):
    return load_config(path, overrides)


_SCHEMA = []


def load_omegaconf(path, overrides):
    from omegaconf import OmegaConf

    if not _SCHEMA:  # built once and reused (a fair implementation would cache it too)
        _SCHEMA.append(OmegaConf.structured(Config))
    parts = [_SCHEMA[0]]
    if path is not None:
        parts.append(OmegaConf.load(path))
    parts.append(OmegaConf.from_dotlist(list(overrides)))
    merged = OmegaConf.merge(*parts)
    cfg = OmegaConf.to_object(merged)
    return cfg.validate()


def _materialise(tmp: Path, i: int, text) -> str | None:
    if text is None:
        return None
    if isinstance(text, str) and text.startswith("@"):
        return str(ROOT / text[1:]) if text != "@missing" else str(tmp / "missing.yaml")
    p = tmp / f"case{i}.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return str(p)


def _run(loader, path, overrides) -> dict:
    try:
        cfg = loader(path, overrides)
        return {"status": "ok", "values": cfg.to_dict(), "error": None, "error_type": None}
    except Exception as e:  # noqa: BLE001 - we record whatever the loader raises
        return {"status": "error", "values": None, "error": " ".join(str(e).split()), "error_type": type(e).__name__}


def _names(msg: str | None, words: list[str]) -> bool:
    """The message contains every word (``[train] lr`` counts as naming ``train.lr``)."""
    if msg is None:
        return False
    msg = re.sub(r"\[(\w+)\] (\w+)", r"\1.\2 \1 \2", msg).lower()
    return all(w.lower() in msg for w in words)


def _time(loader, path, overrides, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            loader(path, overrides)
        except Exception:  # noqa: BLE001
            pass
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (name, text, overrides, expected, words) in enumerate(CASES):
            path = _materialise(tmp, i, text)
            b = _run(load_bsnn, path, overrides)
            o = _run(load_omegaconf, path, overrides)
            same_status = b["status"] == o["status"]
            same_values = (b["values"] == o["values"]) if b["status"] == o["status"] == "ok" else None
            rec = {"case": name, "yaml": text if not isinstance(text, bytes) else repr(text), "overrides": overrides,
                   "expected": expected, "words": words, "bsnn": b, "omegaconf": o, "same_status": same_status,
                   "same_values": same_values,
                   "bsnn_correct": b["status"] == expected, "omegaconf_correct": o["status"] == expected,
                   "bsnn_config_error": b["error_type"] == "ConfigError" if expected == "error" else None,
                   "omegaconf_config_error": o["error_type"] == "ConfigError" if expected == "error" else None,
                   "bsnn_msg_ok": _names(b["error"], words) if expected == "error" else None,
                   "omegaconf_msg_ok": _names(o["error"], words) if expected == "error" else None,
                   "bsnn_ms": _time(load_bsnn, path, overrides, args.repeats),
                   "omegaconf_ms": _time(load_omegaconf, path, overrides, args.repeats)}
            if b["status"] == o["status"] == "ok" and not same_values:
                diff = {s: {k: (b["values"][s][k], o["values"][s].get(k)) for k in b["values"][s]
                            if b["values"][s][k] != o["values"][s].get(k)} for s in b["values"]}
                rec["value_diff"] = {s: d for s, d in diff.items() if d}
            records.append(rec)
            print(f"== {name}: bsnn {b['status']}, omegaconf {o['status']} (expected {expected})")
            for who, r in (("bsnn", b), ("omegaconf", o)):
                if r["error"]:
                    print(f"   {who:9s} {r['error_type']}: {r['error'][:300]}")
            if rec.get("value_diff"):
                print(f"   values differ: {rec['value_diff']}")

    def mark(v):
        return "-" if v is None else ("yes" if v else "**no**")

    for r in records:
        rows.append([r["case"], r["expected"], r["bsnn"]["status"] + ("" if r["bsnn_correct"] else " **(wrong)**"),
                     r["omegaconf"]["status"] + ("" if r["omegaconf_correct"] else " **(wrong)**"),
                     mark(r["same_values"]), mark(r["bsnn_msg_ok"]), mark(r["omegaconf_msg_ok"]),
                     mark(r["bsnn_config_error"]), mark(r["omegaconf_config_error"]),
                     f"{r['bsnn_ms']:.2f}", f"{r['omegaconf_ms']:.2f}"])
    summary = {
        "cases": len(records),
        "bsnn_correct": sum(r["bsnn_correct"] for r in records),
        "omegaconf_correct": sum(r["omegaconf_correct"] for r in records),
        "values_differ": [r["case"] for r in records if r["same_values"] is False],
        "bsnn_msg_ok": sum(bool(r["bsnn_msg_ok"]) for r in records if r["expected"] == "error"),
        "omegaconf_msg_ok": sum(bool(r["omegaconf_msg_ok"]) for r in records if r["expected"] == "error"),
        "bad_cases": sum(r["expected"] == "error" for r in records),
        "omegaconf_wrong": [r["case"] for r in records if not r["omegaconf_correct"]],
        "omegaconf_not_config_error": [r["case"] for r in records if r["omegaconf_config_error"] is False],
        "omegaconf_msg_worse": [r["case"] for r in records if r["expected"] == "error" and r["bsnn_msg_ok"]
                                and not r["omegaconf_msg_ok"]],
        "bsnn_median_ms": statistics.median(r["bsnn_ms"] for r in records),
        "omegaconf_median_ms": statistics.median(r["omegaconf_ms"] for r in records),
    }
    payload = {"command": command_line(), "machine": machine_info(extra_packages=("omegaconf", "PyYAML")),
               "started": now_iso(), "repeats": args.repeats, "summary": summary, "records": records}
    msgs = "\n".join(f"* **{r['case']}**\n  * bsnn: `{r['bsnn']['error']}`\n  * omegaconf: "
                     f"`{r['omegaconf']['error']}`" for r in records if r["expected"] == "error"
                     or r["bsnn"]["error"] or r["omegaconf"]["error"])
    diffs = "\n".join(f"* **{r['case']}**: {r['value_diff']}" for r in records if r.get("value_diff")) or "none"
    md = f"""# Config loading: hand-written (bsnn) vs. omegaconf structured configs

Command: `{payload['command']}`

Machine: {machine_markdown(payload['machine'])} omegaconf {payload['machine'].get('omegaconf')},
PyYAML {payload['machine'].get('PyYAML')}.

Each case is a YAML file and/or dotted overrides; *bsnn* is `load_config(path, overrides)`, *omegaconf* is
`OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path), OmegaConf.from_dotlist(overrides))` then
`OmegaConf.to_object(...)` and the same `validate()`. "msg names key" = the error message contains the key and
the valid keys / expected type (the words listed in `CASES`); "ConfigError" = the error is bsnn's
`ConfigError` (what the CLI reports as one line). Times: median ms per load over {args.repeats} loads.

Summary: correct accept/refuse bsnn {summary['bsnn_correct']}/{summary['cases']}, omegaconf
{summary['omegaconf_correct']}/{summary['cases']}; good messages on the {summary['bad_cases']} bad inputs bsnn
{summary['bsnn_msg_ok']}, omegaconf {summary['omegaconf_msg_ok']}; median load bsnn
{summary['bsnn_median_ms']:.2f} ms, omegaconf {summary['omegaconf_median_ms']:.2f} ms.
omegaconf wrong on: {', '.join(summary['omegaconf_wrong']) or 'none'}. omegaconf message worse on:
{', '.join(summary['omegaconf_msg_worse']) or 'none'}. omegaconf raises something other than `ConfigError`
(which the CLI turns into a one-line message) on: {', '.join(summary['omegaconf_not_config_error']) or 'none'}.

{markdown_table(['case', 'expected', 'bsnn', 'omegaconf', 'same values', 'bsnn msg names key',
                 'omegaconf msg names key',
                 'bsnn ConfigError', 'omegaconf ConfigError', 'bsnn ms', 'omegaconf ms'], rows)}

## Values that differ (bsnn, omegaconf)

{diffs}

## Error messages

{msgs}
"""
    paths = write_results(ROOT / args.out, NAME, payload, md)
    print(f"wrote {paths['md']} and {paths['json']}")


if __name__ == "__main__":
    main()
