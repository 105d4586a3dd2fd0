"""`gatewayd.client` imports only the standard library, `websockets` and itself, and the
dashboard package never imports the daemon's assembly (tests/test_import_direction.py style)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_client_imports_only_the_stdlib_websockets_and_itself() -> None:
    files = sorted((REPO / "gatewayd" / "client").rglob("*.py"))
    assert files
    offenders = {}
    for path in files:
        bad = {
            name
            for name in imported(path)
            if name.split(".")[0] not in sys.stdlib_module_names
            and name.split(".")[0] not in ("websockets", "__future__")
            and not name.startswith("gatewayd.client")
        }
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_the_dashboard_never_imports_the_daemon_or_wiring() -> None:
    forbidden = {"gatewayd.daemon", "gatewayd.wiring", "gatewayd.cli"}
    files = [
        *sorted((REPO / "gatewayd" / "dashboard").rglob("*.py")),
        REPO / "gatewayd" / "api" / "dashboard.py",
        REPO / "gatewayd" / "api" / "static.py",
    ]
    offenders = {str(p.relative_to(REPO)): sorted(imported(p) & forbidden) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}
