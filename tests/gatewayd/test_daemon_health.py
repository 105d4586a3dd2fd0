"""Health as the operator sees it, from an in-process Daemon with real HTTP and a real
NOTIFY_SOCKET: /healthz reads a snapshot the event loop publishes (the HTTP thread never calls
into loop-owned objects), and a crashed background loop makes /healthz and the watchdog report
unhealthy until its supervisor has it running again."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatewayd.config import load_config
from gatewayd.daemon import Daemon
from gatewayd.supervisor import Supervisor
from tests.gatewayd.notify import NotifySocket

pytestmark = pytest.mark.timeout(60)

CONFIG = """
[gateway]
state_dir = "state"
status_interval = "100ms"
[http]
bind = "127.0.0.1:0"
[listeners.websocket]
enabled = false
[mqtt]
enabled = false
"""


@pytest.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Daemon]:
    notify = NotifySocket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = tmp_path / "gatewayd.toml"
    config.write_text(CONFIG)
    daemon = Daemon(config, load_config(config))
    daemon.notify_receiver = notify  # type: ignore[attr-defined]
    await daemon.startup()
    yield daemon
    daemon._stop_requested.set()
    await daemon.shutdown()
    notify.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def _wait_for_healthz(daemon: Daemon, status: int, timeout_s: float = 15.0) -> str:
    assert daemon.http is not None
    deadline = time.monotonic() + timeout_s
    while True:
        got, body = await asyncio.to_thread(_get, daemon.http.port, "/healthz")
        if got == status:
            return body
        assert time.monotonic() < deadline, f"/healthz stayed {got} {body!r}"
        await asyncio.sleep(0.05)


async def test_healthz_never_calls_into_components_from_the_http_thread(daemon: Daemon) -> None:
    assert daemon.components is not None and daemon.http is not None
    callers: list[int] = []
    check_health = daemon.components.health

    def recording_health() -> tuple[bool, str]:
        callers.append(threading.get_ident())
        return check_health()

    daemon.components.health = recording_health  # type: ignore[method-assign]
    serving = asyncio.create_task(daemon.serve())
    for _ in range(5):
        status, body = await asyncio.to_thread(_get, daemon.http.port, "/healthz")
        assert (status, body) == (200, "ok: ok\n")
        status, body = await asyncio.to_thread(_get, daemon.http.port, "/readyz")
        assert (status, body) == (200, "ok: ready\n")
    assert callers, "health was never computed"
    assert set(callers) == {threading.get_ident()}, "health computed off the event loop"
    daemon._stop_requested.set()
    await serving


async def test_crashed_loop_makes_healthz_and_watchdog_unhealthy_until_it_runs_again(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    assert daemon.components is not None
    notify: NotifySocket = daemon.notify_receiver  # type: ignore[attr-defined]
    daemon.supervisor = Supervisor(
        "daemon", backoff_min_s=0.05, backoff_max_s=0.5, stable_after_s=0.5
    )
    broken = True
    summary = daemon.components.summary

    def failing_summary() -> dict[str, object]:
        if broken:
            raise RuntimeError("status counters unavailable")
        return summary()

    daemon.components.summary = failing_summary  # type: ignore[method-assign]
    serving = asyncio.create_task(daemon.serve())
    with caplog.at_level(logging.INFO):
        body = await _wait_for_healthz(daemon, 503)
        assert "background loop down: status (RuntimeError: status counters unavailable)" in body
        await asyncio.to_thread(notify.collect, 0.3)
        mark = len(notify.messages)
        broken = False
        await _wait_for_healthz(daemon, 200)
        await asyncio.to_thread(notify.wait_for, "WATCHDOG", "1", after=mark)
    daemon._stop_requested.set()
    await serving
    messages = [r.getMessage() for r in caplog.records]
    crash = next(r for r in caplog.records if "background loop 'status' crashed" in r.getMessage())
    assert crash.exc_info is not None
    assert any(
        m.startswith("watchdog ping withheld: daemon: background loop down") for m in messages
    )
    assert "daemon: background loop 'status' is running again" in messages


@pytest.fixture
def fast_stall_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gatewayd.daemon.LOOP_STALL_LIMIT_S", 0.5)


async def test_healthz_reports_a_stuck_event_loop(
    fast_stall_detection: None, daemon: Daemon
) -> None:
    assert daemon.http is not None
    port = daemon.http.port
    serving = asyncio.create_task(daemon.serve())
    await _wait_for_healthz(daemon, 200)
    answered = threading.Event()
    answers: list[tuple[int, str]] = []

    def poll_until_unhealthy() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, body = _get(port, "/healthz")
            if status == 503:
                answers.append((status, body))
                break
            time.sleep(0.02)  # pacing the polls, not synchronisation
        answered.set()

    threading.Thread(target=poll_until_unhealthy, daemon=True).start()
    answered.wait(timeout=20)  # blocks the event loop, as a wedged handler would
    assert answers and answers[0][1].startswith("not ok: event loop stalled: no health report")
    await _wait_for_healthz(daemon, 200)  # the loop turns again: healthy again
    daemon._stop_requested.set()
    await serving
