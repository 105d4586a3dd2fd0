"""Fixtures for chat tests: a started runtime with the real WebSocket listener on a temp state
dir, and a small JSON client that collects `gw.chat.*` frames."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gatewayd.agents import Agent, AgentRuntime, AgentSettings
from protocols.ws import WsListener, WsSettings

WAIT_S = 10.0


class Served:
    def __init__(self, runtime: AgentRuntime, listener: WsListener) -> None:
        self.runtime = runtime
        self.listener = listener

    def url(self, agent_class: str, agent_id: str) -> str:
        return f"ws://127.0.0.1:{self.listener.bound_port}/agents/{agent_class}/{agent_id}"

    @asynccontextmanager
    async def client(self, agent_class: str, agent_id: str) -> AsyncIterator[ChatClient]:
        async with connect(self.url(agent_class, agent_id), max_size=None) as ws:
            client = ChatClient(ws)
            assert (await client.next_frame())["type"] == "gw.identity"
            assert (await client.next_frame())["type"] == "gw.state"
            yield client


class ChatClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, frame_type: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": frame_type, **fields}))

    async def next_frame(self) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Every frame received up to and including the first that matches `predicate`."""
        frames = []
        while True:
            frame = await self.next_frame()
            frames.append(frame)
            if predicate(frame):
                return frames

    async def until_type(self, frame_type: str) -> list[dict[str, Any]]:
        return await self.until(lambda f: f["type"] == frame_type)

    async def messages(self) -> list[dict[str, Any]]:
        await self.send("gw.chat.get_messages")
        return (await self.until_type("gw.chat.messages"))[-1]["messages"]


@pytest.fixture
def serve(tmp_path: Path):
    """`async with serve({"name": Cls}, **settings) as served:` runtime + ws listener."""

    @asynccontextmanager
    async def factory(classes: dict[str, type[Agent]], **overrides: Any) -> AsyncIterator[Served]:
        overrides.setdefault("state_dir", tmp_path / "state")
        runtime = AgentRuntime(AgentSettings(**overrides), classes)
        await runtime.start()
        listener = WsListener(WsSettings(port=0), runtime)
        await listener.start()
        try:
            yield Served(runtime, listener)
        finally:
            await listener.stop()
            await runtime.close()

    return factory


def user(message_id: str, text: str) -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


def sql_on(db: sqlite3.Connection) -> Callable[..., list[dict[str, Any]]]:
    """`Agent.sql`'s shape over a bare connection (the store tests play the runtime)."""

    def sql(query: str, *params: Any) -> list[dict[str, Any]]:
        cursor = db.execute(query, params)
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    return sql
