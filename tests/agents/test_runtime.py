"""Turns, FIFO, concurrency, the output gate, batching, failures and timeouts."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import ClassVar

import numpy as np
import pytest

from gatewayd.agents import (
    Agent,
    AgentSettings,
    CommitError,
    NoEngineError,
    NotInTurnError,
    RpcError,
    TurnTimeoutError,
    callable,
)
from gatewayd.agents.errors import SequenceGapError
from gatewayd.agents.storage import AgentDatabase, agent_db_path
from protocols.link import DedupKey, LinkRejected, Outcome
from tests.agents.conftest import MemoryLink
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Recorder(Agent):
    initial_state: ClassVar[dict] = {"count": 0}
    instances: list[int] = []  # noqa: RUF012 - test bookkeeping across instances
    starts = 0
    meeting: ClassVar[asyncio.Barrier | None] = None

    def on_start(self) -> None:
        type(self).starts += 1
        type(self).instances.append(id(self))
        self.sql("CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, text TEXT)")

    def on_message(self, conn, message):
        text = message if isinstance(message, str) else message.decode()
        if text == "refuse":
            self.sql("INSERT INTO log (text) VALUES ('should be rolled back')")
            raise LinkRejected("this reading is out of range")
        if text == "boom":
            self.sql("INSERT INTO log (text) VALUES ('should be rolled back')")
            self.set_state({"count": -1})
            raise ValueError("boom requested")
        self.sql("INSERT INTO log (text) VALUES (?)", text)
        self.set_state({"count": self.state["count"] + 1})
        conn.send(f"ack {text}")

    @callable
    def log(self) -> list[str]:
        return [row["text"] for row in self.sql("SELECT text FROM log ORDER BY seq")]

    @callable
    async def slow(self, delay_s: float, label: str) -> str:
        self.sql("INSERT INTO log (text) VALUES (?)", f"start {label}")
        await asyncio.sleep(delay_s)
        self.sql("INSERT INTO log (text) VALUES (?)", f"end {label}")
        return label

    @callable
    async def meet(self, label: str) -> str:
        """Returns only once every agent of the meeting is inside its own turn at once."""
        assert Recorder.meeting is not None
        async with asyncio.timeout(10):
            await Recorder.meeting.wait()
        return label

    @callable
    async def hang(self) -> None:
        self.sql("INSERT INTO log (text) VALUES ('hang')")
        await asyncio.Event().wait()

    def not_callable(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _reset_recorder():
    Recorder.instances = []
    Recorder.starts = 0


def read_log(settings_dir, agent_id: str) -> list[str]:
    """Read the agent's committed rows from another SQLite connection."""
    path = agent_db_path(settings_dir, "rec", agent_id)
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT text FROM log ORDER BY seq")]


async def test_one_live_instance_per_identity_and_fifo(make_runtime):
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "a")
        futures = [rt.open_link(link, {})]
        futures += [rt.submit_message(link, f"m{i}") for i in range(50)]
        assert all(r is Outcome.APPLIED for r in await asyncio.gather(*futures))
        assert await rt.call("rec", "a", "log") == [f"m{i}" for i in range(50)]
        assert len(set(Recorder.instances)) == 1 and Recorder.starts == 1
        assert link.plain() == [f"ack m{i}" for i in range(50)]
        assert (await rt.get_agent_state("rec", "a")) == {"count": 50}


async def test_different_agents_run_concurrently_same_agent_serially(make_runtime):
    async with make_runtime({"rec": Recorder}) as rt:
        # A rendezvous, not a stopwatch: run one at a time, the first would wait for ever.
        Recorder.meeting = asyncio.Barrier(5)
        labels = await asyncio.gather(
            *(rt.call("rec", f"agent{i}", "meet", f"x{i}") for i in range(5))
        )
        assert labels == [f"x{i}" for i in range(5)]

        await asyncio.gather(
            rt.call("rec", "one", "slow", 0.05, "a"), rt.call("rec", "one", "slow", 0.01, "b")
        )
        # One event at a time: b started only after a ended.
        assert await rt.call("rec", "one", "log") == ["start a", "end a", "start b", "end b"]


