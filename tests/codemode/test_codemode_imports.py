"""What gatewayd.codemode may import: it builds on gatewayd.tools, never on chat, agents, the
daemon, engine or protocols; its worker process imports only the standard library,
py_mini_racer and the wire module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gatewayd" / "codemode"
FORBIDDEN = ("gatewayd.chat", "gatewayd.agents", "gatewayd.daemon", "engine", "protocols")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_codemode_never_imports_the_layers_above_or_beside_it() -> None:
    for path in PACKAGE.glob("*.py"):
        bad = {n for n in _imports(path) if n.startswith(FORBIDDEN)}
        assert not bad, (path.name, bad)


def test_the_worker_imports_only_the_stdlib_mini_racer_and_the_wire() -> None:
    allowed = {"py_mini_racer", "gatewayd.codemode", "__future__"}
    for name in ("_worker.py", "_wire.py"):
        for imported in _imports(PACKAGE / name):
            top = imported.split(".")[0]
            assert imported in allowed or top in sys.stdlib_module_names, (name, imported)
