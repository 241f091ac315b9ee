"""The import graph: every module imports on its own (in any order, as zeroconf's
test_circular_imports checks), and no two modules import each other at module level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "client")


def modules() -> list[str]:
    return sorted(f"modelpeer.{p}.{f.stem}" for p in PACKAGES for f in (ROOT / p).glob("*.py")
                  if f.stem != "__main__")


def module_level_imports(package: str, path: Path) -> set[str]:
    """The sibling modules a file imports when it is imported (not under TYPE_CHECKING, not
    inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found.update(n.split(".")[0] for n in names)
    return {f"{package}.{n}" for n in found}


def test_no_two_modules_import_each_other() -> None:
    graph = {f"{p}.{f.stem}": module_level_imports(p, f)
             for p in PACKAGES for f in (ROOT / p).glob("*.py")}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "import cycle: " + " -> ".join([*path[path.index(node):], node])
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    script = f"""
import importlib, sys
for name in {modules()!r}:
    for loaded in [m for m in sys.modules if m == "modelpeer" or m.startswith("modelpeer.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
