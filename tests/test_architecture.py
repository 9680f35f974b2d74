"""One-way architecture (issue #13): the import graph of ``bsnn`` has no cycle and imports stay at module level.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import bsnn.x`` and
``from bsnn.x import y`` (``y`` may be a submodule), absolute or relative, at module level or inside a function,
is an edge from the importing module to the imported one. See ``docs/architecture.md`` for the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "bsnn"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: the one module allowed to import bsnn modules inside functions (start-up time of ``bsnn --help``)
LOCAL_IMPORTS_ALLOWED = {"bsnn.cli"}
#: optional heavy third-party packages that may be imported inside functions, and so may the bsnn modules that
#: import one of them at module level (the Triton kernel backend)
OPTIONAL_DEPS = {"triton", "matplotlib"}  # spikingjelly is a core dependency (bsnn.export subclasses its IFNode)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute name of the module an ``ImportFrom`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.AST) -> list[str]:
    """The bsnn modules an import statement loads explicitly (a parent package's ``__init__`` is not counted)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        src = _resolve(module, node)
        for a in node.names:
            sub = f"{src}.{a.name}"
            names.append(sub if sub in MODULES else src)
    out = []
    for n in names:
        if n != PACKAGE and not n.startswith(PACKAGE + "."):
            continue
        while n not in MODULES and "." in n:  # ``import bsnn.x.attr`` style: the longest module prefix
            n = n.rsplit(".", 1)[0]
        if n in MODULES:
            out.append(n)
    return out


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(target, line, local)`` for every bsnn import of ``module``; ``local`` = inside a function."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only, never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((t, child.lineno, local) for t in _targets(module, child))
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the bsnn modules it imports (module-level and function-local), self-imports dropped."""
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def optional_backends() -> set[str]:
    """bsnn modules that import an optional heavy dependency (:data:`OPTIONAL_DEPS`) at module level."""
    out = set()
    for m, path in MODULES.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n.split(".")[0] in OPTIONAL_DEPS for n in names):
                out.add(m)
    return out


def local_imports() -> list[str]:
    """``module:line -> target`` for every function-local bsnn import outside :data:`LOCAL_IMPORTS_ALLOWED`
    (an optional backend, :func:`optional_backends`, may be imported lazily like its dependency)."""
    lazy = optional_backends()
    return sorted({f"{m}:{line} -> {t}" for m in MODULES if m not in LOCAL_IMPORTS_ALLOWED
                   for t, line, local in _imports(m) if local and t not in lazy})


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"bsnn", "bsnn.cli", "bsnn.config", "bsnn.snn.kernels", "bsnn.hardware.cli"} <= set(graph)
    assert "bsnn.errors" in graph["bsnn.io"]
    assert ("bsnn.pipeline", True) in {(t, local) for t, _, local in _imports("bsnn.cli")}  # the CLI imports lazily
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_resolves_relative_and_submodule_imports():
    node = ast.parse("from . import calibrate\nfrom .graph import x\nfrom bsnn.snn import kernels").body
    assert _targets("bsnn.convert", node[0]) == ["bsnn.convert.calibrate"]
    assert _targets("bsnn.convert.balance", node[1]) == ["bsnn.convert.graph"]
    assert _targets("bsnn.pipeline", node[2]) == ["bsnn.snn.kernels"]


def test_optional_backends_are_the_triton_kernels():
    assert optional_backends() == {"bsnn.snn.kernels.triton_if", "bsnn.snn.kernels.triton_bitpack"}


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles among bsnn modules (see docs/architecture.md):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_layers_point_one_way():
    """cli -> pipeline -> stages: no library module imports the CLI, the pipeline or the public ``bsnn`` facade."""
    graph = import_graph()
    importers = {t: {m for m, ts in graph.items() if t in ts} for t in ("bsnn", "bsnn.cli", "bsnn.pipeline",
                                                                        "bsnn.hardware.cli")}
    assert importers["bsnn"] == set()
    assert importers["bsnn.cli"] <= {"bsnn.__main__"}
    assert importers["bsnn.pipeline"] <= {"bsnn.cli"}
    assert importers["bsnn.hardware.cli"] <= {"bsnn.cli"}


def test_no_function_local_bsnn_imports():
    found = local_imports()
    assert not found, ("bsnn modules imported inside functions (only bsnn.cli may; import at module level, "
                       "the layers of docs/architecture.md keep that cycle-free):\n" + "\n".join(found))


if __name__ == "__main__":  # measure: python tests/test_architecture.py
    for c in cycles(import_graph()):
        print("cycle:", " <-> ".join(c))
    for line in local_imports():
        print("local:", line)
