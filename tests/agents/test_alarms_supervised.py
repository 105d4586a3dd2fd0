"""The alarm timer loop is supervised: a crash (here: a schedule index row the loop cannot
read) is logged with its traceback, the runtime reports unhealthy while the loop is down, and
the loop is restarted with backoff and serves schedules again once the cause is gone."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable

import pytest

from gatewayd.agents.alarms import INDEX_FILE
from gatewayd.agents.schedule_index import ScheduleIndex
from gatewayd.agents.storage import agent_db_path
from tests.agents.test_alarms import Planner
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


async def _until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    await wait_until(predicate, timeout_s, "condition")


async def test_crashed_alarm_loop_is_logged_reported_and_restarted(
    make_runtime, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    index_path = tmp_path / "state" / INDEX_FILE
    index_path.parent.mkdir(parents=True)
    ScheduleIndex(index_path).close()
    with sqlite3.connect(index_path) as db:  # a value no due time can be read from
        db.execute("INSERT INTO _gw_schedule_index VALUES ('p', 'bad', 'never')")

    with caplog.at_level(logging.INFO, logger="gatewayd.supervisor"):
        async with make_runtime({"p": Planner}) as rt:
            await _until(lambda: not rt.healthy())
            crash = next(r for r in caplog.records if "'alarms' crashed" in r.getMessage())
            assert crash.exc_info is not None and crash.exc_info[0] is ValueError

            with sqlite3.connect(index_path, timeout=10) as db:
                db.execute("DELETE FROM _gw_schedule_index WHERE agent_id = 'bad'")
            await _until(
                lambda: any("'alarms' is running again" in r.getMessage() for r in caplog.records)
            )
            assert rt.healthy()
            # The restarted loop really serves schedules: only the timer can wake this agent.
            await rt.call("p", "a", "plan", 0.2, "after-restart")

            def hibernated() -> bool:
                rt.hibernate_idle()  # once its post-commit work is done
                return not rt.is_awake("p", "a")

            await _until(hibernated)
            agent_file = agent_db_path(tmp_path / "state", "p", "a")
            await _until(lambda: "after-restart" in _committed_state(agent_file)["ticks"])


def _committed_state(path) -> dict:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute("SELECT value FROM _gw_turn_rows WHERE id = 0").fetchone()
    return {"ticks": []} if row is None else json.loads(row[0])
