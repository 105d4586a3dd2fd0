"""What one turn costs in SQL, and that the shortcuts keep every guarantee: a batch's first
turn runs without a SAVEPOINT (its failure rolls back the transaction, nothing else), the
delivered outputs' rows go in the next transaction, dedup seqs are remembered, a wake with a
kept WAL opens without a COMMIT of its own. Real runtime, real SQLite files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prometheus_client import REGISTRY

from gatewayd.agents import Agent, StateRejectedError, callable
from gatewayd.agents.storage import (
    AgentDatabase,
    agent_db_path,
)
from gatewayd.agents.turn import encode_state
from protocols.link import DedupKey, DeliveredCallback, LinkRejected, Outcome, OutputAddress
from tests.agents.conftest import MemoryLink
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Echo(Agent):
    """What the MQTT benchmarks' agent does per message: insert, set_state, reply."""

    initial_state: ClassVar[dict[str, int]] = {"n": 0}

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS r (n INTEGER PRIMARY KEY, body TEXT)")

    def on_message(self, conn: Any, message: bytes | str) -> None:
        text = message if isinstance(message, str) else message.decode()
        self.sql("INSERT INTO r (body) VALUES (?)", text)
        if text.startswith("boom"):
            self.set_state({"n": -1})
            raise ValueError("boom requested")
        if text == "refuse":
            raise LinkRejected("out of range")
        self.set_state({"n": self.state["n"] + 1})
        conn.send(b"ack " + text.encode())

    @callable
    def bodies(self) -> list[str]:
        return [row["body"] for row in self.sql("SELECT body FROM r ORDER BY n")]


class Outputs:
    """A durable-outputs transport that reports each output delivered right away."""

    transport = "mqtt"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        self.sent.append(payload)
        asyncio.get_running_loop().call_soon(on_delivered, seq)


class DeviceLink(MemoryLink):
    def __init__(self, agent_id: str, outputs: Outputs) -> None:
        super().__init__("echo", agent_id, transport="mqtt")
        self.outputs = outputs
        self.output_address = OutputAddress("mqtt", f"dev/{agent_id}/down", 1)


async def _device_link(rt: Any, agent_id: str) -> tuple[Outputs, DeviceLink]:
    """A device link of agent `agent_id` opened on `rt`, replies going to new outputs."""
    outputs = Outputs()
    rt.attach_outputs(outputs)
    link = DeviceLink(agent_id, outputs)
    await rt.open_link(link, {})
    return outputs, link


def _stored_state(state_dir: Path, agent_id: str) -> Any:
    with sqlite3.connect(agent_db_path(state_dir, "echo", agent_id)) as db:
        return json.loads(db.execute("SELECT value FROM _gw_turn_rows WHERE id = 0").fetchone()[0])


def _bodies(state_dir: Path, agent_id: str) -> list[str]:
    with sqlite3.connect(agent_db_path(state_dir, "echo", agent_id)) as db:
        return [row[0] for row in db.execute("SELECT body FROM r ORDER BY n")]


def _trace(rt: Any, agent_id: str) -> list[str]:
    """The first word of every statement the agent's connection runs from now on."""
    seen: list[str] = []
    db = rt._scheduler.slots[("echo", agent_id)].db
    db.connection.set_trace_callback(lambda sql: seen.append(sql.split(None, 1)[0].upper()))
    return seen


async def test_a_durable_reply_turn_runs_one_statement_per_write(make_runtime) -> None:
    async with make_runtime({"echo": Echo}) as rt:
        outputs, link = await _device_link(rt, "a")
        assert await rt.submit_message(link, "first") is Outcome.APPLIED
        await wait_until(
            lambda: rt._outbox.undelivered(("echo", "a")) == 0, 5, "the first reply delivered"
        )
        seen = _trace(rt, "a")
        assert await rt.submit_message(link, "second") is Outcome.APPLIED
        # The insert, the outbox row, the state (written once per batch, before the COMMIT);
        # the delivered "first" reply's row is deleted in this transaction; no SAVEPOINT for a
        # batch of one turn.
        assert seen == ["BEGIN", "INSERT", "INSERT", "INSERT", "DELETE", "COMMIT"]
        assert outputs.sent == [b"ack first", b"ack second"]


