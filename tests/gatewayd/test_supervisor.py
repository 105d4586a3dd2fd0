"""Supervised background loops: a crash is logged with its traceback, the loop restarts with
backoff, and the owner reports unhealthy until it runs again."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from gatewayd.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)


async def test_crashing_loop_is_logged_restarted_and_reported_down_until_stable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor("test", backoff_min_s=0.01, backoff_max_s=0.05, stable_after_s=1.0)
    runs = 0
    crashed_twice = asyncio.Event()
    running_again = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            if runs == 2:
                crashed_twice.set()
            raise RuntimeError(f"boom {runs}")
        running_again.set()
        await asyncio.Event().wait()  # healthy from now on

    with caplog.at_level(logging.INFO, logger="gatewayd.supervisor"):
        supervisor.spawn("flaky", flaky)
        await asyncio.wait_for(crashed_twice.wait(), 5)
        await asyncio.wait_for(running_again.wait(), 5)
        # Restarted, but not yet stable: still reported down, with the last error.
        ok, reason = supervisor.healthy()
        assert not ok and "flaky (RuntimeError: boom 2)" in reason
        assert supervisor.failing() == {"flaky": "RuntimeError: boom 2"}
        while supervisor.failing():
            await asyncio.sleep(0.01)  # becomes up once the restart has run stable_after_s
        assert supervisor.healthy() == (True, "ok")
        assert supervisor.restarts["flaky"] == 2
        restarts = REGISTRY.get_sample_value(
            "gatewayd_background_loop_restarts_total", {"owner": "test", "loop": "flaky"}
        )
        assert restarts is not None and restarts >= 2
        await supervisor.stop()

    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashes) == 2
    assert crashes[0].exc_info is not None and "boom 1" in str(crashes[0].exc_info[1])
    delays = [r.getMessage() for r in caplog.records if "restarting 'flaky' in" in r.getMessage()]
    assert delays == [
        "test: restarting 'flaky' in 0.01s (failure 1 in a row)",
        "test: restarting 'flaky' in 0.02s (failure 2 in a row)",
    ]
    assert any("is running again" in r.getMessage() for r in caplog.records)


async def test_backoff_doubles_up_to_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor("test", backoff_min_s=0.001, backoff_max_s=0.004, stable_after_s=10)
    failures = 0
    five = asyncio.Event()

    async def always_fails() -> None:
        nonlocal failures
        failures += 1
        if failures == 5:
            five.set()
            await asyncio.Event().wait()
        raise ValueError("still broken")

    with caplog.at_level(logging.WARNING, logger="gatewayd.supervisor"):
        supervisor.spawn("broken", always_fails)
        await asyncio.wait_for(five.wait(), 5)
        await supervisor.stop()
    delays = [
        float(r.getMessage().split(" in ")[1].split("s ")[0])
        for r in caplog.records
        if "restarting 'broken' in" in r.getMessage()
    ]
    assert len(delays) == 4
    assert [round(d * 1000) for d in delays] == [1, 2, 4, 4]


async def test_a_loop_that_returns_is_restarted_too(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor("test", backoff_min_s=0.001)
    calls = 0
    second = asyncio.Event()

    async def returns_early() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            second.set()
            await asyncio.Event().wait()

    supervisor.spawn("early", returns_early)
    await asyncio.wait_for(second.wait(), 5)
    assert supervisor.failing() == {"early": "returned unexpectedly"}
    await supervisor.stop()
    assert supervisor.failing() == {}


async def test_stop_cancels_every_loop() -> None:
    supervisor = Supervisor("test")
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = supervisor.spawn("forever", forever)
    await asyncio.wait_for(started.wait(), 5)
    await supervisor.stop()
    assert cancelled.is_set() and task.cancelled()
