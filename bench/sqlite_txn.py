"""The per-transaction floor of a paced TCP frame: bare sqlite3, one file per device (issue 9).

A paced frame is the only frame of its device in a loop iteration, so it is one transaction
on one file: BEGIN, the agent's INSERT, the state upsert, the dedup-seq upsert, COMMIT (what
`bench/gateway_agents.py`'s FrameCounter costs in the gateway, with its pragmas: WAL,
synchronous=NORMAL, no autocheckpoint, a PASSIVE checkpoint every 256 commits per file).
Transactions go round robin over `--files` files (cold caches, like 1,000 paced devices).
Variants, interleaved in passes, medians of the per-pass CPU µs per transaction:

- `page_size` 4096 (SQLite's default, the gateway's) against 2048 and 1024 (fewer bytes per
  WAL frame: each changed page is copied, checksummed and written once per commit);
- `minimal`: BEGIN + INSERT + COMMIT only (what the state and seq rows add).

    python bench/sqlite_txn.py --files 1000 --passes 6 --per-pass 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

CHECKPOINT_AFTER_COMMITS = 256  # gatewayd/agents/storage.py
SAVE_STATE = (
    "INSERT INTO t (id, key, value) VALUES (1, 'state', ?) "
    "ON CONFLICT (id) DO UPDATE SET value = excluded.value"
)
SAVE_SEQ = (
    "INSERT INTO t (key, value) VALUES ('seq:' || ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class Files:
    """`count` agent-like files with one page size."""

    def __init__(self, directory: Path, count: int, page_size: int, *, minimal: bool) -> None:
        directory.mkdir(parents=True)
        self.minimal = minimal
        self.commits = [0] * count
        self.conns = []
        for i in range(count):
            conn = sqlite3.connect(directory / f"a{i}.db", isolation_level=None)
            conn.execute(f"PRAGMA page_size={page_size}")
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0"):
                conn.execute(f"PRAGMA {pragma}")
            conn.execute("CREATE TABLE frames (n INTEGER PRIMARY KEY, size INTEGER NOT NULL)")
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, key TEXT UNIQUE, value)")
            self.conns.append(conn)

    def run(self, transactions: int, first: int) -> float:
        """CPU µs per transaction over `transactions`, round robin over the files."""
        conns, count = self.conns, len(self.conns)
        started = time.process_time()
        for j in range(first, first + transactions):
            i = j % count
            conn = conns[i]
            conn.execute("BEGIN")
            conn.execute("INSERT INTO frames (size) VALUES (?)", (64,))
            if not self.minimal:
                conn.execute(SAVE_STATE, (json.dumps({"frames": j, "last_bytes": 64}),))
                conn.execute(SAVE_SEQ, ("s", j))
            conn.execute("COMMIT")
            self.commits[i] += 1
            if self.commits[i] >= CHECKPOINT_AFTER_COMMITS:
                self.commits[i] = 0
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return (time.process_time() - started) * 1e6 / transactions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--per-pass", type=int, default=100_000, help="transactions per pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sqlite-txn-") as tmp:
        variants = {
            "page_4096": Files(Path(tmp, "p4096"), args.files, 4096, minimal=False),
            "page_2048": Files(Path(tmp, "p2048"), args.files, 2048, minimal=False),
            "page_1024": Files(Path(tmp, "p1024"), args.files, 1024, minimal=False),
            "minimal_4096": Files(Path(tmp, "min"), args.files, 4096, minimal=True),
        }
        passes: dict[str, list[float]] = {name: [] for name in variants}
        first = 0
        for index in range(args.passes):
            order = list(variants.items())
            if index % 2:
                order.reverse()
            for name, files in order:
                passes[name].append(round(files.run(args.per_pass, first), 2))
            first += args.per_pass
    medians = {name: round(statistics.median(values), 2) for name, values in passes.items()}
    base = passes["page_4096"]
    ratios = {
        name: round(statistics.median(v / b for v, b in zip(values, base, strict=True)), 3)
        for name, values in passes.items()
    }
    print(f"{'variant':<14}{'cpu us/txn':>12}{'vs 4096':>9}  passes")
    for name, values in passes.items():
        print(f"{name:<14}{medians[name]:>12}{ratios[name]:>9}  {values}")
    print(
        json.dumps(
            {
                "bench": "sqlite_txn",
                "files": args.files,
                "passes": args.passes,
                "per_pass": args.per_pass,
                "median_cpu_us_per_txn": medians,
                "median_ratio_vs_page_4096": ratios,
                "runs": passes,
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
