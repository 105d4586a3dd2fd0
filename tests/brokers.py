"""A real Mosquitto broker for tests and benchmarks, on a free loopback port.

Pytest-independent: `MosquittoBroker` writes a temporary config, starts `mosquitto -c`, waits
until the port accepts connections, and can stop (gracefully: Mosquitto writes its persistence
file on SIGTERM), kill (SIGKILL, nothing saved since the last autosave) and restart on the
*same* port with the same persistence directory, so persistent sessions survive a restart.

    broker = MosquittoBroker(tmp_dir)
    broker.start()
    ...  # connect to broker.url (mqtt://127.0.0.1:PORT)
    broker.restart()
    broker.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class BrokerError(RuntimeError):
    """Mosquitto could not be started (the message includes the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MosquittoBroker:
    """One Mosquitto process with its own config, port, persistence and log file."""

    def __init__(
        self,
        work_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        persistence: bool = True,
        max_inflight_messages: int = 100,
        max_queued_messages: int = 100_000,
        extra_config: str = "",
    ) -> None:
        if work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="mosquitto-")
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.persistence = persistence
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.extra_config = extra_config
        self.config_path = self.work_dir / "mosquitto.conf"
        self.log_path = self.work_dir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            # Running as root, Mosquitto would otherwise switch to the `mosquitto` user and
            # lose access to the temporary persistence directory.
            "user root" if os.geteuid() == 0 else "",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.work_dir}/",
            "autosave_interval 1800",
            "set_tcp_nodelay true",  # as gatewayd's deployment notes recommend: lower latency
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            self.extra_config,
        ]
        self.config_path.write_text("\n".join(line for line in lines if line) + "\n")

    def start(self, timeout_s: float = 10.0) -> None:
        """Start Mosquitto and wait until it accepts TCP connections."""
        if self.running:
            return
        self._write_config()
        self._process = subprocess.Popen(
            [MOSQUITTO_BIN, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self._process.returncode}: {self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.url} in {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence file and disconnects clients."""
        self._signal_and_wait(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: as a crash; nothing is saved since the last autosave."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self, *, graceful: bool = True, down_s: float = 0.0) -> None:
        """Stop (or kill) and start again on the same port with the same persistence."""
        if graceful:
            self.stop()
        else:
            self.kill()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def _signal_and_wait(self, sig: signal.Signals, timeout_s: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
