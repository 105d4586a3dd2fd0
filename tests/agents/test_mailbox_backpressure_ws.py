"""A full agent mailbox over WebSocket: the listener stops reading from the client and
resubmits the held message when the agent has room; nothing the client sent is lost."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
from websockets.asyncio.client import connect

from gatewayd.agents import Agent
from protocols.ws import WsListener, WsSettings
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

MESSAGES = 20


class Slow(Agent):
    release: ClassVar[asyncio.Event]
    all_seen: ClassVar[asyncio.Event]
    seen: ClassVar[list[int]] = []

    async def on_message(self, conn, message):
        await type(self).release.wait()
        type(self).seen.append(int(message))
        if len(type(self).seen) == MESSAGES:
            type(self).all_seen.set()


async def test_a_full_mailbox_holds_websocket_messages_and_loses_none(make_runtime):
    Slow.release, Slow.all_seen, Slow.seen = asyncio.Event(), asyncio.Event(), []
    async with make_runtime({"slow": Slow}, max_mailbox_events=2) as rt:
        listener = WsListener(WsSettings(port=0), rt)
        await listener.start()
        try:
            url = f"ws://127.0.0.1:{listener.bound_port}/agents/slow/one"
            async with connect(url) as client:
                for n in range(MESSAGES):
                    await client.send(str(n))
                await wait_until(lambda: rt.stats()["mailbox_full_total"] > 0, 10, "a full mailbox")
                Slow.release.set()
                await asyncio.wait_for(Slow.all_seen.wait(), 10)
            assert Slow.seen == list(range(MESSAGES))
        finally:
            await listener.stop()
