"""Memory an open agent database may hold is bounded (storage.CACHE_KIB_PER_AGENT).

SQLite's default page cache (2 MiB per connection) kept growing with each agent's tables under
a steady load (bench/reliability.py's soak) and, times `max_active` awake agents, had no
practical bound.
"""

from __future__ import annotations

from pathlib import Path

from gatewayd.agents.storage import CACHE_KIB_PER_AGENT, AgentDatabase


def test_page_cache_of_an_agent_database_is_capped(tmp_path: Path) -> None:
    db = AgentDatabase.open(
        tmp_path, "c", "a", durability="normal", max_db_bytes=1 << 30, max_value_bytes=1 << 20
    )
    try:
        (cache_size,) = db.connection.execute("PRAGMA cache_size").fetchone()
        assert cache_size == -CACHE_KIB_PER_AGENT  # negative: KiB, not pages
        assert CACHE_KIB_PER_AGENT <= 512
    finally:
        db.close()
