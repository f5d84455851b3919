"""The architecture's rules, checked on the source (docs/architecture.md): `core/` never imports `agent/`, no
import cycle between modules (also not under TYPE_CHECKING), no folder of core/ or agent/ with more than 15
modules, no class over 250 lines, no function over 60, and every module named in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "agent")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path], name: str | None = None) -> set[str]:
    """The project modules `path` imports: absolute and relative `from` imports (resolved against the
    module `name`), `import x.y`, and `importlib.import_module("x.y")` / `__import__("x.y")` with a literal."""
    found = set()
    package = (name or "").split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or node.level):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z: relative to this module's package
                anchor = package[: len(package) - node.level + 1] if node.level > 1 else package
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                node.args[0].value, str):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if called in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return {m for m in found if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v] - {v}:
            if w not in index:
                visit(w)
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_and_the_method_never_imports_the_daemon() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules, m) for m, p in modules.items()}
    assert _cycles(graph) == []
    assert not [(m, d) for m, deps in graph.items() if m.startswith("core") for d in deps if d.startswith("agent")]


def test_a_cycle_is_found_when_there_is_one(tmp_path: Path) -> None:
    """The check above can fail: two modules importing each other make one cycle, also when one of the
    imports is relative or goes through importlib."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    pkg = tmp_path / "agent" / "part"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from . import two\n")
    (pkg / "two.py").write_text("import importlib\nx = importlib.import_module('agent.part.one')\n")
    (tmp_path / "agent" / "three.py").write_text("from .part.one import thing\n")
    modules = {"agent.part": pkg / "__init__.py", "agent.part.one": pkg / "one.py", "agent.part.two": pkg / "two.py",
               "agent.three": tmp_path / "agent" / "three.py"}
    graph = {m: _imports(p, modules, m) for m, p in modules.items()}
    assert graph["agent.part.one"] == {"agent.part.two"} and graph["agent.part.two"] == {"agent.part.one"}
    assert graph["agent.three"] == {"agent.part.one"}
    assert _cycles(graph) == [["agent.part.one", "agent.part.two"]]


def test_no_folder_over_15_modules() -> None:
    folders = {p.parent for p in _modules().values()}
    sizes = {str(f.relative_to(ROOT)): len(list(f.glob("*.py"))) for f in folders}
    assert {f: n for f, n in sizes.items() if n > 15} == {}


def test_no_class_over_250_lines_and_no_function_over_60() -> None:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > 250:
                long.append((name, node.name, lines))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > 60:
                long.append((name, node.name, lines))
    assert long == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_module_is_named_in_the_architecture_page(pkg: str) -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in (ROOT / pkg).rglob("*.py"):
        rel = path.relative_to(ROOT / pkg).as_posix()
        if path.name == "__init__.py" and len(ast.parse(path.read_text()).body) <= 1:
            continue  # a package marker: its docstring only
        if rel not in page:
            missing.append(rel)
    assert missing == []
