"""Shared pytest fixtures: a real Mosquitto per test, on its own free port; a systemd-notify
socket; no leaked process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import MosquittoBroker
from tests.gatewayd.notify import NotifySocket
from tests.processes import command_line, descendants, kill_and_wait


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """A test stops every process it starts (brokers, daemons, helpers) by the end of its
    teardown. One still running is killed here and fails the test: a fixture that leaks is found
    where it leaks, not as a port clash or a slow machine three tests later."""
    before = set(descendants())
    yield
    left = [pid for pid in descendants() if pid not in before]
    if left:
        described = [f"{pid} ({command_line(pid)})" for pid in left]
        still_running = kill_and_wait(left)
        pytest.fail(
            f"processes left running by this test, now killed: {', '.join(described)}"
            + (f"; still running after SIGKILL: {still_running}" if still_running else ""),
            pytrace=False,
        )


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started Mosquitto (persistence on) that the test may stop, kill or restart."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """A systemd-notify receiver in `tmp_path` for the daemon a test starts."""
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()
