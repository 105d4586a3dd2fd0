"""Group commit on real SQLite files: grouped, each agent's result its own."""

from __future__ import annotations

import asyncio
import platform
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from gatewayd.agents.committer import GroupCommitter


class Db:
    def __init__(self, path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE t (x)")

    def commit(self) -> None:
        self.conn.execute("COMMIT")


async def test_commits_of_one_iteration_are_grouped_and_isolated(tmp_path):
    loop = asyncio.get_running_loop()
    groups: list[int] = []
    with ThreadPoolExecutor(2) as executor:
        committer = GroupCommitter(loop, executor, 2, lambda n, _s: groups.append(n))
        dbs = [Db(tmp_path / f"{i}.db") for i in range(10)]
        for i, db in enumerate(dbs):
            if i != 3:  # db 3 has no open transaction: its COMMIT fails, alone
                db.conn.execute("BEGIN")
                db.conn.execute("INSERT INTO t VALUES (?)", (i,))
        results = await asyncio.gather(
            *(committer.commit(db) for db in dbs), return_exceptions=True
        )
        assert sorted(groups) == [5, 5]  # ten commits, two executor hand-offs
        assert isinstance(results[3], sqlite3.OperationalError)
        assert [r for i, r in enumerate(results) if i != 3] == [None] * 9
        for i in range(len(dbs)):
            reader = sqlite3.connect(tmp_path / f"{i}.db")
            assert reader.execute("SELECT x FROM t").fetchall() == ([] if i == 3 else [(i,)])
        assert committer.oldest_in_flight_s() == 0.0


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc_trim exists only in glibc (not musl)"
)
def test_release_free_memory_on_glibc():
    import ctypes
    import ctypes.util
    import os

    from gatewayd.agents.memory import release_free_memory

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 * 1024, 1024  # 64 MiB in blocks below glibc's mmap threshold: the heap
    page = os.sysconf("SC_PAGE_SIZE")

    def rss_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    blocks = [libc.malloc(block) for _ in range(count)]
    for address in blocks:
        ctypes.memset(address, 1, block)  # touched: resident
    keep = libc.malloc(block)  # on top of the heap, so free() alone cannot shrink it
    for address in blocks:
        libc.free(address)
    before = rss_bytes()
    assert release_free_memory() is True
    released = before - rss_bytes()
    libc.free(keep)
    assert released > block * count // 2, f"only {released} bytes went back to the OS"
