"""gatewayd.mcp keeps to what its docstring promises: no import of the daemon or the CLI, of
the API only the token type, and the CLI verb's module loads without the SDK."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_package_never_imports_the_daemon_the_cli_or_the_api_beyond_tokens() -> None:
    offenders = {}
    for path in sorted((REPO / "gatewayd" / "mcp").rglob("*.py")):
        bad = {
            name
            for name in imported(path)
            if name.startswith(("gatewayd.daemon", "gatewayd.cli"))
            or (name.startswith("gatewayd.api") and name != "gatewayd.api.tokens")
        }
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_gatewayd_starts_without_the_mcp_sdk() -> None:
    code = (
        "import sys; sys.modules['mcp'] = None; sys.modules['mcp_types'] = None\n"
        "from gatewayd.cli import build_parser\n"
        "print(build_parser().parse_args(['mcp', '-c', 'x.toml']).command)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "mcp"
