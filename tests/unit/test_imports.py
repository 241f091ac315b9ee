"""The import graph: every module imports on its own (in any order, as zeroconf's
test_circular_imports checks), no two modules import each other at module level, and the core
never imports the LAN."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

PACKAGES = ("daemon", "daemon/lan", "client")
# the modules that assemble the daemon (and the LAN itself) may import the LAN; no other
ASSEMBLY = {"daemon.app", "daemon.main", "daemon.control", "daemon.warmup"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def modules() -> list[str]:
    return sorted(f"modelpeer.{module_name(f)}" for p in PACKAGES
                  for f in (ROOT / p).glob("*.py") if f.stem not in ("__main__", "__init__"))


def module_level_imports(path: Path) -> set[str]:
    """The project modules a file imports when it is imported (not under TYPE_CHECKING, not
    inside functions), as dotted names without the `modelpeer.` prefix."""
    package = module_name(path).rsplit(".", 1)[0].split(".")
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[:len(package) - node.level + 1]
            if node.module:
                found.add(".".join([*base, *node.module.split(".")]))
            else:
                found.update(".".join([*base, a.name]) for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(f): module_level_imports(f) for p in PACKAGES
            for f in (ROOT / p).glob("*.py")}


def test_no_two_modules_import_each_other() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "import cycle: " + " -> ".join([*path[path.index(node):], node])
        if node in done:
            return
        for dep in sorted(edges.get(node, ())):
            visit(dep, [*path, node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])


def reachable(edges: dict[str, set[str]], module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in edges.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_core_does_not_import_the_lan() -> None:
    edges = graph()
    core = [m for m in edges if m.startswith("daemon.") and not m.startswith("daemon.lan")
            and m not in ASSEMBLY]
    assert "daemon.fetch" in core and "daemon.proxy" in core
    for module in core:
        lan = sorted(d for d in reachable(edges, module) if d.startswith("daemon.lan"))
        assert not lan, f"{module} imports {lan}: the core sees the LAN through fetch.PeerSource"


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


def test_a_node_without_a_lan_loads_neither_libtorrent_nor_zeroconf() -> None:
    script = """
import sys
import modelpeer.daemon.app
import modelpeer.daemon.proxy
loaded = [m for m in ("libtorrent", "zeroconf") if m in sys.modules]
print("loaded:", loaded)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "loaded: []", out.stdout + out.stderr[-2000:]
