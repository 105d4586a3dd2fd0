"""Chat agents end to end: real WebSocket clients, the real runtime and ws transport, real
SQLite files. Streams are paced by a scripted model (events between chunks), never by sleep."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import ClassVar

import pytest

from gatewayd.agents.storage import agent_db_path
from gatewayd.chat import ChatAgent, EchoBackend, ScriptedBackend
from tests.chat.conftest import WAIT_S, user
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def words(n: int) -> list[dict]:
    return [{"type": "text-delta", "id": "t", "delta": f"w{i} "} for i in range(n)]


class Scripted(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])


class Echo(ChatAgent):
    backend = EchoBackend()


def chunks_of(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "gw.chat.chunk"]


async def test_two_clients_see_the_same_stream_and_the_answer_is_stored(serve):
    Scripted.backend = ScriptedBackend([{"type": "start"}, *words(5), {"type": "finish"}])
    async with serve({"chat": Scripted}) as served:
        async with served.client("chat", "c1") as a, served.client("chat", "c1") as b:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "hello")])
            synced = (await b.until_type("gw.chat.messages"))[-1]
            assert [m["id"] for m in synced["messages"]] == ["u1"]
            seen_a = await a.until_type("gw.chat.done")
            seen_b = await b.until_type("gw.chat.done")
            for seen in (seen_a, seen_b):
                chunks = chunks_of(seen)
                assert [c["seq"] for c in chunks] == list(range(7))
                assert all(c["request"] == "r1" and not c["replay"] for c in chunks)
                assert seen[-1]["status"] == "complete"
            assert chunks_of(seen_a) == chunks_of(seen_b)
            messages = await a.messages()
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert messages[1]["parts"] == [
                {"type": "text", "text": "".join(f"w{i} " for i in range(5))}
            ]
        assert Scripted.backend.requests[0] == [user("u1", "hello")]


async def test_a_client_that_reconnects_mid_stream_gets_every_chunk_once_in_order(serve):
    gates = {3: asyncio.Event(), 6: asyncio.Event()}
    Scripted.backend = ScriptedBackend(words(9), gates)
    async with serve({"chat": Scripted}) as served:
        async with served.client("chat", "c1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "count")])
            first = chunks_of(await a.until(lambda f: f.get("seq") == 2))
        async with served.client("chat", "c1") as b:
            gates[3].set()  # chunks 3..5 are produced while no client is subscribed
            await b.send("gw.chat.resume")
            resumed = await b.until_type("gw.chat.replay_complete")
            assert resumed[0]["type"] == "gw.chat.resuming"
            replay = chunks_of(resumed)
            assert all(c["replay"] for c in replay)
            gates[6].set()
            live = chunks_of(await b.until_type("gw.chat.done"))
            assert not any(c["replay"] for c in live)
            seqs = [c["seq"] for c in replay + live]
            assert seqs == list(range(11))  # start, 9 words, finish: exactly once, in order
            assert [c["chunk"] for c in first] == [c["chunk"] for c in replay[:3]]


async def test_resuming_while_chunks_flow_freely_never_loses_or_repeats_one(serve):
    gate, last = asyncio.Event(), asyncio.Event()
    Scripted.backend = ScriptedBackend(words(300), {0: gate, 299: last})
    async with (
        serve({"chat": Scripted}) as served,
        served.client("chat", "c1") as a,
        served.client("chat", "c1") as late,
    ):
        # `late` was open when the stream started: it is a subscriber already. A third
        # client connects during the stream and resumes while batches are being written.
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        seen_late = await late.until_type("gw.chat.messages")
        gate.set()
        async with served.client("chat", "c1") as third:
            await third.send("gw.chat.resume")
            frames = await third.until_type("gw.chat.replay_complete")
            last.set()  # the stream stays live until the resume was answered
            frames += await third.until_type("gw.chat.done")
        seqs = [c["seq"] for c in chunks_of(frames)]
        assert seqs == list(range(302))  # start, 300 words, finish
        assert frames[0]["type"] == "gw.chat.resuming"
        assert [c["seq"] for c in chunks_of(await a.until_type("gw.chat.done"))] == seqs
        seen_late += await late.until_type("gw.chat.done")
        assert [c["seq"] for c in chunks_of(seen_late)] == seqs


async def test_resume_without_a_stream_is_answered_none_at_once(serve):
    async with serve({"chat": Echo}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.resume")
        assert await a.next_frame() == {"type": "gw.chat.resume_none"}


async def test_cancel_stops_the_stream_and_keeps_the_partial_answer(serve):
    never = asyncio.Event()
    Scripted.backend = ScriptedBackend(words(4), {2: never})
    async with serve({"chat": Scripted}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        await a.until(lambda f: f.get("seq") == 1)
        await a.send("gw.chat.cancel")
        done = (await a.until_type("gw.chat.done"))[-1]
        assert done["status"] == "cancelled"
        messages = await a.messages()
        assert messages[1]["parts"] == [{"type": "text", "text": "w0 w1 "}]
        assert messages[1]["metadata"] == {"streamStatus": "cancelled"}
        # and the chat goes on
        Scripted.backend = ScriptedBackend(words(1))
        await a.send("gw.chat.send", id="r2", messages=[*messages, user("u2", "again")])
        assert (await a.until_type("gw.chat.done"))[-1]["status"] == "complete"


async def test_data_parts_are_streamed_and_reconciled_and_transient_ones_never_stored(serve):
    Scripted.backend = ScriptedBackend(
        [
            {"type": "data-weather", "id": "w", "data": {"status": "loading"}},
            {"type": "data-progress", "data": 50, "transient": True},
            {"type": "data-weather", "id": "w", "data": {"status": "done", "temp": 4}},
            {"type": "text-delta", "delta": "4 degrees"},
        ]
    )
    async with serve({"chat": Scripted}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "weather?")])
        streamed = [c["chunk"]["type"] for c in chunks_of(await a.until_type("gw.chat.done"))]
        assert streamed == [
            "start",
            "data-weather",
            "data-progress",
            "data-weather",
            "text-delta",
            "finish",
        ]
        answer = (await a.messages())[1]
        assert answer["parts"] == [
            {"type": "data-weather", "id": "w", "data": {"status": "done", "temp": 4}},
            {"type": "text", "text": "4 degrees"},
        ]


async def test_a_resend_with_client_ids_does_not_duplicate_rows(serve):
    async with serve({"chat": Echo}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "hi")])
        await a.until_type("gw.chat.done")
        stored = await a.messages()
        # The client kept the answer under its own id (as UI libraries do) and resends.
        client_view = [stored[0], {**stored[1], "id": "client-side-id"}]
        await a.send("gw.chat.send", id="r2", messages=[*client_view, user("u2", "again")])
        await a.until_type("gw.chat.done")
        after = await a.messages()
        assert [m["id"] for m in after][:3] == [stored[0]["id"], stored[1]["id"], "u2"]
        assert len(after) == 4


async def test_messages_survive_hibernation_and_a_restart(serve):
    async with serve({"chat": Echo}, hibernate_after_s=60) as served:
        async with served.client("chat", "c1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "remember me")])
            await a.until_type("gw.chat.done")
        assert served.runtime.hibernate_idle() >= 1
        assert not served.runtime.is_awake("chat", "c1")
        async with served.client("chat", "c1") as b:
            messages = await b.messages()
    assert messages[1]["parts"] == [{"type": "text", "text": "echo: remember me"}]
    async with serve({"chat": Echo}) as served, served.client("chat", "c1") as c:
        assert await c.messages() == messages


async def test_a_stop_mid_stream_keeps_the_partial_answer_and_a_new_message_works(serve):
    never = asyncio.Event()
    Scripted.backend = ScriptedBackend(words(5), {3: never})
    async with serve({"chat": Scripted}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        await a.until(lambda f: f.get("seq") == 2)
    async with serve({"chat": Echo}) as served, served.client("chat", "c1") as b:
        messages = await b.messages()
        assert messages[1]["parts"] == [{"type": "text", "text": "w0 w1 w2 "}]
        assert messages[1]["metadata"] == {"streamStatus": "interrupted"}
        await b.send("gw.chat.send", id="r2", messages=[*messages, user("u2", "still there?")])
        assert (await b.until_type("gw.chat.done"))[-1]["status"] == "complete"
        assert (await b.messages())[-1]["parts"][0]["text"] == "echo: still there?"


class Strict(Scripted):
    stream_flush_s = 0  # stored before sent


def stored_chunks(path: Path) -> int:
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM gw_chat_chunks").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0


@pytest.mark.parametrize("cls", [Strict, Scripted], ids=["stored-before-sent", "flush-window"])
async def test_a_crash_mid_stream_is_recovered_from_what_was_committed(
    serve, tmp_path: Path, cls: type[ChatAgent]
):
    """A crash leaves the agent's file as last committed: copied mid-stream with SQLite's
    backup API (what a SIGKILL leaves), then served by a fresh runtime. Stored before sent:
    what the client saw is on disk at once; with a flush window, within `stream_flush_s`."""
    never = asyncio.Event()
    Scripted.backend = ScriptedBackend(words(5), {3: never})
    crashed = tmp_path / "crashed"
    async with serve({"chat": cls}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        await a.until(lambda f: f.get("seq") == 3)  # start, w0, w1, w2
        source = agent_db_path(tmp_path / "state", "chat", "c1")
        if cls is Scripted:
            await wait_until(lambda: stored_chunks(source) == 4, WAIT_S, "the flush")
        else:
            assert stored_chunks(source) == 4
        target = agent_db_path(crashed, "chat", "c1")
        target.parent.mkdir(parents=True)
        with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
            src.backup(dst)
    async with serve({"chat": Echo}, state_dir=crashed) as served, served.client("chat", "c1") as b:
        await b.send("gw.chat.resume")
        assert await asyncio.wait_for(b.next_frame(), WAIT_S) == {"type": "gw.chat.resume_none"}
        messages = await b.messages()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["parts"] == [{"type": "text", "text": "w0 w1 w2 "}]
        assert messages[1]["metadata"] == {"streamStatus": "interrupted"}


async def test_bad_frames_get_a_chat_error_and_other_agents_do_not_speak_chat(serve):
    from gatewayd.agents import Agent

    class Plain(Agent):
        pass

    async with serve({"chat": Echo, "plain": Plain}) as served:
        async with served.client("chat", "c1") as a:
            await a.send("gw.chat.send", id="r1", messages=[{"id": "x", "role": "robot"}])
            error = await a.next_frame()
            assert error["type"] == "gw.chat.error" and error["request"] == "r1"
            assert "role" in error["error"]
        async with served.client("plain", "p1") as p:
            await p.send("gw.chat.resume")
            error = await p.next_frame()
            assert error["type"] == "gw.error" and "does not speak it" in error["error"]


async def test_chunks_are_written_in_batches_not_one_commit_each(serve):
    # A model faster than the disk: 500 chunks arrive while the first batch commits.
    Scripted.backend = ScriptedBackend(words(500))
    async with serve({"chat": Scripted}) as served, served.client("chat", "c1") as a:
        before = served.runtime.stats()["commits_total"]
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        frames = await a.until_type("gw.chat.done")
        assert [c["seq"] for c in chunks_of(frames)] == list(range(502))
        commits = served.runtime.stats()["commits_total"] - before
        assert commits <= 50, f"{commits} commits for 500 chunks"


class Failing(ChatAgent):
    async def on_chat_message(self, messages, ctx):
        yield {"type": "text-delta", "delta": "partial "}
        raise ConnectionError("model went away")


async def test_a_failing_model_still_ends_the_stream_and_keeps_what_it_said(serve):
    async with serve({"chat": Failing}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        frames = await a.until_type("gw.chat.done")
        assert [c["chunk"]["type"] for c in chunks_of(frames)] == ["start", "text-delta", "error"]
        assert frames[-1]["status"] == "error"
        assert "model went away" in frames[-1]["error"]
        answer = (await a.messages())[1]
        assert answer["parts"] == [{"type": "text", "text": "partial "}]
        assert answer["metadata"] == {"streamStatus": "error"}
        await a.send("gw.chat.resume")
        assert await a.next_frame() == {"type": "gw.chat.resume_none"}


async def test_a_send_while_streaming_is_refused_and_clear_empties_the_chat(serve):
    never = asyncio.Event()
    Scripted.backend = ScriptedBackend(words(3), {1: never})
    async with (
        serve({"chat": Scripted}) as served,
        served.client("chat", "c1") as a,
        served.client("chat", "c1") as b,
    ):
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        await a.until(lambda f: f.get("seq") == 0)
        await a.send("gw.chat.send", id="r2", messages=[user("u1", "go"), user("u2", "x")])
        error = (await a.until_type("gw.chat.error"))[-1]
        assert error["request"] == "r2" and "still streaming" in error["error"]
        await a.send("gw.chat.clear")
        for client in (a, b):
            frames = await client.until_type("gw.chat.cleared")
            assert frames[-1] == {"type": "gw.chat.cleared"}
            done = (await client.until_type("gw.chat.done"))[-1]  # never left "streaming"
            assert done["status"] == "cancelled" and done["request"] == "r1"
        assert await a.messages() == []
        await b.send("gw.chat.resume")
        assert (await b.until_type("gw.chat.resume_none"))[-1] == {"type": "gw.chat.resume_none"}


async def test_a_stream_goes_on_across_hibernation_of_its_agent(serve):
    gate = asyncio.Event()
    Scripted.backend = ScriptedBackend(words(4), {2: gate})
    async with serve({"chat": Scripted}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "go")])
        await a.until(lambda f: f.get("seq") == 2)  # start, w0, w1; the model waits
        assert served.runtime.hibernate_idle() == 1  # a slow model: the agent sleeps
        assert not served.runtime.is_awake("chat", "c1")
        gate.set()  # the next batch wakes it; the live stream is not taken for an orphan
        frames = await a.until_type("gw.chat.done")
        assert frames[-1]["status"] == "complete"
        assert [c["seq"] for c in chunks_of(frames)] == [3, 4, 5]
        assert (await a.messages())[1]["parts"] == [{"type": "text", "text": "w0 w1 w2 w3 "}]


class DeviceAware(ChatAgent):
    backend = EchoBackend()

    def should_send_protocol_messages(self, conn, ctx):
        return "role=device" not in ctx["path"]


async def test_protocol_disabled_connections_get_no_chat_frames(serve):
    from websockets.asyncio.client import connect

    async with (
        serve({"chat": DeviceAware}) as served,
        served.client("chat", "c1") as a,
        connect(served.url("chat", "c1") + "?role=device") as device,
    ):
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "hi")])
        assert (await a.until_type("gw.chat.done"))[-1]["status"] == "complete"
        await device.send(b"ping")  # a binary frame: the agent's on_message ignores it
        await a.send("gw.chat.get_messages")  # one more turn after the stream's last
        await a.until_type("gw.chat.messages")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(device.recv(), 0.2)
