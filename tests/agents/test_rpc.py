"""RPC streams: each chunk leaves as it is produced, after the writes before it committed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from gatewayd.agents import Agent, RpcStream, callable
from gatewayd.agents.storage import agent_db_path
from protocols.jsonproto import decode_server_text
from protocols.link import Outcome
from tests.agents.conftest import MemoryLink

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0


def rpc(rpc_id: int, method: str, *args) -> str:
    return json.dumps({"type": "gw.rpc", "id": rpc_id, "method": method, "args": list(args)})


def committed_items(path: Path) -> list[int]:
    """What another process reading the agent's file would see now."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [row[0] for row in db.execute("SELECT i FROM items ORDER BY i")]


class Producer(Agent):
    received: list[asyncio.Event]

    def on_start(self):
        self.sql("CREATE TABLE IF NOT EXISTS items (i INTEGER)")
        self.sql("CREATE TABLE IF NOT EXISTS log (text TEXT)")

    def on_message(self, conn, message):
        if isinstance(message, bytes):
            self.sql("INSERT INTO log VALUES (?)", message.decode())

    @callable(streaming=True)
    async def produce(self, stream: RpcStream, n: int):
        for i in range(n):
            self.sql("INSERT INTO items VALUES (?)", i)
            await stream.send(i)
            # Goes on only once the client holds chunk i: without release-as-produced the
            # chunks wait for the end of the turn, and this turn times out.
            await type(self).received[i].wait()
        return n

    @callable(streaming=True)
    def produce_sync(self, stream: RpcStream, n: int):
        for i in range(n):
            self.sql("INSERT INTO items VALUES (?)", i)
            stream.send(i)
        return n

    @callable(streaming=True)
    async def fail_after_chunk(self, stream: RpcStream):
        self.sql("INSERT INTO items VALUES (0)")
        await stream.send("first")
        self.sql("INSERT INTO items VALUES (1)")
        raise ValueError("failed after the first chunk")


