"""A full disk under the state directory (gatewayd/agents/diskspace.py), on a real tmpfs.

The runtime must stop acknowledging (Backpressure, never a silent success), say so once in a
clear log line, and resume by itself when space returns, losing nothing it acknowledged.
Needs root (mount); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.agents import Agent
from gatewayd.agents.storage import agent_db_path
from protocols.link import Backpressure
from tests.agents.conftest import MemoryLink

pytestmark = pytest.mark.timeout(60)

TMPFS_MB = 16  # the guard's probe reserves 4 MiB: room enough to tell full from not full


class Blobs(Agent):
    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS blobs (body BLOB NOT NULL)")

    def on_message(self, conn, message) -> None:
        self.sql("INSERT INTO blobs (body) VALUES (?)", message)
        conn.send(b"stored")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip(
            "a real full disk needs a small tmpfs, and mounting one needs root "
            "(CI and scripts/test run as root here); run the suite as root to include it"
        )
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "a real full disk needs a small tmpfs, and this machine refused the mount "
            f"(a container without CAP_SYS_ADMIN?): {mounted.stderr.strip()}"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path) -> None:
    """Write until the file system says ENOSPC."""
    with open(path, "wb", buffering=0) as filler:
        for size in (1 << 20, 1 << 12, 1 << 9):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * size)


def disk_full_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "DISK FULL" in r.getMessage()]


async def test_full_disk_stops_acks_says_why_and_recovers(
    make_runtime, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.agents")
    async with make_runtime({"blobs": Blobs}, state_dir=small_disk) as rt:
        link = MemoryLink("blobs", "a")
        await rt.open_link(link, {})
        assert await rt.submit_message(link, b"before") is not None  # acknowledged
        fill(small_disk / "filler")

        # Enqueued before the gateway knew: its commit fails, and it is NOT acknowledged.
        with pytest.raises(Backpressure) as held:
            await rt.submit_message(link, b"y" * 200_000)
        # Known now: refused at once, nothing enqueued.
        with pytest.raises(Backpressure):
            rt.submit_message(link, b"z")
        lines = disk_full_lines(caplog)
        assert len(lines) == 1, lines
        assert str(small_disk) in lines[0] and "Free space" in lines[0]
        assert rt.stats()["disk_full"] == 1
        assert not held.value.ready.done()
        assert link.plain() == [b"stored"]  # only the first message was acknowledged

        (small_disk / "filler").unlink()
        await asyncio.wait_for(held.value.ready, 10)  # the probe saw the space come back
        assert rt.stats()["disk_full"] == 0
        assert any("space is back" in r.getMessage() for r in caplog.records)
        await rt.submit_message(link, b"y" * 200_000)  # what the transport held, resubmitted
        assert link.plain() == [b"stored", b"stored"]

    path = agent_db_path(small_disk, "blobs", "a")
    with contextlib.closing(sqlite3.connect(path)) as db:
        sizes = [n for (n,) in db.execute("SELECT length(body) FROM blobs ORDER BY rowid")]
    assert sizes == [len(b"before"), 200_000]