async def test_a_failing_first_turn_rolls_back_only_itself(make_runtime, tmp_path) -> None:
    async with make_runtime({"echo": Echo}) as rt:
        outputs, link = await _device_link(rt, "b")
        assert await rt.submit_message(link, "one") is Outcome.APPLIED
        seen = _trace(rt, "b")
        # One batch: the failing turn is its first (no savepoint: the transaction is undone
        # and begun again), the next two share the commit.
        results = await asyncio.gather(
            *(rt.submit_message(link, text) for text in ("boom", "two", "three")),
            return_exceptions=True,
        )
        assert isinstance(results[0], ValueError) and results[1:] == [Outcome.APPLIED] * 2
        assert seen == [
            *("BEGIN", "INSERT", "ROLLBACK"),  # "boom": the whole transaction undone
            *("BEGIN", "INSERT", "CREATE", "INSERT"),  # "two", first again
            *("SAVEPOINT", "INSERT", "INSERT", "RELEASE"),  # "three"
            "INSERT",  # the state both left, once
            *("DELETE", "COMMIT"),  # the delivered reply to "one", then one commit for both
        ]  # (CREATE: the outbox table is checked again after a failed turn)
        assert await rt.call("echo", "b", "bodies") == ["one", "two", "three"]
        assert await rt.get_agent_state("echo", "b") == {"n": 3}
        await wait_until(lambda: len(outputs.sent) == 3, 5, "three replies sent")
        assert outputs.sent == [b"ack one", b"ack two", b"ack three"]
    assert _bodies(tmp_path / "state", "b") == ["one", "two", "three"]
    assert _stored_state(tmp_path / "state", "b") == {"n": 3}


async def test_a_failing_last_turn_leaves_the_state_of_the_turns_before(
    make_runtime, tmp_path
) -> None:
    # The state is written once per batch, before its COMMIT: a turn rolled back to its
    # savepoint must take its set_state back with it ("boom" sets n = -1, then raises).
    async with make_runtime({"echo": Echo}) as rt:
        _outputs, link = await _device_link(rt, "s")
        assert await rt.submit_message(link, "one") is Outcome.APPLIED
        statements: list[str] = []
        rt._scheduler.slots[("echo", "s")].db.connection.set_trace_callback(statements.append)
        results = await asyncio.gather(
            *(rt.submit_message(link, text) for text in ("two", "three", "boom")),
            return_exceptions=True,
        )
        assert results[:2] == [Outcome.APPLIED] * 2 and isinstance(results[2], ValueError)
        assert len([sql for sql in statements if "VALUES (0, 'state'" in sql]) == 1
        assert await rt.get_agent_state("echo", "s") == {"n": 3}
    assert _stored_state(tmp_path / "state", "s") == {"n": 3}
    assert _bodies(tmp_path / "state", "s") == ["one", "two", "three"]


async def test_a_failing_later_turn_keeps_the_earlier_ones(make_runtime, tmp_path) -> None:
    async with make_runtime({"echo": Echo}) as rt:
        link = MemoryLink("echo", "c")
        await rt.open_link(link, {})
        results = await asyncio.gather(
            *(rt.submit_message(link, text) for text in ("one", "boom", "two")),
            return_exceptions=True,
        )
        assert results[0] is Outcome.APPLIED and results[2] is Outcome.APPLIED
        assert isinstance(results[1], ValueError)
        assert await rt.get_agent_state("echo", "c") == {"n": 2}
    assert _bodies(tmp_path / "state", "c") == ["one", "two"]


