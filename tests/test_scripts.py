"""scripts/setup installs once and then does no pip work (so scripts/run starts at once and
works with no package index in reach); it makes the example secrets file acceptable to the
daemon. Run on a copy of the checkout whose `.venv/bin/python` only records how it was called."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from protocols.tcp import load_secrets_file

REPO = Path(__file__).resolve().parents[1]

FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$(dirname "$0")/../../calls.log"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of what the scripts read, with a stand-in .venv and mosquitto already present."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup", "run"):
        shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
    for name in ("pyproject.toml", "config.example.toml", "devices.example.toml"):
        shutil.copy(REPO / name, root / name)
    (root / "devices.example.toml").chmod(0o644)  # what git gives a fresh clone
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "gatewayd"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    fake_path = tmp_path / "path"
    fake_path.mkdir()
    (fake_path / "mosquitto").write_text("#!/bin/sh\n")
    (fake_path / "mosquitto").chmod(0o755)
    return root


def _run(checkout: Path, *command: str) -> list[str]:
    """Run a script; return the tool calls it made (`python -m pip ...`, `gatewayd run ...`)."""
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{checkout.parent / 'path'}:{os.environ['PATH']}"}
    result = subprocess.run(
        command, cwd=checkout, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines() if log.exists() else []


def _pip_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("python -m pip install -q -e")]


def test_setup_installs_once_then_does_no_pip_work(checkout: Path) -> None:
    assert _pip_installs(_run(checkout, "scripts/setup", "cpu,test")) == [
        "python -m pip install -q -e .[cpu,test]"
    ]
    assert _run(checkout, "scripts/setup", "cpu,test") == []
    assert _run(checkout, "scripts/setup", "cpu") == [], "installed extras are a superset"
    assert _run(checkout, "scripts/setup") == []


def test_setup_reinstalls_for_a_new_extra_or_a_changed_pyproject(checkout: Path) -> None:
    _run(checkout, "scripts/setup", "cpu")
    assert _pip_installs(_run(checkout, "scripts/setup", "cpu,test")) == [
        "python -m pip install -q -e .[cpu,test]"
    ]
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# a new dependency\n")
    assert _pip_installs(_run(checkout, "scripts/setup", "cpu")) == [
        "python -m pip install -q -e .[cpu]"
    ]


def test_run_starts_the_daemon_without_pip_once_set_up(checkout: Path) -> None:
    _run(checkout, "scripts/setup", "cpu,llm,mcp")  # what scripts/run installs
    assert _run(checkout, "scripts/run", "--log-level", "debug") == [
        "gatewayd run -c config.example.toml --log-level debug"
    ]


def test_setup_makes_the_example_secrets_acceptable_to_the_daemon(
    checkout: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = checkout / "devices.example.toml"
    with caplog.at_level(logging.WARNING):
        load_secrets_file(secrets)
    assert "accessible by all users" in caplog.text, "a fresh clone's mode is warned about"
    caplog.clear()

    _run(checkout, "scripts/setup", "cpu")
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    with caplog.at_level(logging.WARNING):
        assert load_secrets_file(secrets)["thermo-1"] == "example-secret-1"
    assert caplog.text == ""
