"""The package's import graph: no cycle (function-local imports included) and no module importing
a private name of another."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sande_fast": ROOT / "sande_fast", "sande_fast.kernels": ROOT / "sande_fast" / "kernels"}
# Compiled modules (C++): imported as submodules, never import anything of the package.
EXTENSIONS = {"_planner"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.glob("*.py")):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            out[name] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """``(module, [names])`` of every import that runs in the file (function-local ones too),
    relative ones resolved."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under ``if TYPE_CHECKING:`` never run; they are for annotations only.
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for mod, names in _imports(name, path):
            # "from pkg import sub" imports the submodule; any other name comes from pkg itself.
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods or n in EXTENSIONS]
            targets = subs + ([mod] if len(subs) < max(len(names), 1) else [])
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    # The root package is the entry point (it imports what it exports); no module imports it.
    inner = {n: {m for m in deps if m != "sande_fast"} for n, deps in graph.items()}
    assert _cycle(inner) is None, " -> ".join(_cycle(inner) or [])
    for n, deps in graph.items():
        if n != "sande_fast":
            assert "sande_fast" not in deps, f"{n} imports the package root"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_a_private_name_of_another() -> None:
    mods = _modules()
    bad = []
    for name, path in mods.items():
        for mod, names in _imports(name, path):
            if mod.startswith("sande_fast") and mod != name:
                bad += [f"{name}: from {mod} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    # The compiled planner is the C++ half of planner.py and is only imported there.
    bad = [b for b in bad if "import _planner" not in b or not b.startswith("sande_fast.planner")]
    assert not bad, bad


def test_every_module_imports_on_its_own() -> None:
    code = ("import importlib, sys\n"
            f"for m in {sorted(m for m in _modules() if not m.endswith('__main__'))!r}:\n"
            "    for k in [k for k in sys.modules if k.startswith('sande_fast')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(m)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
