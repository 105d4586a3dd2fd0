"""Test support for the MQTT bridge: a real SQLite-backed LinkHandler and a bridge process.

`SqliteLinkHandler` plays the gateway: it applies each event in a real SQLite transaction
(batched, like group commit) and resolves the event's future only after COMMIT; it can be
slowed down, made to fail chosen messages, refuse an agent class, and echo replies through
`link.send` after the commit (the output gate). With `strict_links` it holds a link id as the
agent runtime does: open until its close event committed (opening it again before is refused,
as is a message on a link that is not the open one); `close_gate` delays committing closes.

Run as a module it is the bridge process used by the crash tests:

    python -m tests.protocols.mqtt_bridge_runner --broker-url mqtt://127.0.0.1:PORT \
        --client-id gw --db /tmp/x.sqlite [--commit-delay-s 0.002] [--protocol 5]

It prints READY once connected and subscribed, and stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.link import DedupKey, Link, LinkRejected, Outcome
from protocols.mqtt import MqttBridge, MqttRoute, MqttSettings

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY, agent_class TEXT, agent_id TEXT, link_id TEXT, payload BLOB);
CREATE TABLE IF NOT EXISTS link_events (
    seq INTEGER PRIMARY KEY, event TEXT, agent_class TEXT, agent_id TEXT, link_id TEXT,
    context TEXT);
"""


class TurnFailed(Exception):
    """The test asked this message's turn to fail (nothing committed for it)."""


@dataclass
class _Event:
    kind: str  # open | message | close
    link: Link
    data: bytes | str | None
    context: str
    future: asyncio.Future[Outcome]


class SqliteLinkHandler:
    """A LinkHandler that commits every event to a real SQLite file before resolving."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        commit_delay_s: float = 0.0,
        fail: Callable[[bytes | str], bool] | None = None,
        refuse_classes: frozenset[str] = frozenset(),
        reply: Callable[[Link, bytes | str], bytes | str | None] | None = None,
        batch_max: int = 256,
        strict_links: bool = False,
        close_gate: asyncio.Event | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.commit_delay_s = commit_delay_s
        self.fail = fail
        self.refuse_classes = refuse_classes
        self.reply = reply
        self.batch_max = batch_max
        self.strict_links = strict_links
        self.close_gate = close_gate
        self.open_links: dict[str, Link] = {}  # strict_links: open until the close committed
        self.links: dict[str, Link] = {}
        self.outstanding = 0  # events submitted whose future has not resolved yet
        self.max_outstanding = 0
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._db.close()

    # LinkHandler -------------------------------------------------------------------
    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        if self.strict_links:
            if link.link_id in self.open_links:
                return _rejected(f"link id {link.link_id!r} is already open")
            self.open_links[link.link_id] = link
        self.links[link.link_id] = link
        return self._enqueue("open", link, None, repr(sorted(context.items())))

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        if self.strict_links and self.open_links.get(link.link_id) is not link:
            return _rejected("connection is not open (open_link first)")
        return self._enqueue("message", link, data, "")

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        return self._enqueue("close", link, None, f"{code} {reason}")

    # internals ---------------------------------------------------------------------
    def _enqueue(self, kind: str, link: Link, data: Any, context: str) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        future.add_done_callback(self._resolved)
        self._queue.put_nowait(_Event(kind, link, data, context, future))
        return future

    def _resolved(self, _: asyncio.Future[Outcome]) -> None:
        self.outstanding -= 1

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if self.commit_delay_s:
                await asyncio.sleep(self.commit_delay_s)
            if self.close_gate is not None and any(e.kind == "close" for e in batch):
                await self.close_gate.wait()
            refused = [e for e in batch if e.link.route.agent_class in self.refuse_classes]
            failed = [
                e
                for e in batch
                if e.kind == "message" and self.fail is not None and self.fail(e.data)
            ]
            done = [e for e in batch if e not in refused and e not in failed]
            await asyncio.to_thread(self._commit, done)
            for event in refused:
                event.future.set_exception(LinkRejected(f"{event.link.route.agent_class} refused"))
            for event in failed:
                event.future.set_exception(TurnFailed(f"turn failed for {event.data!r}"))
            for event in done:  # output gate: replies only after the commit
                if event.kind == "close" and self.open_links.get(event.link.link_id) is event.link:
                    del self.open_links[event.link.link_id]
                event.future.set_result(Outcome.APPLIED)
                if event.kind == "message" and self.reply is not None:
                    answer = self.reply(event.link, event.data)
                    if answer is not None:
                        event.link.send(answer)

    def _commit(self, events: list[_Event]) -> None:
        self._db.execute("BEGIN")
        for e in events:
            route = e.link.route
            if e.kind == "message":
                self._db.execute(
                    "INSERT INTO messages (agent_class, agent_id, link_id, payload) "
                    "VALUES (?, ?, ?, ?)",
                    (route.agent_class, route.agent_id, e.link.link_id, e.data),
                )
            else:
                self._db.execute(
                    "INSERT INTO link_events (event, agent_class, agent_id, link_id, context) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (e.kind, route.agent_class, route.agent_id, e.link.link_id, e.context),
                )
        self._db.execute("COMMIT")


def _rejected(reason: str) -> asyncio.Future[Outcome]:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    future.set_exception(LinkRejected(reason))
    return future


def read_messages(db_path: str | Path) -> list[tuple[str, str, str, bytes]]:
    """(agent_class, agent_id, link_id, payload) rows in commit order (from another process)."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT agent_class, agent_id, link_id, payload FROM messages ORDER BY seq"
        ).fetchall()
    db.close()
    return rows


DEFAULT_ROUTES = (MqttRoute("devices/{id}/telemetry", "thermostat", "devices/{id}/cmd"),)


async def _main(args: argparse.Namespace) -> None:
    handler = SqliteLinkHandler(args.db, commit_delay_s=args.commit_delay_s)
    settings = MqttSettings(
        broker_urls=(args.broker_url,),
        client_id=args.client_id,
        protocol=args.protocol,
        routes=DEFAULT_ROUTES,
        max_pending_messages=args.max_pending,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )
    await handler.start()
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=10)
    print("READY", flush=True)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await bridge.stop(drain_timeout_s=5)
    await handler.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--commit-delay-s", type=float, default=0.0)
    parser.add_argument("--max-pending", type=int, default=1000)
    parser.add_argument("--protocol", default="3.1.1")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