async def test_output_gate_releases_only_after_commit(make_runtime, tmp_path):
    state_dir = tmp_path / "state"
    seen_at_send: list[list[str]] = []

    def check_committed(data):
        if isinstance(data, str) and data.startswith("ack "):
            seen_at_send.append(read_log(state_dir, "gate"))

    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "gate", on_send=check_committed)
        await rt.open_link(link, {})
        futures = [rt.submit_message(link, f"m{i}") for i in range(20)]
        await asyncio.gather(*futures)
    # Whenever an ack was released, its row was already committed (visible to another reader).
    assert len(seen_at_send) == 20
    for i, rows in enumerate(seen_at_send):
        assert f"m{i}" in rows


async def test_failing_turn_rolls_back_only_itself_in_a_shared_commit(make_runtime, tmp_path):
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "batch")
        await rt.open_link(link, {})
        futures = [rt.submit_message(link, t) for t in ("a", "b", "boom", "c")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[:2] == [Outcome.APPLIED, Outcome.APPLIED] and results[3] is Outcome.APPLIED
        assert isinstance(results[2], ValueError)
        assert await rt.call("rec", "batch", "log") == ["a", "b", "c"]
        assert await rt.get_agent_state("rec", "batch") == {"count": 3}
        # The four events shared fewer commits than turns (write coalescing).
        stats = rt.stats()
        assert stats["commits_total"] < stats["turns_total"]
        assert stats["turn_errors"] == 1
        # The sender got a clear error frame; its ack for "boom" never left.
        errors = link.frames("gw.error")
        assert len(errors) == 1 and "boom requested" in errors[0]["error"]
        assert "ack boom" not in link.plain()
    assert read_log(tmp_path / "state", "batch") == ["a", "b", "c"]


async def test_turn_timeout_rolls_back_and_agent_keeps_working(make_runtime):
    async with make_runtime({"rec": Recorder}, turn_timeout_s=0.2) as rt:
        with pytest.raises(TurnTimeoutError, match="turn_timeout_s"):
            await rt.call("rec", "t", "hang")
        assert await rt.call("rec", "t", "slow", 0, "after") == "after"
        assert await rt.call("rec", "t", "log") == ["start after", "end after"]
        assert rt.stats()["turn_timeouts"] == 1


async def test_rpc_errors_are_clear(make_runtime):
    async with make_runtime({"rec": Recorder}) as rt:
        with pytest.raises(RpcError, match="not @callable"):
            await rt.call("rec", "r", "not_callable")
        with pytest.raises(RpcError, match="has no method 'missing'"):
            await rt.call("rec", "r", "missing")
        with pytest.raises(RpcError, match="bad arguments"):
            await rt.call("rec", "r", "slow", 1)
        with pytest.raises(RpcError, match="no callable method '_run'"):
            await rt.call("rec", "r", "_run")
        assert await rt.call("rec", "r", "log") == []


async def test_unknown_class_bad_id_and_drain_reject(make_runtime):
    async with make_runtime({"rec": Recorder}) as rt:
        with pytest.raises(LinkRejected, match="unknown agent class 'nope'"):
            await rt.open_link(MemoryLink("nope", "x"), {})
        with pytest.raises(LinkRejected, match="bad agent id"):
            await rt.open_link(MemoryLink("rec", ""), {})
        link = MemoryLink("rec", "d")
        await rt.open_link(link, {})
        pending = [rt.submit_message(link, f"m{i}") for i in range(10)]
        assert await rt.drain(5.0)
        assert all(f.result() is Outcome.APPLIED for f in pending)  # queued turns finished
        with pytest.raises(LinkRejected, match="shutting down"):
            await rt.submit_message(link, "late")
        assert rt.stats()["rejected_total"] >= 3


async def test_a_failed_seq_holds_back_later_seqs_until_resent(make_runtime):
    """Pipelined frames 1..3 where 2 fails: 3 must not be applied past the hole, or the
    retransmission of 2 would later count as a duplicate and be lost."""
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "dev", transport="tcp")
        await rt.open_link(link, {})
        results = await asyncio.gather(
            rt.submit_message(link, b"one", DedupKey("dev", 1)),
            rt.submit_message(link, b"boom", DedupKey("dev", 2)),
            rt.submit_message(link, b"three", DedupKey("dev", 3)),
            return_exceptions=True,
        )
        assert results[0] is Outcome.APPLIED
        assert isinstance(results[1], ValueError)
        assert isinstance(results[2], SequenceGapError)
        assert "seq 3 not applied because seq 2 is still unapplied" in str(results[2])
        # The device resends 2 (now good) and 3, in order: both applied, exactly once.
        assert await rt.submit_message(link, b"two", DedupKey("dev", 2)) is Outcome.APPLIED
        assert await rt.submit_message(link, b"three", DedupKey("dev", 3)) is Outcome.APPLIED
        assert await rt.call("rec", "dev", "log") == ["one", "two", "three"]


