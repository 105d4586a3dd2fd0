"""An agent database as pages: what changed between two images, and applying the change.

The changelog carries, for each commit batch of an agent, the database pages that differ from
the image the partition's log already holds (as LiteFS ships page sets per transaction): it is
deterministic whatever SQL ran (no re-execution of `random()` or `datetime('now')`), covers
every table (the agent's own, state, schedules, queue, dedup, outbox), and an image is a plain
SQLite file a new owner writes to disk and opens. Images come from `sqlite3.Connection
.serialize()`, which includes the open transaction's own writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2


def page_size_of(image: bytes) -> int:
    """The page size stored in an SQLite header (bytes 16-17; 1 means 65536)."""
    if len(image) < 100:
        raise ValueError(f"not an SQLite image ({len(image)} bytes)")
    size = int.from_bytes(image[16:18], "big")
    return 65536 if size == 1 else size


@dataclass(frozen=True, slots=True)
class PageChange:
    """One agent's change: its new length in pages and the pages that differ."""

    agent_class: str
    agent_id: str
    page_size: int
    page_count: int
    pages: dict[int, bytes]  # page index (0-based) -> content

    def encode(self) -> list[object]:
        return [self.agent_class, self.agent_id, self.page_size, self.page_count, self.pages]

    @classmethod
    def decode(cls, raw: list[object]) -> PageChange:
        agent_class, agent_id, page_size, page_count, pages = raw
        assert isinstance(agent_class, str) and isinstance(agent_id, str)
        assert isinstance(page_size, int) and isinstance(page_count, int)
        assert isinstance(pages, dict)
        return cls(agent_class, agent_id, page_size, page_count, pages)

    @property
    def size(self) -> int:
        return sum(len(page) for page in self.pages.values()) + 64


def diff(agent_class: str, agent_id: str, old: bytes, new: bytes) -> PageChange | None:
    """The pages of `new` that differ from `old` (None when nothing changed)."""
    if old == new:
        return None
    page_size = page_size_of(new)
    count = len(new) // page_size
    old_view, new_view = memoryview(old), memoryview(new)
    same_size = old and page_size_of(old) == page_size
    pages: dict[int, bytes] = {}
    for index in range(count):
        start, end = index * page_size, (index + 1) * page_size
        if same_size and end <= len(old) and old_view[start:end] == new_view[start:end]:
            continue
        pages[index] = bytes(new_view[start:end])
    return PageChange(agent_class, agent_id, page_size, count, pages)


def apply(old: bytes, change: PageChange) -> bytes:
    """`old` with `change` applied (truncated or extended to its page count)."""
    size = change.page_size * change.page_count
    image = bytearray(old[:size])
    if len(image) < size:
        image.extend(bytes(size - len(image)))
    for index, page in change.pages.items():
        image[index * change.page_size : (index + 1) * change.page_size] = page
    return bytes(image)


@dataclass(frozen=True, slots=True)
class LogMessage:
    """One changelog message: the changes of one or more commit batches of one partition, by
    the owner at `epoch`, and `floor`: every ingest message of the partition up to that stream
    sequence had been applied (in this or an earlier message) or dead-lettered when it was
    written. A marker (a new owner's first message) has no changes."""

    epoch: int
    member: str
    floor: int
    changes: list[PageChange]

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "epoch": self.epoch,
                "member": self.member,
                "floor": self.floor,
                "changes": [c.encode() for c in self.changes],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> LogMessage:
        raw = cbor2.loads(data)
        changes = [PageChange.decode(item) for item in raw.get("changes", [])]
        return cls(int(raw["epoch"]), str(raw.get("member", "")), int(raw.get("floor", 0)), changes)
