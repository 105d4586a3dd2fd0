"""Agent classes the daemon lifecycle tests run inside a real daemon process."""

from __future__ import annotations

import asyncio
import logging

from gatewayd import Agent, Connection, callable

log = logging.getLogger("tests.lifecycle")


class Hangs(Agent):
    """A turn that never finishes by itself: what a graceful drain has to give up on."""

    async def on_message(self, conn: Connection, message: bytes | str) -> None:
        log.warning("turn is hanging now")
        await asyncio.Event().wait()


class Planner(Agent):
    """Each call writes a row and (re)schedules a reminder: the turn's commit and the schedule
    index both have something to make durable."""

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS plans (n INTEGER NOT NULL)")

    @callable
    def plan(self, n: int) -> int:
        self.sql("INSERT INTO plans (n) VALUES (?)", n)
        self.schedule(3600 + n, "remind", n)
        return n

    def remind(self, n: int) -> None:
        pass
