"""The changelog's parts on a real JetStream cluster: page diffs rebuild the same database,
the partition function is the server's own, and an owner whose partition was taken cannot
append (fencing by the log's expected last sequence)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from gatewayd.cluster.changelog import FencedError, PartitionLog
from gatewayd.cluster.naming import Names, partition_of
from gatewayd.cluster.pages import apply, diff
from tests.cluster.group import Group


def _database(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    return conn


def test_page_diffs_rebuild_the_database_including_an_open_transaction(tmp_path: Path) -> None:
    conn = _database(tmp_path / "a.sqlite3")
    image = b""
    rebuilt = b""
    for round_ in range(5):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR REPLACE INTO t VALUES (?, ?)",
            [(k, f"{round_}-{k}" * 20) for k in range(round_ * 50, round_ * 50 + 80)],
        )
        conn.execute("DELETE FROM t WHERE k % 7 = ?", (round_,))
        new = conn.serialize()  # the open transaction's writes included
        change = diff("c", "a", image, new)
        assert change is not None
        assert len(change.pages) <= len(new) // change.page_size
        rebuilt = apply(rebuilt, change)
        assert rebuilt == new
        image = new
        conn.execute("COMMIT")
    assert diff("c", "a", image, conn.serialize()) is None, "nothing changed, nothing to ship"
    (tmp_path / "b.sqlite3").write_bytes(rebuilt)
    copy = sqlite3.connect(tmp_path / "b.sqlite3")
    assert (
        copy.execute("SELECT * FROM t ORDER BY k").fetchall()
        == conn.execute("SELECT * FROM t ORDER BY k").fetchall()
    )
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_partition_of_matches_the_servers_subject_mapping(group: Group) -> None:
    client = await nats.connect(servers=group.urls)
    try:
        js = client.jetstream(timeout=15)
        await js.add_stream(StreamConfig(name="MAPPED", subjects=["gw.in.>"], num_replicas=1))
        ids = [f"dev{i}" for i in range(40)] + ["thermo-ä", "x_y-z", "0"]
        for agent_id in ids:
            await js.publish(f"devices.{agent_id}.telemetry", b"")
        names = Names("test", "gw.in")
        for seq, agent_id in enumerate(ids, start=1):
            subject = (await js.get_msg("MAPPED", seq)).subject or ""
            assert names.agent_of(subject) == (partition_of(agent_id, group.partitions), agent_id)
    finally:
        await client.close()


async def test_an_owner_whose_partition_was_taken_cannot_append(group: Group) -> None:
    client = await nats.connect(servers=group.urls)
    try:
        js = client.jetstream(timeout=15)
        names = Names("fence", "gw.in")
        await js.add_stream(
            StreamConfig(name=names.log_stream, subjects=[f"{names.log_prefix}.>"], num_replicas=3)
        )
        snapshots = await js.create_object_store(names.snapshots_bucket)
        conn = _database(group.work_dir / "agent.sqlite3")

        old = PartitionLog(js, names, 0, 1, "old", max_payload=client.max_payload)
        await old.restore(snapshots)
        await old.mark()
        conn.execute("INSERT INTO t VALUES (1, 'by the old owner')")
        first = conn.serialize()
        change = diff("c", "a", b"", first)
        assert change is not None
        await old.append(change, first)

        new = PartitionLog(js, names, 0, 2, "new", max_payload=client.max_payload)
        report = await new.restore(snapshots)
        assert report.images[("c", "a")] == first
        await new.mark()

        conn.execute("INSERT INTO t VALUES (2, 'too late')")
        late = conn.serialize()
        change = diff("c", "a", first, late)
        assert change is not None
        with pytest.raises(FencedError):
            await old.append(change, late)
        with pytest.raises(FencedError):  # and every append after it
            await old.append(change, late)
        check = PartitionLog(js, names, 0, 3, "reader", max_payload=client.max_payload)
        assert (await check.restore(snapshots)).images[("c", "a")] == first
    finally:
        await client.close()


async def test_restore_from_a_snapshot_and_the_log_after_it(group: Group) -> None:
    client = await nats.connect(servers=group.urls)
    try:
        js = client.jetstream(timeout=15)
        names = Names("snap", "gw.in")
        await js.add_stream(
            StreamConfig(name=names.log_stream, subjects=[f"{names.log_prefix}.>"], num_replicas=3)
        )
        snapshots = await js.create_object_store(names.snapshots_bucket)
        owner = PartitionLog(js, names, 3, 1, "owner", max_payload=client.max_payload)
        await owner.restore(snapshots)
        await owner.mark()
        conns = {agent: _database(group.work_dir / f"{agent}.sqlite3") for agent in "abc"}
        for round_ in range(6):
            for agent, conn in conns.items():
                conn.execute("INSERT INTO t (v) VALUES (?)", (f"{agent}{round_}",))
                image = conn.serialize()
                change = diff("c", agent, owner.images.get(("c", agent), b""), image)
                assert change is not None
                await owner.append(change, image)
            if round_ == 3:
                assert await owner.snapshot(snapshots) > 0
        info = await js.stream_info(names.log_stream)
        assert info.state.first_seq > 1, "the log below the snapshot was purged"

        report = await PartitionLog(
            js, names, 3, 2, "next", max_payload=client.max_payload
        ).restore(snapshots)
        assert report.snapshot_seq > 0 and report.replayed == 2 * 3
        for agent, conn in conns.items():
            assert report.images[("c", agent)] == conn.serialize()
    finally:
        await client.close()
