"""Durable device replies in cluster mode: the agent's outbox, sent through JetStream.

An agent's reply to a device is an outbox row written in the turn's own transaction (the
runtime's durable outputs, gatewayd/agents/outbox.py), so it is in the partition's changelog
with the state that produced it. After the commit the runtime hands the row to this sink,
which publishes it to `<reply subject>.<agent id>` through JetStream (the group's replies
stream captures those subjects) with `Nats-Msg-Id: <class>/<agent id>/<row seq>`, and reports
it delivered once JetStream acknowledged it; the row is then deleted in the agent's next
transaction. If the member dies between the commit and the publish (or before the deletion
is in the log), the next owner restores the row with the agent and sends it again under the
same id (the row's seq comes from the log too): JetStream drops it if the first one landed
within the duplicate window. So every reply of an applied message is published at least once
and stored in the replies stream once. Devices subscribed to the subject (NATS or MQTT) see
it live; a reader of the replies stream sees each reply once.

Per reply subject, replies are published in row order, a window at a time; a failed publish
(a NATS node gone, a leader election) is retried with the same id until it lands or the
member stops.

This module never imports gatewayd.cluster.member (the member creates and attaches it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from nats.js import JetStreamContext

from protocols.link import DeliveredCallback, OutputAddress

logger = logging.getLogger(__name__)

TRANSPORT = "nats"
_WINDOW = 32
_PUBLISH_TIMEOUT_S = 2.0
_RETRY_DELAY_S = 0.2


class JetStreamOutputs:
    """`protocols.link.DurableOutputs` for cluster members (transport "nats")."""

    def __init__(self, js: JetStreamContext, *, msg_id_prefix: str = "") -> None:
        self._js = js
        self._prefix = msg_id_prefix
        self._queues: dict[str, collections.deque[tuple[int, bytes, DeliveredCallback, str]]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self.published = 0
        self.retried = 0

    @property
    def transport(self) -> str:
        return TRANSPORT

    @staticmethod
    def address(subject: str) -> OutputAddress:
        return OutputAddress(TRANSPORT, subject, 1)

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        """Queue one row; `on_delivered(seq)` once JetStream has it. `address.target` is the
        subject; the message id is `<prefix><subject>/<seq>` (the subject names the agent)."""
        if self._closed:
            return
        subject = address.target
        msg_id = f"{self._prefix}{subject}/{seq}"
        self._queues.setdefault(subject, collections.deque()).append(
            (seq, payload, on_delivered, msg_id)
        )
        if subject not in self._senders:
            task = asyncio.get_running_loop().create_task(
                self._send(subject), name=f"cluster replies {subject}"
            )
            self._senders[subject] = task

    async def close(self) -> None:
        """Stop sending (what is queued stays in the agents' outboxes, for the next owner)."""
        self._closed = True
        tasks = list(self._senders.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _send(self, subject: str) -> None:
        queue = self._queues[subject]
        try:
            while queue and not self._closed:
                window = [queue.popleft() for _ in range(min(_WINDOW, len(queue)))]
                results = await asyncio.gather(
                    *(self._publish(subject, payload, msg_id) for _, payload, _, msg_id in window),
                    return_exceptions=True,
                )
                failed = []
                for item, result in zip(window, results, strict=True):
                    if isinstance(result, BaseException):
                        failed.append(item)
                        continue
                    self.published += 1
                    item[2](item[0])
                if failed:
                    self.retried += len(failed)
                    logger.info(
                        "cluster: %d replies on %s not acknowledged by JetStream; sending again",
                        len(failed),
                        subject,
                    )
                    queue.extendleft(reversed(failed))
                    await asyncio.sleep(_RETRY_DELAY_S)
        finally:
            del self._senders[subject]
            if not queue:
                self._queues.pop(subject, None)

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        await self._js.publish(
            subject, payload, timeout=_PUBLISH_TIMEOUT_S, headers={"Nats-Msg-Id": msg_id}
        )
