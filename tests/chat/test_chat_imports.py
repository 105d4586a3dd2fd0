"""gatewayd.chat uses the agent runtime only through its public surface (`gatewayd.agents`),
never the daemon's assembly, and `openai` only where a backend is created."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gatewayd" / "chat"
FORBIDDEN_PREFIXES = (
    "gatewayd.agents.",  # runtime internals: only `gatewayd.agents` itself
    "gatewayd.daemon",
    "gatewayd.wiring",
    "gatewayd.config",
    "gatewayd.cli",
    "engine",
)


def test_chat_imports_only_the_public_runtime_surface():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad = [n for n in names if n.startswith(FORBIDDEN_PREFIXES)]
            if bad:
                offenders.setdefault(path.name, []).extend(bad)
    assert offenders == {}


def test_openai_is_imported_lazily():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in top_level:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert "openai" not in names, path.name
