"""The README's "Run as a systemd service" steps work verbatim: each line of that block runs, in
order, in a temporary root (absolute paths moved under it, `sudo` dropped, the group mapped to
the caller's), and the installed config passes the unit's own start check (ExecStartPre)."""

from __future__ import annotations

import grp
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Run as a systemd service"

# Lines that need the real host (package index, systemd manager, journal): checked, not run.
# The test's own interpreter is the installed gatewayd (/opt/gatewayd/bin/...).
NOT_RUN = (
    "python3 -m venv /opt/gatewayd",
    "/opt/gatewayd/bin/pip install '.[cpu]'",
    "systemctl ",
    "journalctl ",
)


def readme_install_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the section has a sh block"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def in_root(command: str, root: Path) -> str:
    """The same command, aimed at `root` instead of the host."""
    command = re.sub(r"(^|\| )sudo ", r"\1", command)
    command = command.replace(
        "/opt/gatewayd/bin/gatewayd", f"{shlex.quote(sys.executable)} -m gatewayd"
    )
    for top in ("/etc/", "/usr/lib/", "/var/lib/"):
        command = re.sub(rf"(?<![\w./]){re.escape(top)}", f"{root}{top}", command)
    command = command.replace("-g gatewayd", f"-g {grp.getgrgid(os.getgid()).gr_name}")
    if command == "systemd-sysusers":
        command = f"systemd-sysusers --root={root}"
    return command


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers")
def test_readme_install_steps_work_verbatim_and_pass_the_start_check(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for host_dir in ("etc/systemd/system", "usr/lib/sysusers.d", "var/lib"):  # a systemd host's
        (root / host_dir).mkdir(parents=True)
    lines = readme_install_lines()
    for expected in NOT_RUN:
        assert any(line.removeprefix("sudo ").startswith(expected) for line in lines), expected
    ran = []
    for line in lines:
        if any(line.removeprefix("sudo ").startswith(skip) for skip in NOT_RUN):
            continue
        command = in_root(line, root)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{line}\n-> {command}\n{result.stdout}{result.stderr}"
        assert "warning" not in result.stderr.lower(), f"{line}\n{result.stderr}"
        ran.append(line)
    assert any("check-config" in line for line in ran)
    assert "gatewayd:" in (root / "etc" / "passwd").read_text()

    # The unit's own start check, on the files where the README put them.
    unit = (root / "etc" / "systemd" / "system" / "gatewayd.service").read_text()
    pre = re.search(r"^ExecStartPre=(.*)$", unit, re.M)
    assert pre, "the unit checks the config before it starts"
    result = subprocess.run(
        ["bash", "-c", in_root(pre.group(1), root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    installed = (root / "etc" / "gatewayd" / "gatewayd.toml").read_text()
    assert f'state_dir = "{root}/var/lib/gatewayd"' in installed  # the unit's StateDirectory=