async def test_a_refused_seq_is_consumed_so_later_seqs_flow(make_runtime):
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "dev", transport="tcp")
        await rt.open_link(link, {})
        with pytest.raises(LinkRejected, match="out of range"):
            await rt.submit_message(link, b"refuse", DedupKey("dev", 1))
        assert await rt.submit_message(link, b"two", DedupKey("dev", 2)) is Outcome.APPLIED
        assert await rt.submit_message(link, b"refuse", DedupKey("dev", 1)) is Outcome.DUPLICATE
        assert await rt.call("rec", "dev", "log") == ["two"]


async def test_dedup_is_exactly_once_across_restart(make_runtime, tmp_path):
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "dev", transport="tcp")
        await rt.open_link(link, {})
        results = await asyncio.gather(
            rt.submit_message(link, b"one", DedupKey("dev-1", 1)),
            rt.submit_message(link, b"two", DedupKey("dev-1", 2)),
            rt.submit_message(link, b"one", DedupKey("dev-1", 1)),  # retransmission, same batch
            rt.submit_message(link, b"other", DedupKey("dev-2", 1)),
        )
        assert results == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE, Outcome.APPLIED]
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "dev", transport="tcp")
        await rt.open_link(link, {})
        assert await rt.submit_message(link, b"two", DedupKey("dev-1", 2)) is Outcome.DUPLICATE
        assert await rt.submit_message(link, b"three", DedupKey("dev-1", 3)) is Outcome.APPLIED
        assert await rt.call("rec", "dev", "log") == ["one", "two", "other", "three"]
        assert rt.stats()["duplicates_total"] == 1


async def test_commit_failure_drops_outputs_fails_futures_and_reloads(make_runtime, monkeypatch):
    errors: list[BaseException] = []

    class Noting(Recorder):
        def on_error(self, err):
            errors.append(err)

    async with make_runtime({"rec": Noting}) as rt:
        link = MemoryLink("rec", "c")
        await rt.open_link(link, {})
        await rt.submit_message(link, "kept")
        sent_before = list(link.sent)
        real_commit = AgentDatabase.commit

        def failing_commit(self):
            # Fault injection at the disk boundary: the COMMIT itself fails (e.g. EIO).
            self.rollback()
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(AgentDatabase, "commit", failing_commit)
        with pytest.raises(CommitError, match="outputs dropped"):
            await rt.submit_message(link, "lost")
        monkeypatch.setattr(AgentDatabase, "commit", real_commit)
        assert link.sent == sent_before  # the ack for "lost" never left
        assert errors and isinstance(errors[0], CommitError)
        # Reloaded from disk: the uncommitted state change is gone, on_start ran again.
        assert await rt.get_agent_state("rec", "c") == {"count": 1}
        assert await rt.call("rec", "c", "log") == ["kept"]
        assert Noting.starts == 2
        assert rt.stats()["commit_errors"] == 1


async def test_sql_outside_turn_and_transaction_control_are_refused(make_runtime):
    holder: list[Agent] = []
    async with make_runtime({"rec": Recorder}) as rt:
        await rt.run_in_agent("rec", "s", holder.append)
        with pytest.raises(NotInTurnError, match="outside a turn"):
            holder[0].sql("SELECT 1")
        with pytest.raises(Exception, match="transactions"):
            await rt.run_in_agent("rec", "s", lambda a: a.sql("COMMIT"))
        rows = await rt.run_in_agent("rec", "s", lambda a: a.sql("SELECT ? AS x", 5))
        assert rows == [{"x": 5}]


