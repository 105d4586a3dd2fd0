"""The runtime's modules import each other one way only, and `Agent` knows no runtime module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gatewayd" / "agents"
PREFIX = "gatewayd.agents."


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (type-checking-only imports included)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PREFIX):
                deps.add((node.module or "").removeprefix(PREFIX))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            else:
                visit(dep, [*path, dep])

    for module in sorted(graph):
        visit(module, [module])
    return found


def test_no_import_cycles_in_the_agents_package() -> None:
    assert _cycles(_imports()) == []


def test_agent_and_connection_import_no_runtime_module() -> None:
    runtime_modules = {"runtime", "scheduler", "batch", "turn", "rpc", "registry", "slot", "alarms"}
    graph = _imports()
    assert graph["agent"] & runtime_modules == set()
    assert graph["connection"] & runtime_modules == set()


def test_agent_calls_no_private_runtime_method() -> None:
    source = (PACKAGE / "agent.py").read_text(encoding="utf-8")
    assert "_gw_runtime" not in source and "_gw_slot" not in source


def test_the_agents_package_never_imports_the_daemon_assembly() -> None:
    forbidden = ("gatewayd.daemon", "gatewayd.wiring", "gatewayd.config", "gatewayd.cli")
    offenders = {}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(forbidden):
                offenders[path.name] = node.module
    assert offenders == {}
