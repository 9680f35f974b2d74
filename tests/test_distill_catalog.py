"""The generated catalogue of distillation methods (bsnn.distill.catalog) and docs/distillation.md.

The docs block must equal the generated table (so it cannot go stale), every registered method must have a row,
and every row must name a paper; the docstring parsers are checked on hand-written docstrings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bsnn.cli import main
from bsnn.distill import METHODS, list_methods
from bsnn.distill.catalog import (HEADERS, code_reference, method_table, method_table_markdown, paper_reference,
                                  with_method_table)
from bsnn.errors import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "distillation.md"
BEGIN, END = "<!-- methods:begin -->\n", "\n<!-- methods:end -->"
NO_PAPER = {"ce"}  # plain cross-entropy: the baseline, not a published distillation method


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row, split on pipes not escaped as ``\\|``."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


def _data_rows(markdown: str) -> list[list[str]]:
    lines = markdown.split("\n")
    assert _cells(lines[0]) == list(HEADERS)
    assert re.fullmatch(r"\|(---\|)+", lines[1]), lines[1]
    return [_cells(line) for line in lines[2:]]


def test_docs_table_is_the_generated_one():
    doc = DOC.read_text()
    assert doc.count(BEGIN) == 1 and doc.count(END) == 1, "docs/distillation.md needs the methods markers once"
    block = doc.split(BEGIN)[1].split(END)[0]
    assert block == method_table_markdown(), (
        "docs/distillation.md is stale: replace the block between the methods markers with the output of `bsnn "
        "distill --list-methods`, or run: python -c \"import pathlib; from bsnn.distill.catalog import "
        "with_method_table as w; p = pathlib.Path('docs/distillation.md'); p.write_text(w(p.read_text()))\"")
    assert with_method_table(doc) == doc


def test_with_method_table_replaces_only_the_block():
    table = method_table_markdown()
    text = f"# t\n\nintro\n{BEGIN}| old | table |\n|---|---|{END}\n\nafter\n"
    assert with_method_table(text) == f"# t\n\nintro\n{BEGIN}{table}{END}\n\nafter\n"
    assert with_method_table(with_method_table(text)) == with_method_table(text)
    for broken in ("no markers", f"{BEGIN}x{END}{BEGIN}y{END}", f"x{END}\ny\n{BEGIN}z"):
        with pytest.raises(ConfigError, match="methods:begin"):
            with_method_table(broken)


def test_every_registered_method_has_one_row_in_the_docs():
    doc = DOC.read_text()
    rows = _data_rows(doc.split(BEGIN)[1].split(END)[0])
    names = [r[0] for r in rows]
    assert names == list_methods()  # each once, in registry (name) order
    assert [r["name"] for r in method_table()] == list_methods()
    assert all(len(r) == len(HEADERS) for r in rows)  # no unescaped '|' inside a cell


def test_every_method_names_a_paper():
    rows = {r["name"]: r for r in method_table()}
    for name, row in rows.items():
        if name in NO_PAPER:
            assert row["paper"] is None and not row["needs_teacher"], name
            continue
        assert row["paper"] is not None, f"{name}: the first paragraph of its docstring cites no '(Author year)'"
        assert re.fullmatch(r".+ \([^()]*\b(19|20)\d{2}\)", row["paper"]), (name, row["paper"])
        # the paper is the start of the class's own docstring, not an inherited one
        assert " ".join(METHODS.get(name).__doc__.split()).startswith(row["paper"].split(" (")[0]), name
    doc_rows = {r[0]: r for r in _data_rows(method_table_markdown())}
    assert all(doc_rows[n][2] == rows[n]["paper"] for n in rows if n not in NO_PAPER)


def test_rows_carry_the_class_defaults_through_the_markdown():
    md = {r[0]: r for r in _data_rows(method_table_markdown())}
    rows = {r["name"]: r for r in method_table()}
    for name in list_methods():
        cls = METHODS.get(name)
        row = rows[name]
        assert row["class"] == f"{cls.__module__}.{cls.__qualname__}"
        assert row["param_defaults"] == cls.param_defaults and row["param_defaults"] is not cls.param_defaults
        assert (row["needs_teacher"], row["trains_teacher"], row["min_teachers"]) == (
            cls.needs_teacher, cls.trains_teacher, cls.min_teachers)
        ce, kd, t = (float(md[name][HEADERS.index(h)]) for h in ("CE", "KD", "T"))
        assert (ce, kd, t) == (cls.default_ce_weight, cls.default_kd_weight, cls.default_temperature), name
        params = md[name][HEADERS.index("Params (defaults)")]
        keys = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)=", params)
        assert keys == list(cls.param_defaults), name
        code = md[name][HEADERS.index("Code followed")]
        if row["code"]:
            assert code == f"[{row['code']}](https://github.com/{row['code']})"
            assert row["code"] in cls.__doc__


def test_known_rows():
    rows = {r["name"]: r for r in method_table()}
    md = {r[0]: r for r in _data_rows(method_table_markdown())}
    teacher = HEADERS.index("Teacher")
    expected = {  # code first named after "code", not the formula-like WRN/VGG, ResNet/WRN earlier or later
        "dkd": "megvii-research/mdistiller", "ft": "HobbitLong/RepDistiller", "kd": "HobbitLong/RepDistiller",
        "sakd": "zju-vipa/spot-adaptive-pytorch", "metadistil": "JetRunner/MetaDistil",
        "reviewkd": "dvlab-research/ReviewKD", "ab": "bhheo/AB_distillation", "bd_kd": None, "born_again": None,
    }
    for name, repo in expected.items():
        assert rows[name]["code"] == repo, name
    assert rows["bd_kd"]["no_authors_code"] and md["bd_kd"][HEADERS.index("Code followed")] == "none"
    assert md["takd"][teacher] == "frozen chain (assistants)"
    assert md["ca_mkd"][teacher] == ">= 2 frozen"
    assert md["switokd"][teacher] == md["bd_kd"][teacher] == "trained online"
    assert md["zipf_ls"][teacher] == "none" and md["kd"][teacher] == "frozen"
    assert rows["crd"]["needs_index"] and not rows["kd"]["needs_index"]
    # an epoch schedule left at None shows the published fraction (DKD: 20 of 240 epochs)
    assert "`warmup=None (20 of 240 epochs)`" in md["dkd"][HEADERS.index("Params (defaults)")]
    assert rows["dkd"]["schedule_defaults"] == {"warmup": (20, 240)}


@pytest.mark.parametrize("doc, paper", [
    ("Decoupled KD (Zhao 2022): ``ce_weight·CE + ...``.\n\n    More.", "Decoupled KD (Zhao 2022)"),
    ("Knowledge review (Chen et al., CVPR 2021; authors' code a/b ``x.py``): y",
     "Knowledge review (Chen et al., CVPR 2021)"),
    ("Lipschitz KD, LONDON (Shang, Duan,\n    Yan, ICCV 2021; authors' code 42Shawn/LONDON): z",
     "Lipschitz KD, LONDON (Shang, Duan, Yan, ICCV 2021)"),
    ("MIX-KD (Choi 2023, the authors' ``mixstd``): KD", "MIX-KD (Choi 2023)"),
    ("No distillation: ``ce_weight · CE`` (the baseline).", None),
    ("A method without a year (see below).\n\n    Cited (Someone 2019) only here.", None),
    ("(Nobody 2020) without a name.", None),
    (None, None),
])
def test_paper_reference_parser(doc, paper):
    assert paper_reference(doc) == paper


@pytest.mark.parametrize("doc, repo", [
    ("as luanyunteng/pytorch-be-your-own-teacher runs it (``train.py``)", "luanyunteng/pytorch-be-your-own-teacher"),
    ("PrUE (2022; authors' code ``wangshaopu/prue``): prune", "wangshaopu/prue"),
    ("``distiller_zoo/KD.py``, ``helper/pretrain.py``, ``CIFAR-100/model/reviewkd.py``; 1/warmup, z_s/T, ResNet56/110",
     None),
    ("6 for WRN/VGG. Published: T = 4. Authors' code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py``.",
     "megvii-research/mdistiller"),
    ("as HobbitLong/RepDistiller runs it; teachers ResNet/WRN", "HobbitLong/RepDistiller"),
    ("Code followed: a-b/c_d.", "a-b/c_d"),
    ("(dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``)", "dvlab-research/ReviewKD"),
    ("No authors' code is public.", None),
    (None, None),
])
def test_code_reference_parser(doc, repo):
    assert code_reference(doc) == repo


def test_cli_list_methods_prints_the_table(capsys):
    assert main(["distill", "--list-methods"]) == 0
    assert capsys.readouterr().out == method_table_markdown() + "\n"
