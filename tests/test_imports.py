"""No import cycles among picoalign's modules, lazy imports included.

The graph is read from the source (every `import` statement, at module level or inside a
function), so a cycle cannot hide behind an import moved into a function body. A cycle that
is broken only by import order shows up when a module of it is the first one imported, which
the fresh-interpreter test does for the modules that once formed cycles.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `src`."""
    out = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported_modules(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `file` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
            # `from pkg import mod` imports the submodule; `from mod import name`, the module
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    found.discard(name)
    return found


def import_cycles(src: Path, package: str) -> list[list[str]]:
    """Every cycle of the import graph, each as the modules on it (strongly connected components)."""
    modules = module_files(src, package)
    graph = {name: imported_modules(name, f, modules) for name, f in modules.items()}
    order, low, stack, cycles = {}, {}, [], []

    def visit(v: str) -> None:  # Tarjan's algorithm
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return cycles


def test_picoalign_has_no_import_cycle():
    assert import_cycles(SRC, "picoalign") == []


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("import pkg.a\n\ndef g():\n    return 1\n")
    (pkg / "d.py").write_text("from pkg.a import b\n")  # imports into the cycle: not on it
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.c", "pkg.sub.b"]]


@pytest.mark.parametrize("module", ["picoalign.config", "picoalign.models.pico", "picoalign.data.judge",
                                    "picoalign.data.llm_rows", "picoalign.report.plots",
                                    "picoalign.report.sections"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert done.returncode == 0, done.stderr
