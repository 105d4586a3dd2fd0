"""Fixtures for agent runtime tests: a started runtime on a temp state dir, and an in-memory
Link (a test transport that records what the gateway released to it)."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings
from protocols.jsonproto import decode_server_text
from protocols.link import Route
from tests.agents.turns import open_db

_ids = itertools.count(1)


class MemoryLink:
    """A transport session kept in memory: `sent` is what passed the output gate."""

    def __init__(
        self,
        agent_class: str,
        agent_id: str,
        transport: str = "ws",
        on_send: Callable[[bytes | str], None] | None = None,
    ) -> None:
        self._route = Route(agent_class, agent_id)
        self._transport = transport
        self._id = f"mem-{next(_ids)}"
        self.sent: list[bytes | str] = []
        self.closed: tuple[int, str] | None = None
        self._on_send = on_send

    @property
    def transport(self) -> str:
        return self._transport

    @property
    def link_id(self) -> str:
        return self._id

    @property
    def route(self) -> Route:
        return self._route

    @property
    def remote(self) -> str:
        return f"memory:{self._id}"

    def send(self, data: bytes | str) -> None:
        if self._on_send is not None:
            self._on_send(data)
        self.sent.append(data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def frames(self, frame_type: str | None = None) -> list[dict[str, Any]]:
        """Protocol frames received, optionally of one `type`."""
        out = []
        for item in self.sent:
            if isinstance(item, str):
                frame = decode_server_text(item)
                if frame is not None and (frame_type is None or frame["type"] == frame_type):
                    out.append(frame)
        return out

    def plain(self) -> list[bytes | str]:
        """Everything received that is not a protocol frame."""
        return [i for i in self.sent if not (isinstance(i, str) and decode_server_text(i))]


@pytest.fixture
def make_runtime(tmp_path: Path):
    """`async with make_runtime({"name": Cls}, **settings) as rt:` — started, then closed."""

    @asynccontextmanager
    async def factory(
        classes: dict[str, type[Agent]], engine: Any = None, **overrides: Any
    ) -> AsyncIterator[AgentRuntime]:
        overrides.setdefault("state_dir", tmp_path / "state")
        runtime = AgentRuntime(AgentSettings(**overrides), classes, engine=engine)
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.close()

    return factory


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a bare agent database for the store tests lives."""
    return tmp_path / "agent.sqlite3"


@pytest.fixture
def db(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A bare agent database (tests.agents.turns) for the schedule and queue store tests."""
    connection = open_db(db_path)
    yield connection
    connection.close()
