"""The import graph of hybridlm: no circle, and no import from a lower layer to an upper one.

Every module under hybridlm/ is parsed with ``ast`` (nothing is imported). An edge is an import
statement naming another hybridlm module: at module level, or inside a function or class (a lazy
import is still a dependency). ``from package import name`` is an edge to the submodule ``name``
when that is a module, else to the package. Importing ``hybridlm.a.b`` also runs the
``__init__`` of ``hybridlm.a``; those implicit edges are not counted (every package that
re-exports its submodules would otherwise be a circle).

Layers, lowest first (a module may import its own layer and the layers below it):

    errors, tokenizer
    layouts
    kernels
    blocks
    builder.model
    builder.inference, builder.io, the builder package, the hybridlm package
    eval, titan
    studies
    cli, __main__
    testing

The ``hybridlm`` package (``hybridlm/__init__.py``) is a facade that re-exports names from
layouts, builder and builder.io lazily (by name, through ``_EXPORTS``); its edges are those names'
modules, so it sits with the highest of them, and ``from hybridlm import X`` is an edge to it.
``hybridlm.builder``'s ``__init__`` likewise re-exports builder.model and builder.inference.
``__main__`` only runs the CLI. ``testing`` holds helpers for the tests: nothing in the library
imports it, so it may use every layer, and sitting on top makes any library import of it a
violation.

The circle check uses module-level imports only (function-level imports run after every module
has loaded, and ``if TYPE_CHECKING:`` imports never run); the layer check uses every import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hybridlm"

LAYERS: list[tuple[str, ...]] = [
    ("hybridlm.errors", "hybridlm.tokenizer"),
    ("hybridlm.layouts",),
    ("hybridlm.kernels",),
    ("hybridlm.blocks",),
    ("hybridlm.builder.model",),
    ("hybridlm.builder.inference", "hybridlm.builder.io", "=hybridlm.builder", "=hybridlm"),
    ("hybridlm.eval", "hybridlm.titan"),
    ("hybridlm.studies",),
    ("hybridlm.cli", "hybridlm.__main__"),
    ("hybridlm.testing",),
]

# (importer, imported) -> why this upward edge is deliberate. Every entry must still occur.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("hybridlm.builder.model.hybrid_lm", "hybridlm.builder.inference.cache"):
        "HybridLM.allocate_cache builds the inference cache (a lazy import; the type hint is TYPE_CHECKING only)",
    ("hybridlm.builder.model.hybrid_lm", "hybridlm.builder.inference.generate"):
        "HybridLM.generate is the model's convenience entry to inference (a lazy import)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix ("=name" matches that module only)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix.startswith("=")
            prefix = prefix.lstrip("=")
            hit = module == prefix if exact else (module == prefix or module.startswith(prefix + "."))
            if hit and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


class Edge:
    def __init__(self, src: str, dst: str, line: int, module_level: bool):
        self.src, self.dst, self.line, self.module_level = src, dst, line, module_level

    def __repr__(self) -> str:
        return f"{self.src} -> {self.dst} (line {self.line}{'' if self.module_level else ', lazy'})"


def _resolve(src: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = src.split(".") if is_package else src.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _facade_targets(tree: ast.Module) -> list[tuple[str, int]]:
    """The modules behind hybridlm/__init__.py's lazy ``_EXPORTS`` table."""
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
                table = ast.literal_eval(node.value)
                return [(target.partition(":")[0], node.lineno) for target in table.values()]
    return []


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def edges_of(src: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Edge] = []

    def add(target: str, line: int, module_level: bool) -> None:
        if target == src or not (target == "hybridlm" or target.startswith("hybridlm.")):
            return
        while target not in modules and "." in target:  # hybridlm.x.Name -> hybridlm.x
            target = target.rsplit(".", 1)[0]
        if target in modules and target != src:
            found.append(Edge(src, target, line, module_level))

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, module_level)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(src, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno, module_level)
        for child in ast.iter_child_nodes(node):
            lazy = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(node, ast.If) and _is_type_checking(node))
            visit(child, module_level and not lazy)

    visit(tree, True)
    if src == "hybridlm":
        found += [Edge(src, t, line, False) for t, line in _facade_targets(tree)]
    return found


def import_graph() -> list[Edge]:
    modules = all_modules()
    return [e for name, path in modules.items() for e in edges_of(name, path, modules)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def upward_edges(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if layer_of(e.dst) > layer_of(e.src)]


# -- the tests --------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_no_import_circle_at_module_level():
    graph: dict[str, set[str]] = {}
    for e in import_graph():
        if e.module_level:
            graph.setdefault(e.src, set()).add(e.dst)
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import circle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_an_upper_one():
    bad = [e for e in upward_edges(import_graph()) if (e.src, e.dst) not in ALLOWED_UPWARD]
    report = "\n".join(f"  {all_modules()[e.src].relative_to(ROOT.parent)}:{e.line}: {e}" for e in bad)
    assert not bad, f"imports from a lower layer to an upper one:\n{report}"


def test_allowed_upward_edges_still_exist():
    """An exception that no longer occurs must leave the list, so the list stays the truth."""
    present = {(e.src, e.dst) for e in upward_edges(import_graph())}
    stale = sorted(set(ALLOWED_UPWARD) - present)
    assert not stale, f"ALLOWED_UPWARD lists edges that no longer exist: {stale}"


# -- the checker itself can fail ----------------------------------------------------------------------
def test_checker_sees_circles_lazy_imports_and_upward_edges(tmp_path):
    pkg = tmp_path / "hybridlm"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from hybridlm.layouts import spec\n")
    (pkg / "layouts.py").write_text("import hybridlm.errors\n")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "k.py").write_text("def f():\n    from hybridlm.blocks import Thing\n")
    (pkg / "blocks.py").write_text("from .kernels import k\n")
    global ROOT
    saved, ROOT = ROOT, pkg
    try:
        edges = import_graph()
    finally:
        ROOT = saved
    pairs = {(e.src, e.dst, e.module_level) for e in edges}
    assert ("hybridlm.kernels.k", "hybridlm.blocks", False) in pairs  # lazy import counted
    assert ("hybridlm.blocks", "hybridlm.kernels.k", True) in pairs  # relative import resolved
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.module_level:
            graph.setdefault(e.src, set()).add(e.dst)
    assert find_cycle(graph) in (["hybridlm.errors", "hybridlm.layouts", "hybridlm.errors"],
                                 ["hybridlm.layouts", "hybridlm.errors", "hybridlm.layouts"])
    up = {(e.src, e.dst) for e in upward_edges(edges)}
    assert up == {("hybridlm.errors", "hybridlm.layouts"), ("hybridlm.kernels.k", "hybridlm.blocks")}


@pytest.mark.parametrize("module, layer", [("hybridlm.builder", 5), ("hybridlm.builder.model.build", 4),
                                           ("hybridlm.kernels.mamba3.oracle", 2), ("hybridlm", 5)])
def test_layer_lookup_takes_the_longest_prefix(module, layer):
    assert layer_of(module) == layer
