"""The outbox pieces on real SQLite: rows in the caller's transaction, seqs never reused, the
gateway-wide index, the undelivered cap, and hand-over to transports attached later."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gatewayd.agents.outbox import Outbox, OutboxFullError, OutboxStore
from gatewayd.agents.storage import AgentDatabase
from protocols.link import DeliveredCallback, OutputAddress

TOPIC = OutputAddress("mqtt", "devices/a/cmd", 1)
KEY = ("echo", "a")


class RecordingOutputs:
    """A transport stand-in that records hand-overs; the test decides when one is delivered."""

    def __init__(self, transport: str = "mqtt") -> None:
        self._transport = transport
        self.sent: list[tuple[int, bytes, DeliveredCallback]] = []

    @property
    def transport(self) -> str:
        return self._transport

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        self.sent.append((seq, payload, on_delivered))


@pytest.fixture
def db(tmp_path: Path):
    """A real agent file's connection, no transaction open (the tests run their own)."""
    agent = AgentDatabase.open(
        tmp_path, *KEY, durability="normal", max_db_bytes=1 << 24, max_value_bytes=1 << 20
    )
    yield agent.connection
    agent.close()


def _outbox(tmp_path: Path, **kw: int) -> Outbox:
    outbox = Outbox(**kw)
    outbox.open_index(tmp_path / "index.sqlite3", synchronous_full=False)
    return outbox


@pytest.fixture
def outbox(tmp_path: Path):
    outbox = _outbox(tmp_path, max_undelivered=3)
    yield outbox
    outbox.close_index()


def test_rows_belong_to_the_transaction_and_seqs_are_never_reused(db) -> None:
    store = OutboxStore(db)
    db.execute("BEGIN")
    first = store.append(TOPIC, b"one")
    db.execute("ROLLBACK")
    assert store.pending() == []  # rolled back with the turn: it never existed
    db.execute("BEGIN")
    a = store.append(TOPIC, b"a")
    b = store.append(TOPIC, b"b")
    db.execute("COMMIT")
    assert [(r.seq, r.payload, r.address) for r in store.pending()] == [
        (a, b"a", TOPIC),
        (b, b"b", TOPIC),
    ]
    assert a >= first and b > a
    db.execute("BEGIN")
    store.delete([a, b])
    db.execute("COMMIT")
    db.execute("BEGIN")
    c = store.append(TOPIC, b"c")
    db.execute("COMMIT")
    assert c > b  # a deleted seq is never handed out again (TCP push seqs)


def test_cap_refuses_the_turn_and_delivery_makes_room(db, outbox: Outbox) -> None:
    sink = RecordingOutputs()
    outbox.attach(sink)
    store = outbox.store(db)
    db.execute("BEGIN")
    rows = [outbox.append(KEY, store, TOPIC, b"%d" % n) for n in range(3)]
    with pytest.raises(OutboxFullError, match="max_undelivered_outputs=3"):
        outbox.append(KEY, store, TOPIC, b"one too many")
    assert outbox.needs_mark(KEY)
    outbox.mark(KEY)
    db.execute("COMMIT")
    outbox.committed(KEY, store.pending())
    assert [seq for seq, *_ in sink.sent] == rows and outbox.undelivered(KEY) == 3
    sink.sent[0][2](rows[0])  # the transport delivered the first one
    assert outbox.undelivered(KEY) == 2
    db.execute("BEGIN")
    stores: dict[str, object] = {"outbox": store}
    outbox.begin_batch(KEY, stores, db)
    outbox.append(KEY, store, TOPIC, b"fits again")
    outbox.delete_delivered(KEY, stores, db)  # the delivered row goes in the next transaction
    db.execute("COMMIT")
    outbox.committed(KEY, [])
    assert rows[0] not in [row.seq for row in store.pending()]


def test_index_lists_an_agent_until_it_settles_with_nothing_left(
    db, outbox: Outbox, tmp_path: Path
) -> None:
    sink = RecordingOutputs()
    outbox.attach(sink)
    store = outbox.store(db)
    db.execute("BEGIN")
    seq = outbox.append(KEY, store, TOPIC, b"x")
    outbox.mark(KEY)
    db.execute("COMMIT")
    outbox.committed(KEY, store.pending())
    assert outbox.index.marked() == [KEY]
    # Hibernating while the output is still on its way: the agent stays listed.
    settlement = outbox.settlement(KEY)
    assert settlement is not None and not settlement.may_unmark
    outbox.settle(settlement, db)
    outbox.settled(settlement)
    assert outbox.index.marked() == [KEY]
    sink.sent[0][2](seq)
    settlement = outbox.settlement(KEY)
    assert settlement is not None and settlement.seqs == [seq] and settlement.may_unmark
    outbox.settle(settlement, db)
    outbox.settled(settlement)
    assert store.count() == 0 and outbox.index.marked() == []
    # A new process finds nothing to recover.
    fresh = _outbox(tmp_path)
    assert fresh.index.marked() == []
    fresh.close_index()


