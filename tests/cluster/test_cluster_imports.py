"""gatewayd.cluster never imports the daemon's assembly (its package docstring says so)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"gatewayd.daemon", "gatewayd.wiring", "gatewayd.cli", "gatewayd.config"}


def test_the_cluster_package_never_imports_the_daemons_assembly() -> None:
    offenders = {}
    for path in sorted((REPO / "gatewayd" / "cluster").rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        bad = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}
    doc = ast.get_docstring(ast.parse((REPO / "gatewayd/cluster/__init__.py").read_text()))
    assert doc and "never import" in doc
