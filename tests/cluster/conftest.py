"""Fixtures of the cluster tests: a real 3-node NATS JetStream cluster per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from tests.cluster.group import Group


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    """A 3-node JetStream cluster (8 partitions of device subjects); members are added by
    the test. Everything is stopped afterwards."""
    group = Group(tmp_path)
    group.start_nats()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
async def nc(group: Group) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(servers=group.urls, max_reconnect_attempts=-1)
    try:
        yield client
    finally:
        await client.close()
