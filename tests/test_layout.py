"""The layout shows the design: no import cycles, a light top-level import, short modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "steerlab"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every steerlab import of every module: lazy (function-level) ones and type-only ones
    (under ``if TYPE_CHECKING``) included, since a type is a dependency too."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_cycles_between_modules():
    graph = _imports()
    # A package's __init__ re-exporting its modules is not a cycle of meaning: drop
    # package -> own-submodule edges.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_graph_counts_type_only_imports():
    """A module whose only import of another is under TYPE_CHECKING still has the edge."""
    tree = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from steerlab.core import plan\n"
    )
    path = PACKAGE / "core" / "_layout_probe.py"
    path.write_text(tree)
    try:
        assert "steerlab.core.plan" in _imports()["steerlab.core._layout_probe"]
    finally:
        path.unlink()


def test_core_knows_no_engine():
    for name, targets in _imports().items():
        if name.startswith("steerlab.core"):
            bad = {t for t in targets if not t.startswith(("steerlab.core", "steerlab._version"))}
            assert not bad, f"{name} imports {bad}"


def test_evaluation_and_serving_talk_to_engines_only_through_the_seam():
    """Neither evaluation nor serving imports an engine package (hf, vllm): they take an
    :class:`steerlab.core.engine.Engine` (the CLI, or the engine registry, starts one)."""
    engines = ("steerlab.hf", "steerlab.vllm")
    for name, targets in _imports().items():
        if name.startswith(("steerlab.evaluation", "steerlab.serving")):
            bad = {t for t in targets if t.startswith(engines)}
            assert not bad, f"{name} imports {bad}"


def test_engines_do_not_import_each_other_or_the_layers_above():
    above = ("steerlab.evaluation", "steerlab.serving", "steerlab.cli")
    for name, targets in _imports().items():
        if name.startswith("steerlab.hf"):
            bad = {t for t in targets if t.startswith(("steerlab.vllm", *above))}
            assert not bad, f"{name} imports {bad}"
        if name.startswith("steerlab.vllm"):
            bad = {t for t in targets if t.startswith(above)}
            assert not bad, f"{name} imports {bad}"


def test_importing_steerlab_loads_no_server_or_plots():
    code = (
        "import steerlab, sys; "
        "print(sorted({'fastapi', 'uvicorn', 'matplotlib'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_modules_stay_short():
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, f"{path} is over 400 lines"