class ChunkWatcher:
    """A client link that, as each chunk arrives, records what is committed on disk."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.committed_at_chunk: list[list[int]] = []
        self.frames: list[dict] = []
        self.hold_from: int | None = None  # chunks from this index on: the test releases them
        self.link = MemoryLink("p", "1", transport="ws", on_send=self._on_send)

    def _on_send(self, data: bytes | str) -> None:
        frame = decode_server_text(data) if isinstance(data, str) else None
        if frame is None or frame["type"] != "gw.rpc_result":
            return
        self.frames.append(frame)
        if not frame["done"]:
            self.committed_at_chunk.append(committed_items(self.db_path))
            if self.hold_from is None or frame["chunk"] < self.hold_from:
                Producer.received[frame["chunk"]].set()


@pytest.fixture
def watcher(tmp_path: Path) -> ChunkWatcher:
    Producer.received = [asyncio.Event() for _ in range(10)]
    return ChunkWatcher(agent_db_path(tmp_path / "state", "p", "1"))


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_each_chunk_leaves_as_produced_after_its_writes_commit(
    make_runtime, watcher, durability
):
    async with make_runtime({"p": Producer}, durability=durability, turn_timeout_s=5) as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)
        outcome = await asyncio.wait_for(
            rt.submit_message(watcher.link, rpc(1, "produce", 3)), WAIT_S
        )
        assert outcome is Outcome.APPLIED
        assert [f.get("chunk", f.get("result")) for f in watcher.frames] == [0, 1, 2, 3]
        assert watcher.frames[-1]["ok"] and watcher.frames[-1]["done"]
        # Chunk i left after item i was committed, and before item i+1 was written.
        assert watcher.committed_at_chunk == [[0], [0, 1], [0, 1, 2]]


async def test_a_sync_streaming_method_releases_chunks_as_it_sends_them(make_runtime, watcher):
    async with make_runtime({"p": Producer}) as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)
        await asyncio.wait_for(rt.submit_message(watcher.link, rpc(1, "produce_sync", 3)), WAIT_S)
        assert watcher.committed_at_chunk == [[0], [0, 1], [0, 1, 2]]
        assert watcher.frames[-1]["result"] == 3


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_a_failure_after_a_chunk_rolls_back_only_what_followed_it(
    make_runtime, watcher, durability
):
    async with make_runtime({"p": Producer}, durability=durability) as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)
        with pytest.raises(ValueError, match="failed after the first chunk"):
            await asyncio.wait_for(
                rt.submit_message(watcher.link, rpc(1, "fail_after_chunk")), WAIT_S
            )
        assert [f["done"] for f in watcher.frames] == [False, True]
        assert watcher.frames[0]["chunk"] == "first"
        assert (
            not watcher.frames[1]["ok"]
            and "failed after the first chunk" in (watcher.frames[1]["error"])
        )
        assert committed_items(watcher.db_path) == [0]


async def test_a_chunk_also_settles_the_earlier_events_of_its_batch(make_runtime, watcher):
    async with make_runtime({"p": Producer}, turn_timeout_s=5) as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)
        watcher.hold_from = 0  # the stream waits after its first chunk until released
        earlier = rt.submit_message(watcher.link, b"before the stream")  # same batch
        streaming = rt.submit_message(watcher.link, rpc(1, "produce", 2))
        # Acknowledged at the stream's first chunk, while the stream's turn is still open.
        assert await asyncio.wait_for(earlier, WAIT_S) is Outcome.APPLIED
        assert not streaming.done()
        assert watcher.committed_at_chunk == [[0]]
        Producer.received[0].set()
        Producer.received[1].set()
        assert await asyncio.wait_for(streaming, WAIT_S) is Outcome.APPLIED


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_a_commit_that_fails_at_a_chunk_loses_the_batch_and_sends_nothing(
    make_runtime, watcher, durability, monkeypatch
):
    from gatewayd.agents import CommitError
    from gatewayd.agents.storage import AgentDatabase

    async with make_runtime({"p": Producer}, durability=durability, turn_timeout_s=5) as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)

        def failing_commit(self):
            # Fault injection at the disk boundary: the COMMIT itself fails (e.g. EIO).
            self.rollback()
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(AgentDatabase, "commit", failing_commit)
        with pytest.raises(CommitError, match="commit failed at a streaming RPC chunk"):
            await asyncio.wait_for(rt.submit_message(watcher.link, rpc(1, "produce", 3)), WAIT_S)
        monkeypatch.undo()
        assert watcher.frames == []  # neither the chunk nor a reply left
        assert committed_items(watcher.db_path) == []
        assert rt.stats()["commit_errors"] == 1
        # The agent was reloaded from disk and serves again.
        Producer.received = [asyncio.Event() for _ in range(10)]
        await asyncio.wait_for(rt.submit_message(watcher.link, rpc(2, "produce", 1)), WAIT_S)
        assert committed_items(watcher.db_path) == [0]


class Parallel(Producer):
    @callable(streaming=True)
    async def sibling_chunks(self, stream: RpcStream):
        async def part(i: int) -> None:
            if i == 0:
                self.sql("INSERT INTO items VALUES (0)")
            await stream.send(i)

        await asyncio.gather(part(0), part(1))
        return "both"

    @callable(streaming=True)
    async def write_during_commit(self, stream: RpcStream):
        async def chunk() -> None:
            self.sql("INSERT INTO items VALUES (0)")
            await stream.send(0)

        async def write() -> None:
            self.sql("INSERT INTO items VALUES (1)")

        await asyncio.gather(chunk(), write())


async def test_sibling_tasks_of_a_turn_take_turns_at_commit_points(make_runtime, watcher):
    async with make_runtime({"p": Parallel}, durability="full") as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)
        await asyncio.wait_for(rt.submit_message(watcher.link, rpc(1, "sibling_chunks")), WAIT_S)
        assert [f.get("chunk", f.get("result")) for f in watcher.frames] == [0, 1, "both"]
        assert watcher.committed_at_chunk == [[0], [0]]


async def test_a_write_while_a_chunk_commits_off_the_loop_is_refused(make_runtime, watcher):
    async with make_runtime({"p": Parallel}, durability="full") as rt:
        await asyncio.wait_for(rt.open_link(watcher.link, {}), WAIT_S)
        with pytest.raises(Exception, match="while a streaming chunk of this turn is being"):
            await asyncio.wait_for(
                rt.submit_message(watcher.link, rpc(1, "write_during_commit")), WAIT_S
            )
        assert committed_items(watcher.db_path) == [0]  # never a write outside the transaction