async def test_durability_full_sets_synchronous_full(make_runtime):
    async with make_runtime({"rec": Recorder}, durability="full") as rt:
        rows = await rt.run_in_agent("rec", "f", lambda a: a.sql("PRAGMA synchronous"))
        assert rows[0]["synchronous"] == 2  # FULL
        rows = await rt.run_in_agent("rec", "f", lambda a: a.sql("PRAGMA journal_mode"))
        assert rows[0]["journal_mode"] == "wal"
    async with make_runtime({"rec": Recorder}, durability="normal") as rt:
        rows = await rt.run_in_agent("rec", "f", lambda a: a.sql("PRAGMA synchronous"))
        assert rows[0]["synchronous"] == 1  # NORMAL


class Inferring(Agent):
    @callable
    async def score(self, values):
        return await self.infer("anomaly", values, priority=1)


class SumEngine:
    """A duck-typed engine: the runtime only needs `async infer(model, inputs, **kw)`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    async def infer(self, model, inputs, **kw):
        self.calls.append((model, kw))
        await asyncio.sleep(0)
        return {"score": float(sum(inputs))}


async def test_infer_delegates_to_engine_or_fails_clearly(make_runtime):
    engine = SumEngine()
    async with make_runtime({"inf": Inferring}, engine=engine) as rt:
        assert await rt.call("inf", "x", "score", [1, 2]) == {"score": 3.0}
        assert engine.calls == [("anomaly", {"priority": 1})]
    async with make_runtime({"inf": Inferring}) as rt:
        with pytest.raises(NoEngineError, match="no inference engine"):
            await rt.call("inf", "x", "score", [1])
    with pytest.raises(TypeError, match="async def infer"):
        from gatewayd.agents import AgentRuntime

        AgentRuntime(AgentSettings(state_dir=rt.settings.state_dir), {}, engine=object())


async def test_persistence_across_restart(make_runtime):
    async with make_runtime({"rec": Recorder}) as rt:
        link = MemoryLink("rec", "p")
        await rt.open_link(link, {})
        await asyncio.gather(*(rt.submit_message(link, f"m{i}") for i in range(3)))
    async with make_runtime({"rec": Recorder}) as rt:
        assert await rt.get_agent_state("rec", "p") == {"count": 3}
        assert await rt.call("rec", "p", "log") == ["m0", "m1", "m2"]


class Room(Agent):
    closed: ClassVar[list] = []

    def on_message(self, conn, message):
        self.broadcast(f"{conn.id}: {message}", without=[conn])

    def on_close(self, conn, code, reason):
        type(self).closed.append((conn.id, code, reason))
        self.broadcast(f"{conn.id} left")


async def test_broadcast_without_sender_on_close_and_limits(make_runtime):
    Room.closed = []
    async with make_runtime({"room": Room}, max_message_bytes=100) as rt:
        assert rt.healthy()
        a, b, c = (MemoryLink("room", "r", transport="tcp") for _ in range(3))
        for link in (a, b, c):
            await rt.open_link(link, {})
        await rt.submit_message(a, "hi")
        assert a.sent == [] and b.sent == c.sent == [f"{a.link_id}: hi"]
        with pytest.raises(LinkRejected, match="max_message_bytes=100") as info:
            await rt.submit_message(a, "x" * 101)
        assert info.value.code == 1009
        await rt.close_link(a, 1001, "bye")
        assert Room.closed == [(a.link_id, 1001, "bye")]
        assert b.sent[-1] == f"{a.link_id} left" and a.sent == []
        with pytest.raises(LinkRejected, match="not open"):
            await rt.submit_message(a, "ghost")
        assert rt.stats()["connections_open"] == 2
    assert not rt.healthy()


def test_runs_on_uvloop(tmp_path):
    uvloop = pytest.importorskip("uvloop")
    from gatewayd.agents import AgentRuntime

    async def scenario():
        rt = AgentRuntime(AgentSettings(state_dir=tmp_path), {"rec": Recorder})
        await rt.start()
        try:
            results = await asyncio.gather(
                *(rt.call("rec", f"u{i % 3}", "slow", 0, str(i)) for i in range(30))
            )
            return results, await rt.call("rec", "u0", "log")
        finally:
            await rt.close()

    results, log = uvloop.run(scenario())
    assert results == [str(i) for i in range(30)]
    assert log[:4] == ["start 0", "end 0", "start 3", "end 3"]


async def test_healthy_reports_a_stuck_commit(make_runtime, monkeypatch):
    # durability="full": commits (which fsync) run on the commit executor, where a stalled disk
    # shows up as a commit in flight. ("normal" commits inline and never waits on a disk.)
    async with make_runtime({"rec": Recorder}, turn_timeout_s=0.2, durability="full") as rt:
        await rt.call("rec", "h", "log")
        real_commit = AgentDatabase.commit
        disk_back = threading.Event()

        def stalled_commit(self):
            disk_back.wait(10)  # a disk that stalls (fault injection at the disk boundary)
            real_commit(self)

        monkeypatch.setattr(AgentDatabase, "commit", stalled_commit)
        pending = rt.submit_call("rec", "h", "slow", 0, "x")
        try:
            await wait_until(lambda: not rt.healthy(), 5, "the stuck commit to be reported")
        finally:
            disk_back.set()
        assert await pending == "x"
        assert rt.healthy()


async def test_commit_runs_inline_with_normal_and_on_the_executor_with_full(
    make_runtime, monkeypatch
):
    # "normal" COMMITs never fsync, so they skip the thread hand-off; "full" ones fsync and
    # must never run on the event loop thread.
    threads: list[int] = []
    real_commit = AgentDatabase.commit

    def recording_commit(self):
        threads.append(threading.get_ident())
        real_commit(self)

    monkeypatch.setattr(AgentDatabase, "commit", recording_commit)
    loop_thread = threading.get_ident()
    for durability, on_loop in (("normal", True), ("full", False)):
        threads.clear()
        async with make_runtime({"rec": Recorder}, durability=durability) as rt:
            for i in range(3):
                assert await rt.call("rec", "t", "slow", 0, str(i)) == str(i)
        assert threads
        assert all((thread == loop_thread) == on_loop for thread in threads), durability


async def test_normal_durability_checkpoints_on_the_executor_and_keeps_every_commit(
    make_runtime, monkeypatch
):
    from gatewayd.agents.storage import CHECKPOINT_AFTER_COMMITS

    checkpoint_threads: list[int] = []
    real_checkpoint = AgentDatabase.checkpoint

    def recording_checkpoint(self):
        checkpoint_threads.append(threading.get_ident())
        real_checkpoint(self)

    monkeypatch.setattr(AgentDatabase, "checkpoint", recording_checkpoint)
    total = CHECKPOINT_AFTER_COMMITS * 2 + 5
    async with make_runtime({"rec": Recorder}) as rt:
        for i in range(total):
            await rt.call("rec", "cp", "slow", 0, str(i))  # one commit each
        assert len(checkpoint_threads) == 2
        assert threading.get_ident() not in checkpoint_threads
        log = await rt.call("rec", "cp", "log")
    assert len([entry for entry in log if entry.startswith("end")]) == total
    async with make_runtime({"rec": Recorder}) as rt:  # reopened from disk
        log = await rt.call("rec", "cp", "log")
    assert len([entry for entry in log if entry.startswith("end")]) == total


class WindowScorer(Agent):
    @callable
    async def score_window(self, rows):
        requests = [np.asarray([row], np.float32) for row in rows]
        outputs = await self.infer_many("mlp", requests)
        return [output["logits"].tolist() for output in outputs]


async def test_infer_many_scores_a_window_through_the_real_engine(make_runtime, tmp_path):
    # A real onnxruntime session: each of the window's requests gets exactly its own row's
    # outputs back, in order, the same as one infer() per row.
    from engine import ModelSpec
    from tests.engine.onnx_models import build_mlp, serving

    spec = ModelSpec("mlp", build_mlp(tmp_path / "mlp.onnx"), buckets=(1, 4, 16))
    rows = np.random.default_rng(5).normal(size=(20, 8)).astype(np.float32).tolist()
    async with serving(spec) as engine, make_runtime({"w": WindowScorer}, engine=engine) as rt:
        scored = await rt.call("w", "a", "score_window", rows)
        one_by_one = [
            (await engine.infer("mlp", np.asarray([row], np.float32)))["logits"].tolist()
            for row in rows
        ]
    assert scored == one_by_one and len(scored) == 20
    async with make_runtime({"w": WindowScorer}) as rt:
        with pytest.raises(NoEngineError, match="infer_many"):
            await rt.call("w", "a", "score_window", rows[:2])
