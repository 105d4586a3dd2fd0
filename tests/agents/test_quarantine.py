"""A corrupt agent database quarantines that agent only (gatewayd/agents/quarantine.py).

Real SQLite files, damaged on disk the way a bad sector or a stray write would: the agent's
events are refused at once with `AgentQuarantinedError` (one ERROR line naming the file and
what to do, no reopen per event), every other agent keeps serving, and replacing the file
lifts the quarantine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from gatewayd.agents import Agent, callable
from gatewayd.agents.errors import AgentQuarantinedError
from gatewayd.agents.storage import agent_db_path
from tests.agents.conftest import MemoryLink
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Notes(Agent):
    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS notes (body TEXT NOT NULL)")

    def on_message(self, conn, message) -> None:
        self.sql("INSERT INTO notes (body) VALUES (?)", str(message))
        conn.send(f"stored {message}")

    @callable
    def add(self, body: str) -> int:
        self.sql("INSERT INTO notes (body) VALUES (?)", body)
        return int(self.sql("SELECT count(*) AS n FROM notes")[0]["n"])


def damage(path: Path) -> None:
    """Garbage over the header and first pages; the WAL (if any) gone with it."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with open(path, "r+b") as db:
        db.write(os.urandom(8192))


def quarantine_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "QUARANTINED" in r.getMessage()]


async def test_corrupt_file_quarantines_that_agent_and_others_keep_serving(
    make_runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        assert await rt.call("notes", "bad", "add", "one") == 1
        assert await rt.call("notes", "good", "add", "one") == 1
    bad_file = agent_db_path(state_dir, "notes", "bad")
    damage(bad_file)

    caplog.set_level(logging.INFO, logger="gatewayd.agents")
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        for _ in range(20):
            with pytest.raises(AgentQuarantinedError, match="quarantined") as refused:
                await rt.call("notes", "bad", "add", "two")
            assert str(bad_file) in str(refused.value)
        lines = quarantine_lines(caplog)
        assert len(lines) == 1, "one log line, not one per refused event"
        assert str(bad_file) in lines[0] and "restore" in lines[0]
        assert not any("cannot wake" in r.getMessage() for r in caplog.records)
        assert rt.stats()["agents_quarantined"] == 1

        # Every other agent keeps serving, over a transport too.
        assert await rt.call("notes", "good", "add", "two") == 2
        link = MemoryLink("notes", "good")
        await rt.open_link(link, {})
        await rt.submit_message(link, "three")
        assert link.plain() == ["stored three"]

        # A refused transport event is not acknowledged (the transport keeps it).
        bad_link = MemoryLink("notes", "bad")
        with pytest.raises(AgentQuarantinedError):
            await rt.open_link(bad_link, {})

        # Moving the damaged file aside lifts the quarantine: the agent starts empty.
        bad_file.rename(tmp_path / "damaged.sqlite3")
        assert await rt.call("notes", "bad", "add", "again") == 1
        assert rt.stats()["agents_quarantined"] == 0


async def test_file_of_another_agent_is_quarantined(
    make_runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        await rt.call("notes", "a", "add", "x")
        await rt.call("notes", "b", "add", "x")
    # An operator restored the wrong backup: b's file now holds a's database.
    os.replace(agent_db_path(state_dir, "notes", "a"), agent_db_path(state_dir, "notes", "b"))
    caplog.set_level(logging.INFO, logger="gatewayd.agents")
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        with pytest.raises(AgentQuarantinedError, match="belongs to agent"):
            await rt.call("notes", "b", "add", "y")
        assert len(quarantine_lines(caplog)) == 1


class Readings(Agent):
    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS readings (body TEXT NOT NULL)")

    @callable
    def fill(self, rows: int) -> None:
        for n in range(rows):
            self.sql("INSERT INTO readings (body) VALUES (?)", f"reading {n:06d} " + "x" * 80)

    @callable
    def total(self) -> int:
        return int(self.sql("SELECT count(*) AS n FROM readings WHERE body != ''")[0]["n"])


async def test_damage_found_inside_a_turn_quarantines_the_agent(
    make_runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The header is fine, one table's pages are not: the agent opens, and its first read of
    that table finds the damage mid-turn."""
    state_dir = tmp_path / "state"
    caplog.set_level(logging.INFO, logger="gatewayd.agents")
    async with make_runtime({"r": Readings}, state_dir=state_dir) as rt:
        await rt.call("r", "one", "fill", 2000)
        await rt.call("r", "two", "fill", 10)
        root_page = await rt.run_in_agent(
            "r",
            "one",
            lambda agent: agent.sql("SELECT rootpage FROM sqlite_master WHERE name = 'readings'")[
                0
            ]["rootpage"],
        )
        assert rt.hibernate_idle() == 2
        path = agent_db_path(state_dir, "r", "one")
        # The close (a checkpoint) runs off the loop.
        await wait_until(lambda: not rt._scheduler.closing, 10, "one's database closed")
        with open(path, "r+b") as db:
            db.seek((root_page - 1) * 4096)
            db.write(b"\xff" * 4096)

        with pytest.raises(AgentQuarantinedError):
            await rt.call("r", "one", "total")
        with pytest.raises(AgentQuarantinedError):
            await rt.call("r", "one", "total")
        assert len(quarantine_lines(caplog)) == 1
        assert await rt.call("r", "two", "total") == 10


async def test_refused_connect_leaves_the_link_free_to_open_again(
    make_runtime, tmp_path: Path
) -> None:
    """A transport whose open was refused opens the same link again later (MQTT does, per
    device): that must meet the quarantine again, not 'link id already open'."""
    state_dir = tmp_path / "state"
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        await rt.call("notes", "bad", "add", "one")
    damage(agent_db_path(state_dir, "notes", "bad"))
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        link = MemoryLink("notes", "bad", transport="mqtt")
        for _ in range(3):
            with pytest.raises(AgentQuarantinedError):
                await rt.open_link(link, {})
        assert rt.stats()["connections_open"] == 0


async def test_messages_on_a_link_refused_by_quarantine_say_quarantined(
    make_runtime, tmp_path: Path
) -> None:
    """A transport that pipelines messages behind its open (MQTT) must learn the reason, not
    'connection is not open', which is a final rejection (acked and dropped)."""
    state_dir = tmp_path / "state"
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        await rt.call("notes", "bad", "add", "one")
    damage(agent_db_path(state_dir, "notes", "bad"))
    async with make_runtime({"notes": Notes}, state_dir=state_dir) as rt:
        link = MemoryLink("notes", "bad", transport="mqtt")
        with pytest.raises(AgentQuarantinedError):
            await rt.open_link(link, {})
        with pytest.raises(AgentQuarantinedError):
            await rt.submit_message(link, "pipelined behind the refused open")
