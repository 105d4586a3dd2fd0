"""Shared pytest fixtures: a real Mosquitto per test, on its own free port; a systemd-notify
socket; no leaked process. And the order files run in: the longest first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import MosquittoBroker
from tests.gatewayd.notify import NotifySocket
from tests.processes import command_line, descendants, kill_and_wait, left_running

# The files that take longest (tens of seconds each), longest first. They run before every
# other file, so that a parallel run (scripts/test: pytest-xdist workers, each running whole
# files, in the order collected) ends with short files on every worker rather than with one
# worker still busy with a long file. Only the order changes, never what runs.
LONGEST_FIRST = (
    "tests/cluster/test_failover.py",
    "tests/cluster/test_routing.py",
    "tests/chat/test_code_mode_local_model.py",
    "tests/chat/test_daemon_chat.py",
    "tests/test_watchdog.py",
    "tests/codemode/test_escapes.py",
    "tests/engine/generate/test_smollm2.py",
    "tests/protocols/test_mqtt.py",
    "tests/gatewayd/test_daemon.py",
    "tests/protocols/test_mqtt_outbound.py",
    "tests/chat/test_ws_chat.py",
    "tests/gatewayd/test_end_to_end.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of LONGEST_FIRST first, in that order; the rest keep theirs."""
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """A test stops every process it starts (brokers, daemons, helpers) by the end of its
    teardown. One still running is killed here and fails the test: a fixture that leaks is found
    where it leaks, not as a port clash or a slow machine three tests later."""
    before = set(descendants())
    yield
    left = left_running([pid for pid in descendants() if pid not in before])
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
