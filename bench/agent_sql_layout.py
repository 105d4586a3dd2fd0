"""An agent file's schema, old (version 1) against new (version 2), in raw sqlite3: the SQL of one
paced turn per commit, CPU and WAL pages per commit, interleaved repeats.

    python bench/agent_sql_layout.py [--commits 3000] [--repeats 7]

Cases (WAL, synchronous=NORMAL, no autocheckpoint, a passive checkpoint every 256 commits as
the runtime does; no runtime, no Python around the SQL):
- reply: the agent's INSERT, the state upsert, the reply's outbox row and the delete of the
  previous (delivered) one. v1: `_gw_state` and an `AUTOINCREMENT` `_gw_outbox` (which rewrites
  `sqlite_sequence`); v2: `_gw_turn_rows` and the outbox's own seq rule (outbox_schema.py).
- frame: the agent's INSERT, the state upsert and the dedup seq upsert. v1: `_gw_state` and
  `_gw_dedup`; v2: both rows in `_gw_turn_rows` (one page).
Prints a table, then one JSON line (medians; v2/v1 ratios).
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
from pathlib import Path

sys.path.insert(
    len(sys.path) if os.environ.get("PYTHONPATH") else 0, str(Path(__file__).resolve().parents[1])
)

from gatewayd.agents import outbox_schema, storage

PAYLOAD = b"\x01" * 32
V1_STATE = "CREATE TABLE _gw_state (id INTEGER PRIMARY KEY CHECK (id = 0), json TEXT)"
V1_DEDUP = "CREATE TABLE _gw_dedup (stream TEXT PRIMARY KEY, last_seq INTEGER NOT NULL)"
V1_OUTBOX = (
    "CREATE TABLE _gw_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, transport TEXT NOT NULL, "
    "target TEXT NOT NULL, qos INTEGER NOT NULL, payload BLOB NOT NULL)"
)
V1_SAVE_STATE = (
    "INSERT INTO _gw_state (id, json) VALUES (0, ?) "
    "ON CONFLICT (id) DO UPDATE SET json = excluded.json"
)
V1_SAVE_SEQ = (
    "INSERT INTO _gw_dedup (stream, last_seq) VALUES (?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq"
)
V1_INSERT = "INSERT INTO _gw_outbox (transport, target, qos, payload) VALUES (?, ?, ?, ?)"
V1_DELETE = "DELETE FROM _gw_outbox WHERE seq = ?"
# Version 2: the statements the runtime runs (storage.py, outbox_schema.py).
V2_SCHEMA = (*storage._SCHEMA[1:], outbox_schema.SCHEMA)
V2_SAVE_STATE, V2_SAVE_SEQ = storage._SAVE_STATE, storage._SAVE_SEQ


def run(case: str, version: int, commits: int) -> tuple[float, float]:
    """(CPU µs per commit, WAL pages per commit)."""
    path = os.path.join(tempfile.mkdtemp(prefix="gatewayd-sql-layout-"), "agent.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("PRAGMA cache_size=-256")
    conn.execute("CREATE TABLE _gw_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO _gw_meta VALUES ('agent_class', 'echo'), ('agent_id', 'd1')")
    conn.execute("CREATE TABLE readings (n INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    if version == 1:
        for ddl in (V1_STATE, V1_DEDUP, V1_OUTBOX):
            conn.execute(ddl)
        save_state, save_seq, insert, delete = V1_SAVE_STATE, V1_SAVE_SEQ, V1_INSERT, V1_DELETE
    else:
        for ddl in V2_SCHEMA:
            conn.execute(ddl)
        save_state, save_seq = V2_SAVE_STATE, V2_SAVE_SEQ
        insert, delete = outbox_schema.INSERT, outbox_schema.DELETE_BELOW_HIGHEST[0]
    previous = None
    frames = 0
    cpu = time.process_time()
    for n in range(commits):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO readings (body) VALUES (?)", (PAYLOAD,))
        conn.execute(save_state, (json.dumps({"n": n, "last": 32}, separators=(",", ":")),))
        if case == "frame":
            conn.execute(save_seq, ("tcp:d1", n))
        else:
            cursor = conn.execute(insert, ("mqtt", "dev/d1/down", 1, PAYLOAD))
            if previous is not None:
                conn.execute(delete, (previous,))
            previous = cursor.lastrowid
        conn.execute("COMMIT")
        if n % 256 == 255:
            frames += conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    cpu_us = (time.process_time() - cpu) / commits * 1e6
    frames += conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    conn.close()
    shutil.rmtree(os.path.dirname(path))
    return cpu_us, frames / commits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args()
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    load_before = os.getloadavg()
    for _ in range(opts.repeats):
        for case in ("reply", "frame"):
            for version in (1, 2):
                samples.setdefault((case, version), []).append(run(case, version, opts.commits))
    result: dict[str, object] = {"bench": "agent_sql_layout", "commits": opts.commits}
    print(f"raw sqlite3, one turn per commit, medians of {opts.repeats} interleaved repeats")
    print(
        "{:<6} {:>12} {:>12} {:>6} {:>13} {:>13}".format(
            "case", "v1 CPU us", "v2 CPU us", "ratio", "v1 pages", "v2 pages"
        )
    )
    for case in ("reply", "frame"):
        cpu = [statistics.median(s[0] for s in samples[(case, v)]) for v in (1, 2)]
        pages = [statistics.median(s[1] for s in samples[(case, v)]) for v in (1, 2)]
        ratios = [b[0] / a[0] for a, b in zip(samples[(case, 1)], samples[(case, 2)], strict=True)]
        ratio = statistics.median(ratios)
        print(
            f"{case:<6} {cpu[0]:>12.1f} {cpu[1]:>12.1f} {ratio:>6.2f} {pages[0]:>13.2f} "
            f"{pages[1]:>13.2f}"
        )
        result[case] = {
            "v1_cpu_us_per_commit": round(cpu[0], 1),
            "v2_cpu_us_per_commit": round(cpu[1], 1),
            "cpu_ratio_v2_v1": round(ratio, 3),
            "v1_wal_pages_per_commit": round(pages[0], 2),
            "v2_wal_pages_per_commit": round(pages[1], 2),
        }
    result["loadavg_before"] = [round(x, 2) for x in load_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