def test_rows_wait_for_their_transport_and_leave_in_order_after_a_restart(
    db, tmp_path: Path
) -> None:
    first = _outbox(tmp_path)
    store = first.store(db)
    db.execute("BEGIN")
    for n in range(3):
        first.append(KEY, store, TOPIC if n != 1 else OutputAddress("tcp", "a"), b"%d" % n)
    first.mark(KEY)
    db.execute("COMMIT")
    # (the process dies before anything was delivered)
    first.close_index()
    second = _outbox(tmp_path)
    assert second.index.marked() == [KEY]
    second.recover(second.index.marked())
    second.recovered(KEY, second.store(db))  # the agent's first batch: no transport yet
    mqtt, tcp = RecordingOutputs("mqtt"), RecordingOutputs("tcp")
    second.attach(mqtt)
    second.attach(tcp)
    assert [payload for _, payload, _ in mqtt.sent] == [b"0", b"2"]
    assert [payload for _, payload, _ in tcp.sent] == [b"1"]
    second.recovered(KEY, second.store(db))  # only once per process
    assert len(mqtt.sent) == 2
    second.close_index()


def test_delete_removes_exactly_the_given_rows(db) -> None:
    store = OutboxStore(db)
    db.execute("BEGIN")
    seqs = [store.append(TOPIC, b"%d" % n) for n in range(8)]
    db.execute("COMMIT")
    db.execute("BEGIN")
    store.delete(seqs[1:4])  # a run without gaps: one statement
    store.delete([seqs[5], seqs[7]])  # with a gap: the row between them stays
    store.delete([seqs[0]])
    store.delete([])
    db.execute("COMMIT")
    assert [row.seq for row in store.pending()] == [seqs[4], seqs[6]]


def _commit_append(db: sqlite3.Connection, store: OutboxStore, n: int = 1) -> list[int]:
    db.execute("BEGIN")
    seqs = [store.append(TOPIC, b"%d" % i) for i in range(n)]
    db.execute("COMMIT")
    return seqs


def _commit_delete(db: sqlite3.Connection, store: OutboxStore, seqs: list[int]) -> None:
    db.execute("BEGIN")
    store.delete(seqs)
    db.execute("COMMIT")


def test_new_seqs_stay_above_every_seq_handed_out_when_the_newest_rows_go(
    tmp_path: Path,
) -> None:
    """TCP push seqs and cluster dedup ids: outputs delivered out of order, the table
    emptied, the file reopened (a restart): no seq is handed out twice."""
    opened = AgentDatabase.open(
        tmp_path, *KEY, durability="normal", max_db_bytes=1 << 24, max_value_bytes=1 << 20
    )
    db, store = opened.connection, OutboxStore(opened.connection)
    assert _commit_append(db, store, 4) == [1, 2, 3, 4]
    _commit_delete(db, store, [4])  # the newest delivered first (another device)
    assert _commit_append(db, store) == [5]
    _commit_delete(db, store, [3, 5])  # a gap, the newest among them
    assert [row.seq for row in store.pending()] == [1, 2]
    assert _commit_append(db, store) == [6]
    _commit_delete(db, store, [1, 2, 6])  # everything: the table is empty
    assert store.count() == 0
    assert _commit_append(db, store) == [7]
    _commit_delete(db, store, [7])
    db.execute("BEGIN")
    assert store.append(TOPIC, b"rolled back") == 8
    db.execute("ROLLBACK")  # never existed: its seq may come again, nothing saw it
    opened.close()
    reopened = AgentDatabase.open(
        tmp_path, *KEY, durability="normal", max_db_bytes=1 << 24, max_value_bytes=1 << 20
    )
    try:
        if reopened.in_transaction_:
            reopened.commit()  # (a kept WAL: the open leaves its first transaction to us)
        db, store = reopened.connection, OutboxStore(reopened.connection)
        assert store.count() == 0
        assert _commit_append(db, store, 2) == [8, 9]
    finally:
        reopened.close()


def test_a_batch_that_replies_and_deletes_older_rows_writes_no_high_water_mark(db) -> None:
    """The hot path (reply N written, reply N-1 deleted, one transaction) writes the outbox's
    page only; the mark is written when a delete takes the newest row (outbox_schema.py)."""
    store = OutboxStore(db)
    previous = _commit_append(db, store)
    for _ in range(3):
        db.execute("BEGIN")
        new = store.append(TOPIC, b"reply")
        store.delete(previous)
        db.execute("COMMIT")
        previous = [new]
    assert db.execute("SELECT key FROM _gw_meta WHERE key LIKE 'outbox%'").fetchall() == []
    _commit_delete(db, store, previous)  # the last one: now the mark holds its seq
    assert db.execute("SELECT value FROM _gw_meta WHERE key LIKE 'outbox%'").fetchall() == [
        (str(previous[0]),)
    ]
