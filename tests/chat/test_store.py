"""The message store on a real SQLite file: order, upserts, client ids, stale rows, limits."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gatewayd.chat.guard import MAX_MESSAGE_BYTES
from gatewayd.chat.messages import InvalidMessageError
from gatewayd.chat.store import MessageStore
from tests.chat.conftest import sql_on, user


class CountingDb:
    """A real SQLite connection that counts the statements that write messages."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN")  # as in a turn: the runtime owns the transaction
        self.writes = 0
        self._sql = sql_on(self.db)

    def sql(self, query: str, *params):
        if query.startswith(("INSERT", "DELETE")):
            self.writes += 1
        return self._sql(query, *params)


@pytest.fixture
def counting(tmp_path: Path) -> CountingDb:
    return CountingDb(tmp_path / "chat.sqlite3")


@pytest.fixture
def store(counting: CountingDb) -> MessageStore:
    s = MessageStore(counting.sql)
    s.create_tables()
    return s


def assistant(message_id: str, text: str) -> dict:
    return {"id": message_id, "role": "assistant", "parts": [{"type": "text", "text": text}]}


def test_a_thousand_messages_load_in_insertion_order(store):
    messages = [
        user(f"u{i:04d}", str(i)) if i % 2 else assistant(f"a{i}", str(i)) for i in range(1000)
    ]
    store.persist(messages)
    assert [m["id"] for m in store.load()] == [m["id"] for m in messages]


def test_unchanged_messages_are_not_written_again(store, counting):
    store.persist([user("u1", "hi"), assistant("a1", "hello")])
    before = counting.writes
    store.persist([user("u1", "hi"), assistant("a1", "hello")])
    assert counting.writes == before
    store.persist([user("u1", "hi"), assistant("a1", "hello!")])
    assert counting.writes == before + 1
    assert store.load()[1]["parts"][0]["text"] == "hello!"


def test_an_update_keeps_its_place_in_the_order(store):
    store.persist([user("u1", "a"), assistant("a1", "b"), user("u2", "c")])
    store.save(assistant("a1", "b, edited"))
    assert [m["id"] for m in store.load()] == ["u1", "a1", "u2"]


def test_a_resend_with_client_side_ids_never_duplicates_rows(store):
    store.persist([user("u1", "hi")])
    store.save(assistant("msg_server", "hello"))  # the server's own id for its answer
    tool_msg = {
        "id": "msg_tools",
        "role": "assistant",
        "parts": [
            {
                "type": "tool",
                "toolCallId": "call-9",
                "toolName": "t",
                "state": "output-available",
                "input": {},
                "output": 1,
            }
        ],
    }
    store.save(tool_msg)
    # The client shows the answers under its own ids, and a tool part still pending.
    resent = [
        user("u1", "hi"),
        assistant("client-a", "hello"),
        {
            **tool_msg,
            "id": "client-t",
            "parts": [{**tool_msg["parts"][0], "state": "input-available", "output": None}],
        },
        user("u2", "and now?"),
    ]
    result = store.persist(resent)
    assert [m["id"] for m in result] == ["u1", "msg_server", "msg_tools", "u2"]
    assert result[2]["parts"][0]["state"] == "output-available"  # the stored result wins
    assert store.count() == 4
    store.persist(resent)
    assert store.count() == 4


def test_stale_rows_are_deleted_only_when_every_incoming_id_is_known(store):
    store.persist([user("u1", "a"), assistant("a1", "b"), user("u2", "c"), assistant("a2", "d")])
    # Another tab's message we never saw (u3): nothing is deleted.
    store.persist([user("u1", "a"), user("u3", "x")])
    assert store.count() == 5
    # A trim/regenerate with known ids only: the rest goes.
    store.persist([user("u1", "a"), assistant("a1", "b")])
    assert [m["id"] for m in store.load()] == ["u1", "a1"]


def test_max_persisted_messages_keeps_the_newest(counting):
    store = MessageStore(counting.sql, max_persisted=3)
    store.create_tables()
    store.persist([user(f"u{i}", str(i)) for i in range(5)])
    assert [m["id"] for m in store.load()] == ["u2", "u3", "u4"]


def test_a_huge_message_is_stored_compacted_but_returned_in_full(store, counting):
    big = {
        "id": "a1",
        "role": "assistant",
        "parts": [
            {
                "type": "tool",
                "toolCallId": "c",
                "toolName": "dump",
                "state": "output-available",
                "input": {},
                "output": "x" * 3_000_000,
            }
        ],
    }
    (returned,) = store.persist([big])
    assert len(returned["parts"][0]["output"]) == 3_000_000
    (row,) = counting.db.execute("SELECT message FROM gw_chat_messages").fetchall()
    assert len(row[0].encode()) <= MAX_MESSAGE_BYTES
    assert json.loads(row[0])["metadata"]["compactedToolOutputs"] == ["c"]


def test_malformed_messages_are_refused_with_a_reason(store):
    with pytest.raises(InvalidMessageError, match="role"):
        store.persist([{"id": "x", "role": "robot", "parts": []}])
    with pytest.raises(InvalidMessageError, match="parts"):
        store.persist([{"id": "x", "role": "user", "parts": "hi"}])
