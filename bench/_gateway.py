"""Runs the real `gatewayd run -c FILE` as a child process for the benchmarks.

Writes the config into a temporary directory, starts the daemon with its own NOTIFY_SOCKET,
waits for READY=1 and exposes the process's CPU time (utime + stime from /proc/PID/stat, all
threads, so the SQLite commit executor is included) for per-message CPU figures.

    with GatewayDaemon(config_text, files={"devices.toml": "..."}) as gw:
        before = gw.cpu_s()
        ...  # load
        used_s = gw.cpu_s() - before
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class GatewayStartError(RuntimeError):
    """The daemon exited or did not report READY=1 in time (message has its log tail)."""


class GatewayDaemon:
    """One gatewayd process on a generated config in its own temporary directory."""

    def __init__(
        self,
        config_text: str,
        *,
        files: dict[str, str] | None = None,
        ready_timeout_s: float = 60,
        repo: Path = REPO,
    ) -> None:
        """`repo`: the tree whose code the daemon runs (PYTHONPATH), this one by default."""
        self._tmp = tempfile.TemporaryDirectory(prefix="gatewayd-bench-")
        self.directory = Path(self._tmp.name)
        for name, text in (files or {}).items():
            path = self.directory / name
            path.write_text(text)
            path.chmod(0o600)  # secrets files must not be readable by others
        self.config_path = self.directory / "gatewayd.toml"
        self.config_path.write_text(config_text)
        self.log_path = self.directory / "daemon.log"
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.repo = repo

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        notify_path = self.directory / "notify.sock"
        notify_path.unlink(missing_ok=True)  # left by an earlier start (restart after a kill)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(self.repo)}
        env.pop("JOURNAL_STREAM", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "run", "-c", str(self.config_path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.directory,
            )
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise GatewayStartError(
                        f"gatewayd exited with {self.proc.returncode}: {self.log_tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayStartError(f"no READY=1 within {self.ready_timeout_s}s: "
                                            f"{self.log_tail()}")  # fmt: skip
                notify.settimeout(min(remaining, 0.5))
                try:
                    message = notify.recv(65536).decode()
                except TimeoutError:
                    continue
                if "READY=1" in message.splitlines():
                    return
        except BaseException:
            self.stop()
            raise
        finally:
            notify.close()

    def cpu_s(self) -> float:
        """User + system CPU seconds the daemon has used so far (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            # The command name (field 2) may contain spaces: split after its closing paren.
            fields = stat.read().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / CLOCK_TICKS_PER_S

    def log_tail(self, max_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (drain), SIGKILL after `timeout_s`; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> GatewayDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
