"""Runs `gatewayd run` as a real subprocess for tests, with a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.gatewayd.notify import NotifySocket

REPO = Path(__file__).resolve().parents[2]


class GatewayProcess:
    """One daemon process on `config`; `start()` may be called again after `kill()`/`stop()`."""

    def __init__(self, config: Path, notify: NotifySocket, **extra_env: str) -> None:
        self.config = config
        self.notify = notify
        self.extra_env = extra_env
        self.log = config.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "stop or kill it first"
        env = {**os.environ, **self.notify.env, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        env.pop("JOURNAL_STREAM", None)
        env["PYTHONPATH"] = str(REPO)
        mark = len(self.notify.messages)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "run", "-c", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        if wait_ready:
            self.notify.wait_for("READY", "1", after=mark, timeout_s=30)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, needle: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit status; a daemon that does not stop in time is
        SIGKILLed (never left running) and the test fails."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"gatewayd did not stop within {timeout_s} s of SIGTERM (killed); log:\n"
                + self.log_text()[-4000:]
            ) from None
