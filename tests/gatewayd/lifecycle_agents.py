"""Agent classes the daemon lifecycle tests run inside a real daemon process."""

from __future__ import annotations

import asyncio
import logging

from gatewayd import Agent, Connection

log = logging.getLogger("tests.lifecycle")


class Hangs(Agent):
    """A turn that never finishes by itself: what a graceful drain has to give up on."""

    async def on_message(self, conn: Connection, message: bytes | str) -> None:
        log.warning("turn is hanging now")
        await asyncio.Event().wait()