async def test_dedup_seqs_are_remembered_and_still_exactly_once(make_runtime) -> None:
    async with make_runtime({"echo": Echo}) as rt:
        link = MemoryLink("echo", "d", transport="tcp")
        await rt.open_link(link, {})

        def send(text: str, seq: int) -> asyncio.Future[Outcome]:
            return rt.submit_message(link, text, DedupKey("dev-d", seq, 0))

        assert await send("s1", 1) is Outcome.APPLIED
        seen = _trace(rt, "d")
        assert await send("s1", 1) is Outcome.DUPLICATE
        assert await send("s2", 2) is Outcome.APPLIED
        assert "SELECT" not in seen  # the last seq came from memory
        with pytest.raises(LinkRejected):
            await send("refuse", 3)  # never accepted: its seq counts as consumed
        assert await send("s4", 4) is Outcome.APPLIED  # not a gap
        with pytest.raises(ValueError, match="boom"):
            await send("boom", 5)  # failed: seq 5 is not consumed
        assert await send("s5", 5) is Outcome.APPLIED  # the resend applies
        assert await send("s5", 5) is Outcome.DUPLICATE
        assert rt.hibernate_idle() == 1
        await wait_until(lambda: not rt._scheduler.closing, 5, "the agent hibernated")
        rt._scheduler.close_parked_before(float("inf"))
        await wait_until(lambda: not rt._scheduler.closing, 5, "its connection closed")
        # A fresh connection reads the seqs back from the file.
        assert await send("s5", 5) is Outcome.DUPLICATE
        assert await send("s6", 6) is Outcome.APPLIED
        # A batch of frames from one device writes its dedup row once, before the COMMIT.
        statements: list[str] = []
        db = rt._scheduler.slots[("echo", "d")].db
        db.connection.set_trace_callback(statements.append)
        results = await asyncio.gather(*(send(f"s{n}", n) for n in range(7, 12)))
        assert results == [Outcome.APPLIED] * 5
        dedup_writes = [sql for sql in statements if sql.startswith("INSERT") and "dedup:" in sql]
        assert len(dedup_writes) == 1 and statements.index(dedup_writes[0]) < statements.index(
            "COMMIT"
        )
        assert await send("s11", 11) is Outcome.DUPLICATE
        bodies = await rt.call("echo", "d", "bodies")
        assert bodies == ["s1", "s2", "s4", "s5", "s6", *(f"s{n}" for n in range(7, 12))]
    # After a restart the seqs are read back from the file: exactly once across it.
    async with make_runtime({"echo": Echo}) as rt:
        link = MemoryLink("echo", "d", transport="tcp")
        await rt.open_link(link, {})
        assert await send("s11", 11) is Outcome.DUPLICATE
        assert await send("s12", 12) is Outcome.APPLIED


async def test_turn_latency_histogram_by_agent_class(make_runtime) -> None:
    def count() -> float:
        value = REGISTRY.get_sample_value(
            "gatewayd_agent_turn_seconds_count", {"agent_class": "echo"}
        )
        return value or 0.0

    def turns_ok() -> float:
        return REGISTRY.get_sample_value("gatewayd_agent_turns_total", {"result": "ok"}) or 0.0

    before, ok_before = count(), turns_ok()
    async with make_runtime({"echo": Echo}) as rt:
        link = MemoryLink("echo", "e")
        await rt.open_link(link, {})
        for text in ("a", "b"):
            assert await rt.submit_message(link, text) is Outcome.APPLIED
    # START, CONNECT and the two messages, each observed once.
    assert count() == before + 4
    assert turns_ok() == ok_before + 4
    inf = REGISTRY.get_sample_value(
        "gatewayd_agent_turn_seconds_bucket", {"agent_class": "echo", "le": "+Inf"}
    )
    assert inf == count()


def test_a_wake_with_a_kept_wal_commits_nothing_itself(tmp_path: Path) -> None:
    def open_db() -> AgentDatabase:
        return AgentDatabase.open(
            tmp_path, "c", "w", durability="normal", max_db_bytes=1 << 22, max_value_bytes=100
        )

    db = open_db()
    assert db.keeps_wal and not db.connection.in_transaction  # a new file: committed here
    db.begin()
    db.connection.execute("CREATE TABLE t (i INTEGER)")
    db.commit()
    db.close()  # checkpoints, restarts the WAL and records which file it belongs to
    reopened = open_db()
    try:
        # The open left its transaction to the caller; the ownership record is forgotten in
        # it, so it is gone once the caller's first batch commits.
        assert reopened.connection.in_transaction
        meta = "SELECT count(*) FROM _gw_meta WHERE key = 'wal_for_file'"
        assert reopened.connection.execute(meta).fetchone()[0] == 0
        reopened.connection.execute("INSERT INTO t VALUES (1)")
        reopened.commit()
        with sqlite3.connect(reopened.path) as other:
            assert other.execute(meta).fetchone()[0] == 0
            assert other.execute("SELECT i FROM t").fetchall() == [(1,)]
    finally:
        reopened.close()


