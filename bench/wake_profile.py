"""Where a cold wake's open goes: each statement of a warm open, timed, beside a bare sqlite3 open.

    python bench/wake_profile.py                # 300 files, CPU time per step
    python bench/wake_profile.py --clock wall --files 500

`--files` agent databases are created and closed the way a hibernation leaves them (kept,
restarted WAL: keepwal.py), written back to disk (`os.sync()`, as for an agent asleep for
more than ~30 s), then opened one by one with the statements `AgentDatabase.open_if_warm` and
the wake's first turns issue, in order, each timed (`--clock cpu`: `time.thread_time`, which
a loaded machine inflates less than the wall clock). Every second file is opened bare instead
(connect, `PRAGMA synchronous`, the state read: the floor of any open). Prints a table of
medians and one JSON line.

The two SQLite costs that dominate are visible from outside with
`strace -f -T -e trace=ftruncate,pwrite64` (the -shm truncation and re-extension of every
first connection to a WAL file) and `py-spy record --native` of `bench/agents.py --wake-only`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatewayd.agents import keepwal, storage
from gatewayd.agents.storage import AgentDatabase, agent_db_file

_OPTIONS = {"durability": "normal", "max_db_bytes": 1 << 30, "max_value_bytes": 2_000_000}


def _create(root: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        db = AgentDatabase.open(root, "c", f"a{i}", **_OPTIONS)  # type: ignore[arg-type]
        db.begin()
        db.connection.execute("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, v BLOB)")
        db.connection.execute("INSERT INTO r (v) VALUES (x'01')")
        db.save_state('{"n":1}')
        db.commit()
        db.close()
        paths.append(agent_db_file(str(root), "c", f"a{i}"))
    os.sync()
    return paths


def _warm_open(path: str, clock: Callable[[], float]) -> tuple[list[tuple[str, float]], object]:
    steps: list[tuple[str, float]] = []
    started = clock()

    def step(name: str) -> None:
        nonlocal started
        now = clock()
        steps.append((name, now - started))
        started = now

    storage._warm_probe(path)
    step("page-cache probe (2 files)")
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=64, timeout=5.0
    )
    step("sqlite3.connect")
    keepwal.keep_wal(conn, path)
    step("keep_wal")
    conn.executescript(
        "PRAGMA synchronous=NORMAL;PRAGMA cache_size=-256;PRAGMA journal_size_limit=65536;"
        "PRAGMA wal_autocheckpoint=0;PRAGMA max_page_count=262144"
    )
    step("pragmas (1st read: -shm, WAL index)")
    conn.execute(storage._read_meta_and_state()).fetchall()
    step("identity + state read")
    conn.execute("BEGIN")
    conn.execute(storage._FORGET_WAL_FOR)
    step("BEGIN + forget WAL record")
    conn.execute("SELECT name FROM sqlite_master WHERE name IN ('_gw_schedules', '_gw_queue')")
    step("alarms' table check")
    conn.execute("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, v BLOB)")
    step("START turn's statement")
    conn.execute("SAVEPOINT gw_turn")
    conn.execute("INSERT INTO r (v) VALUES (x'01')")
    conn.execute(storage._SAVE_STATE, ('{"n":2}',))
    conn.execute("RELEASE gw_turn")
    step("call turn's 4 statements")
    conn.execute("COMMIT")
    step("COMMIT")
    return steps, conn


def _plain_open(path: str, clock: Callable[[], float]) -> tuple[float, object]:
    started = clock()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(storage._LOAD_STATE).fetchone()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO r (v) VALUES (x'01')")
    conn.execute("COMMIT")
    return clock() - started, conn


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    opts = parser.parse_args()
    clock = time.thread_time if opts.clock == "cpu" else time.perf_counter
    root = Path(tempfile.mkdtemp(prefix="gatewayd-wake-profile-"))
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    try:
        paths = _create(root, 2 * opts.files)
        per_step: dict[str, list[float]] = {}
        plain: list[float] = []
        opened = []
        for i in range(opts.files):
            steps, conn = _warm_open(paths[2 * i], clock)
            for name, seconds in steps:
                per_step.setdefault(name, []).append(seconds)
            elapsed, other = _plain_open(paths[2 * i + 1], clock)
            plain.append(elapsed)
            opened += [conn, other]  # closed afterwards: a close checkpoints
        for conn in opened:
            conn.close()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {name: statistics.median(values) * 1e6 for name, values in per_step.items()}
    for name, value in medians.items():
        print(f"{name:<38} {value:8.1f} µs")
    total = sum(medians.values())
    floor = statistics.median(plain) * 1e6
    print(f"{'sum of medians':<38} {total:8.1f} µs")
    print(f"{'bare sqlite3 open + read + commit':<38} {floor:8.1f} µs")
    result = {
        "bench": "wake_profile",
        "clock": opts.clock,
        "files": opts.files,
        "steps_us": {name: round(value, 1) for name, value in medians.items()},
        "sum_us": round(total, 1),
        "plain_open_read_commit_us": round(floor, 1),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
