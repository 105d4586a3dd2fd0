"""Every run-time dependency in pyproject.toml is imported by the package it is installed for
(benchmark- and test-only packages belong in the `bench` and `test` extras)."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import distribution
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gatewayd", "protocols", "engine")


def _distribution_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def _top_level_modules(dist_name: str) -> set[str]:
    """The importable top-level names an installed distribution provides."""
    files = distribution(dist_name).files or []
    tops = {f.parts[0].removesuffix(".py") for f in files if f.suffix in (".py", ".so")}
    return {t for t in tops if not t.endswith((".dist-info", ".data")) and t != ".."}


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = sorted({_distribution_name(r) for r in project["dependencies"]})
    imported = _imported_top_levels()
    unused = [name for name in declared if not _top_level_modules(name) & imported]
    assert unused == [], "declared as run-time dependencies but never imported by the package"