_WAKE_PROBE = """
import asyncio, sys, threading
from pathlib import Path
from gatewayd.agents import AgentRuntime, AgentSettings, scheduler
from tests.agents.test_turn_cost import Echo
from tests.waiting import wait_until
scheduler.PARKED_DATABASES = 0  # every wake opens its file

async def main():
    rt = AgentRuntime(AgentSettings(state_dir=Path(sys.argv[1])), {"echo": Echo})
    await rt.start()
    for round in range(3):  # created, then woken twice from a kept WAL
        if round < 2:  # together: opened on the executor (the first one on the loop)
            await asyncio.gather(*(rt.call("echo", f"a{i}", "bodies") for i in range(20)))
        else:  # one at a time: opened on the loop (storage.py: open_if_warm)
            for i in range(20):
                await rt.call("echo", f"a{i}", "bodies")
        rt.hibernate_idle()
        await wait_until(
            lambda: not rt.stats()["active_agents"] and not rt._scheduler.closing,
            10,
            "every agent hibernated",
        )
    stats = rt.stats()
    print("LOOP", threading.get_native_id(), stats["wakes_total"], stats["warm_opens_total"])
    await rt.close()

asyncio.run(main())
"""


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="needs strace with ptrace permitted")
def test_wakes_from_a_kept_wal_never_fsync_on_the_loop(tmp_path: Path) -> None:
    """durability="normal": the open commits nothing of its own when the kept WAL is started,
    so the first COMMIT of a wake runs on the loop, and a wake with nothing else to run opens
    its file on the loop: both must only read and append (no fsync there)."""
    trace = tmp_path / "sync.strace"
    done = subprocess.run(
        [
            *("strace", "-f", "-e", "trace=fsync,fdatasync", "-o", str(trace)),
            *(sys.executable, "-c", _WAKE_PROBE, str(tmp_path / "state")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    _, loop_tid, wakes, warm_opens = done.stdout.split()
    # The sequential round opens on the loop when nothing else runs at that moment; on a busy
    # machine a hibernation still closing can send a few to the executor: what the trace needs
    # is that the loop path ran (and then never synced).
    assert int(wakes) == 60 and int(warm_opens) >= 1
    calls = re.findall(r"^(\d+)\s+f(?:data)?sync\(", trace.read_text(), flags=re.MULTILINE)
    assert calls, "no fsync at all: the trace did not work"
    assert loop_tid not in calls


def test_state_json_is_what_json_dumps_gives() -> None:
    values: list[Any] = [
        {"n": 1, "f": 1.5, "s": 'é\n"', "none": None, "b": True, "l": [1, [2, {"k": "v"}]]},
        "text",
        3,
        [],
        {"nan": float("nan"), 1: "int key"},
    ]
    for value in values:
        assert encode_state(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        encode_state({"s": {1, 2}})
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(RecursionError):
        encode_state(circular)


class Circular(Agent):
    @callable
    def loop(self) -> None:
        state: dict[str, Any] = {}
        state["self"] = state
        self.set_state(state)


async def test_a_state_that_contains_itself_is_refused(make_runtime) -> None:
    async with make_runtime({"c": Circular}) as rt:
        with pytest.raises(StateRejectedError, match="JSON-serialisable"):
            await rt.call("c", "x", "loop")
        assert await rt.get_agent_state("c", "x") is None


def test_open_if_warm_only_opens_what_needs_no_write(tmp_path: Path) -> None:
    options: dict[str, Any] = {"max_db_bytes": 1 << 22, "max_value_bytes": 100}
    assert AgentDatabase.open_if_warm(tmp_path, "c", "w", durability="normal", **options) is None
    db = AgentDatabase.open(tmp_path, "c", "w", durability="normal", **options)
    db.close()  # kept, restarted WAL
    assert AgentDatabase.open_if_warm(tmp_path, "c", "w", durability="full", **options) is None
    warm = AgentDatabase.open_if_warm(tmp_path, "c", "w", durability="normal", **options)
    assert warm is not None and warm.connection.in_transaction and warm.keeps_wal
    warm.commit()
    warm.close()
    os.unlink(db.path + "-wal")  # no WAL to append to: the open would have to start one
    assert AgentDatabase.open_if_warm(tmp_path, "c", "w", durability="normal", **options) is None
    AgentDatabase.open(tmp_path, "c", "w", durability="normal", **options).close()
    assert AgentDatabase.open_if_warm(tmp_path, "c", "x", durability="normal", **options) is None
