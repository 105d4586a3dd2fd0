"""The unit file passes `systemd-analyze verify` and rates 2.0 or better on the security scale."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "gatewayd.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this host"
)


def _unit_pointing_at_this_install(tmp_path: Path) -> Path:
    """The unit as shipped, with ExecStart aimed at this checkout's interpreter so verify can
    check that the command exists (the shipped path is /opt/gatewayd/bin/gatewayd)."""
    text = UNIT.read_text().replace("/opt/gatewayd/bin/gatewayd", f"{sys.executable} -m gatewayd")
    copy = tmp_path / "gatewayd.service"
    copy.write_text(text)
    return copy


def test_verify_passes(tmp_path: Path) -> None:
    unit = _unit_pointing_at_this_install(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "gatewayd.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_security_exposure_is_two_or_better(tmp_path: Path) -> None:
    unit = _unit_pointing_at_this_install(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for gatewayd.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_speaks_notify_and_reload() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=gatewayd",
        "ConfigurationDirectory=gatewayd",
        "User=gatewayd",
    ):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert not re.search(r"^MemoryDenyWriteExecute=", text, re.M)
