"""The catalogue of registered distillation methods, generated from the classes themselves.

Every row comes from one registered class: its paper from the first paragraph of its docstring, the repository its
code follows from the docstring, and its defaults from its ``default_*``, ``param_defaults`` and
``schedule_defaults`` attributes. ``docs/distillation.md`` embeds :func:`method_table_markdown` (a test keeps the two
equal) and ``bsnn distill --list-methods`` prints it.

Docstring conventions the parsers read:

* paper: the first paragraph starts ``<method name> (<authors> [venue] <year>...``, e.g.
  ``Decoupled KD (Zhao 2022): ...``; the citation runs to the first year inside the parentheses;
* code: a GitHub repository ``owner/name`` (owner: letters, digits and hyphens; not a file path: no ``/`` after
  it, no file extension such as ``.py``), e.g. ``Authors' code: megvii-research/mdistiller`` or ``as
  HobbitLong/RepDistiller runs it``: the first one right after the word "code", else the first one anywhere
  (:func:`code_reference`); a docstring without one that says "no authors' code" shows ``none``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import bsnn.distill.methods  # noqa: F401  (registers every method)
from bsnn.distill.base import METHODS
from bsnn.errors import ConfigError
from bsnn.report import markdown_table

# owner: GitHub's rule (letters, digits, single hyphens, <= 39 characters); name: letters, digits, '.', '_', '-'.
_REPO = re.compile(r"(?<![\w./-])([A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]+)(?![\w/])")
_FILE_EXT = re.compile(r"\.(py|pyx|sh|ya?ml|json|md|txt|cfg|ini|prototxt|ipynb|c|cc|cpp|cu|h)$", re.IGNORECASE)
_CITATION = re.compile(r"^(?P<title>[^(]+?)\s*\((?P<cite>[^()]*?\b(?:19|20)\d{2}[a-z]?)\b")
_CODE_CUE = re.compile(r"\bcode(?:\s+followed)?[\s:`(]*$", re.IGNORECASE)  # "code" right before a repository
_NO_CODE = re.compile(r"no authors'? code", re.IGNORECASE)

HEADERS = ("Method", "Module", "Paper", "Code followed", "CE", "KD", "T", "Teacher", "Params (defaults)")


def _summary(doc: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def paper_reference(doc: str | None) -> str | None:
    """The method's name and citation from the first paragraph of its docstring, or None without a citation.

    Args:
        doc: a class docstring, e.g. ``"Decoupled KD (Zhao 2022): ce_weight·CE + ..."``.

    Returns:
        e.g. ``"Decoupled KD (Zhao 2022)"``: the text before the first parenthesis, then the parenthesis up to and
        including its first year (``"(Huang et al., CVPR 2021; authors' code ...)"`` -> ``"(Huang et al., CVPR
        2021)"``); None when the first paragraph cites no year in parentheses.
    """
    m = _CITATION.match(_summary(doc or ""))
    if m is None:
        return None
    title = m.group("title").strip().rstrip(",:;").strip()
    return f"{title} ({m.group('cite').strip()})" if title else None


def code_reference(doc: str | None) -> str | None:
    """The GitHub repository ``owner/name`` a docstring names as its code, or None.

    The first repository right after the word "code" (``Authors' code: owner/name``, ``Code followed: owner/name``,
    a backticked name after "authors' code") wins; without one, the first repository anywhere (``as owner/name runs
    it``). Tokens that are file paths or formulas are skipped: followed by ``/``
    (``CIFAR-100/model/reviewkd.py``), a file extension (``helper/pretrain.py``), an owner with ``_`` or ``.``
    (``distiller_zoo/KD.py``, ``z_s/T``), or a side without a letter (``1/warmup``, ``ResNet56/110``). Trailing
    sentence punctuation is dropped.
    """
    doc = doc or ""
    found = []
    for m in _REPO.finditer(doc):
        token = m.group(1).rstrip(".")
        owner, name = token.split("/", 1)
        if not name or _FILE_EXT.search(name):
            continue
        if not (re.search(r"[A-Za-z]", owner) and re.search(r"[A-Za-z]", name)):
            continue
        found.append((bool(_CODE_CUE.search(doc[:m.start()])), token))
    cued = [t for c, t in found if c]
    return cued[0] if cued else (found[0][1] if found else None)


def _teacher_kind(row: dict) -> str:
    """What the method needs as teacher, in words (the table's Teacher column)."""
    if row["trains_teacher"]:
        return "trained online"
    if row["min_teachers"] > 1:
        return f">= {row['min_teachers']} frozen"
    if row["uses_assistants"]:
        return "frozen chain (assistants)"
    return "frozen" if row["needs_teacher"] else "none"


def method_row(name: str) -> dict[str, Any]:
    """The catalogue entry of the registered method ``name`` (unknown names list the valid ones).

    Returns:
        ``{'name', 'class' (qualified), 'module' (under bsnn.distill), 'paper' (str | None), 'code' ('owner/name' |
        None), 'no_authors_code' (the docstring says no authors' code is public),
        'ce_weight', 'kd_weight', 'temperature', 'param_defaults', 'schedule_defaults', 'needs_teacher',
        'trains_teacher', 'min_teachers', 'uses_assistants', 'needs_index'}``.
    """
    cls = METHODS.get(name)
    doc = inspect.cleandoc(cls.__doc__ or "")  # the class's own docstring, never a base class's
    return {
        "name": cls.method_name or name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "module": cls.__module__.rpartition(".")[2],
        "paper": paper_reference(doc),
        "code": code_reference(doc),
        "no_authors_code": bool(_NO_CODE.search(doc)),
        "ce_weight": float(cls.default_ce_weight),
        "kd_weight": float(cls.default_kd_weight),
        "temperature": float(cls.default_temperature),
        "param_defaults": dict(cls.param_defaults),
        "schedule_defaults": dict(cls.schedule_defaults),
        "needs_teacher": bool(cls.needs_teacher),
        "trains_teacher": bool(cls.trains_teacher),
        "min_teachers": int(cls.min_teachers),
        "uses_assistants": bool(cls.uses_assistants),
        "needs_index": bool(cls.needs_index),
    }


def method_table() -> list[dict[str, Any]]:
    """One :func:`method_row` per registered method, in :func:`bsnn.distill.list_methods` order (by name)."""
    return [method_row(n) for n in METHODS.names()]


def _value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _params_cell(row: dict) -> str:
    parts = []
    for key, value in row["param_defaults"].items():
        text = f"{key}={_value(value)}"
        if value is None and key in row["schedule_defaults"]:
            published, run = row["schedule_defaults"][key]
            text += f" ({_value(float(published))} of {_value(float(run))} epochs)"
        parts.append(f"`{text}`")
    return ", ".join(parts) or "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def method_table_markdown() -> str:
    """:func:`method_table` as a markdown table (no trailing newline): what ``docs/distillation.md`` embeds between
    ``<!-- methods:begin -->`` and ``<!-- methods:end -->`` and ``bsnn distill --list-methods`` prints."""
    rows = []
    for r in method_table():
        if r["code"]:
            code = f"[{r['code']}](https://github.com/{r['code']})"
        else:
            code = "none" if r["no_authors_code"] else "—"
        rows.append([_cell(c) for c in (
            r["name"], r["module"], r["paper"] or "—", code, _value(r["ce_weight"]), _value(r["kd_weight"]),
            _value(r["temperature"]), _teacher_kind(r), _params_cell(r))])
    return markdown_table(HEADERS, rows).rstrip("\n")


BEGIN_MARKER, END_MARKER = "<!-- methods:begin -->", "<!-- methods:end -->"


def with_method_table(text: str) -> str:
    """``text`` (a markdown document) with the block between :data:`BEGIN_MARKER` and :data:`END_MARKER` (each on
    its own line) replaced by :func:`method_table_markdown`.

    Regenerate the docs with ``python -c "import pathlib; from bsnn.distill.catalog import with_method_table as w;
    p = pathlib.Path('docs/distillation.md'); p.write_text(w(p.read_text()))"``.

    Raises:
        ConfigError: the markers are missing, repeated or out of order.
    """
    begin, end = BEGIN_MARKER + "\n", "\n" + END_MARKER
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ConfigError(f"the document needs one line {BEGIN_MARKER} and, after it, one line {END_MARKER} around "
                          "the methods table; add them where the table belongs")
    head, rest = text.split(begin)
    return head + begin + method_table_markdown() + end + rest.split(end, 1)[1]
