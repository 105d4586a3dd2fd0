"""The daemon as a subprocess under a real NOTIFY_SOCKET: READY, STATUS, WATCHDOG, reload, stop."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.gatewayd.daemon_process import GatewayProcess
from tests.gatewayd.notify import NotifySocket

BASE_CONFIG = """
[gateway]
state_dir = "state"
log_level = "{log_level}"
drain_timeout = "5s"
status_interval = "100ms"
[http]
bind = "127.0.0.1:0"
[listeners.websocket]
enabled = false
[mqtt]
enabled = false
"""


class DaemonProcess(GatewayProcess):
    def __init__(self, tmp_path: Path, notify: NotifySocket, extra_env: dict[str, str]) -> None:
        super().__init__(tmp_path / "gatewayd.toml", notify, **extra_env)
        self.write_config(log_level="info")
        self.start(wait_ready=False)

    def write_config(self, *, log_level: str, extra: str = "") -> None:
        self.config.write_text(BASE_CONFIG.format(log_level=log_level) + extra)


def http_port(daemon: DaemonProcess) -> int:
    """The HTTP endpoint's port (bound to port 0), from the daemon's log."""
    daemon.wait_log("http: serving")
    return int(daemon.log_text().split("http: serving")[1].split("port=")[1].split()[0])


def _start(tmp_path: Path, notify: NotifySocket, **env: str) -> DaemonProcess:
    daemon = DaemonProcess(tmp_path, notify, env)
    return daemon


def test_ready_then_status_updates_then_clean_stop(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify)
    try:
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"].startswith("serving")
        first = len(notify.messages)
        notify.wait_for("STATUS", after=first, timeout_s=3)
        assert daemon.proc.poll() is None
    finally:
        code = daemon.stop()
    assert code == 0
    notify.wait_for("STOPPING", "1", timeout_s=2)
    assert "stopped" in daemon.log_text()


def test_abstract_notify_socket(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path, abstract=True)
    daemon = _start(tmp_path, notify)
    try:
        notify.wait_for("READY", "1")
    finally:
        assert daemon.stop() == 0
        notify.close()


def test_watchdog_cadence_follows_watchdog_usec(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify, WATCHDOG_USEC="400000")  # ping every 0.2 s
    try:
        notify.wait_for("READY", "1")
        start = len(notify.messages)
        notify.collect(2.0)
        pings = [t for t, m in notify.messages[start:] if m.get("WATCHDOG") == "1"]
        assert 6 <= len(pings) <= 14, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.4
    finally:
        assert daemon.stop() == 0


def test_watchdog_off_for_another_pid(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    try:
        notify.wait_for("READY", "1")
        notify.collect(0.6)
        assert not [m for _, m in notify.messages if "WATCHDOG" in m]
    finally:
        assert daemon.stop() == 0


def test_sighup_applies_a_good_config(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify)
    try:
        notify.wait_for("READY", "1")
        base = f"http://127.0.0.1:{http_port(daemon)}"
        urllib.request.urlopen(f"{base}/healthz").read()
        assert " level=debug " not in daemon.log_text()  # at info, requests are not logged
        daemon.write_config(log_level="debug")
        mark = len(notify.messages)
        daemon.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=mark)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", "1", after=mark)
        daemon.wait_log("reload applied")
        # The new level takes effect: an HTTP request is now logged at debug, which it was
        # not before (a bare "level=debug" would also match the reload line's log_level=debug).
        urllib.request.urlopen(f"{base}/healthz").read()
        daemon.wait_log(" level=debug logger=gatewayd.http ")
    finally:
        assert daemon.stop() == 0


def test_sighup_with_broken_config_keeps_running(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify)
    try:
        notify.wait_for("READY", "1")
        daemon.config.write_text("[gateway]\nlog_levle = 'debug'\n")
        mark = len(notify.messages)
        daemon.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", after=mark)
        notify.wait_for("READY", "1", after=mark)
        daemon.wait_log("reload rejected, keeping the running configuration")
        assert (
            "gateway.log_levle: unknown key; did you mean 'gateway.log_level'?" in daemon.log_text()
        )
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


def test_restart_only_keys_are_named_on_reload(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify)
    try:
        notify.wait_for("READY", "1")
        daemon.write_config(log_level="info", extra="[agents]\nmax_active = 5\n")
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_log("take effect after a restart: agents.max_active")
    finally:
        assert daemon.stop() == 0


def test_http_endpoints(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = _start(tmp_path, notify)
    try:
        notify.wait_for("READY", "1")
        base = f"http://127.0.0.1:{http_port(daemon)}"
        assert urllib.request.urlopen(f"{base}/healthz").read().startswith(b"ok")
        assert urllib.request.urlopen(f"{base}/readyz").read().startswith(b"ok")
        assert b"python_info" in urllib.request.urlopen(f"{base}/metrics").read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/nope")
        assert missing.value.code == 404
    finally:
        assert daemon.stop() == 0


def test_second_daemon_on_same_state_dir_fails(tmp_path: Path, notify: NotifySocket) -> None:
    first = _start(tmp_path, notify)
    try:
        notify.wait_for("READY", "1")
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        config = second_dir / "gatewayd.toml"
        config.write_text(first.config.read_text().replace('"state"', f'"{tmp_path / "state"}"'))
        result = subprocess.run(
            [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert "is in use by another gatewayd process" in result.stderr
    finally:
        assert first.stop() == 0


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[gateway]\nlog_level = 'info'\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[listeners.binary]\nbnid = '1.2.3.4:5'\n")
    ok = subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    broken = subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(bad)], capture_output=True, text=True
    )
    assert broken.returncode == 78
    assert (
        "listeners.binary.bnid: unknown key; did you mean 'listeners.binary.bind'?" in broken.stderr
    )
    version = subprocess.run(
        [sys.executable, "-m", "gatewayd", "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("gatewayd 0.")


def test_unread_notify_socket_never_blocks_the_daemon(tmp_path: Path, notify: NotifySocket) -> None:
    """A receiver that stops reading fills its datagram queue (10 on Linux); the daemon must
    drop notifications rather than block its event loop on sendto()."""
    daemon = _start(tmp_path, notify, WATCHDOG_USEC="100000")
    try:
        # Ready (from its log: the notify socket stays unread), so SIGTERM meets its handler
        # and not a half-started interpreter, as it did on a loaded machine.
        daemon.wait_log("msg=ready", timeout_s=30)
        time.sleep(1.0)  # the workload: ~30 status and watchdog datagrams, none read
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5.0
    finally:
        daemon.stop()


def test_corrupt_model_fails_start_up_naming_model_and_file(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model")
    config = tmp_path / "gatewayd.toml"
    config.write_text(
        BASE_CONFIG.format(log_level="info") + '[models.anomaly]\npath = "bad.onnx"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert (
        f"start-up failed: model 'anomaly': cannot load '{tmp_path / 'bad.onnx'}'" in result.stderr
    )
    assert "Traceback" not in result.stderr
