"""`protocols` and `engine` never import `gatewayd` (nor each other): each stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"protocols": {"gatewayd", "engine"}, "engine": {"gatewayd", "protocols"}}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_forbidden(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = {
        str(f.relative_to(REPO)): sorted(_imported_top_levels(f) & FORBIDDEN[package])
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_package_states_what_it_must_never_import() -> None:
    for package in ("gatewayd", "protocols", "engine"):
        doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text()))
        assert doc and "never import" in doc, package


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# The daemon sits on top: it drives the components; only the CLI (which starts it) imports it.
DAEMON_IMPORTERS = {"gatewayd/cli.py"}


def test_only_the_cli_imports_the_daemon() -> None:
    offenders = sorted(
        str(f.relative_to(REPO))
        for f in (REPO / "gatewayd").rglob("*.py")
        if f.name != "daemon.py"
        and str(f.relative_to(REPO)) not in DAEMON_IMPORTERS
        and "gatewayd.daemon" in _imported_modules(f)
    )
    assert offenders == [], "these modules import gatewayd.daemon; move what they need below it"
