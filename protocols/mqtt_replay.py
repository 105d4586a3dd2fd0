"""Replay of MQTT dead letters: each is republished to its original topic at QoS 1 and its row
deleted only after the broker acknowledged it (PUBACK), so an interrupted replay loses nothing
(a message may be published twice: the rows not yet deleted are replayed again next time).

The gateway's bridge, subscribed with its persistent session, then receives the message as if
the device had sent it again (queued by the broker if the gateway is down). If the turn still
fails, it becomes a new dead letter. Never imports `gatewayd`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiomqtt

from protocols.dead_letters import DeadLetterStore
from protocols.mqtt import make_ssl_context
from protocols.mqtt_settings import MqttSettings

REPLAY_QOS = 1  # the broker's PUBACK is what allows deleting the row


@dataclass(slots=True)
class ReplayResult:
    replayed: list[int] = field(default_factory=list)  # ids republished and deleted
    missing: list[int] = field(default_factory=list)  # ids asked for that are not stored
    left: list[int] = field(default_factory=list)  # ids not replayed because of `error`
    error: str | None = None  # why the replay stopped early (broker unreachable, ...)


async def replay_dead_letters(
    settings: MqttSettings, store: DeadLetterStore, ids: Sequence[int] | None = None
) -> ReplayResult:
    """Republish the dead letters `ids` (all when None), oldest first, through the first
    broker URL that accepts a connection, as client `<client_id>-replay` (clean session)."""
    letters = await asyncio.to_thread(store.list, ids)
    result = ReplayResult()
    if ids is not None:
        result.missing = sorted(set(ids) - {letter.id for letter in letters})
    if not letters:
        return result
    context = None
    if any(address.tls for address in settings.addresses):
        context = await asyncio.to_thread(make_ssl_context, settings)
    errors: list[str] = []
    for address in settings.addresses:
        client = aiomqtt.Client(
            address.host,
            address.port,
            identifier=f"{settings.client_id}-replay",
            username=settings.username,
            password=settings.password,
            protocol=(
                aiomqtt.ProtocolVersion.V5
                if settings.protocol == "5"
                else aiomqtt.ProtocolVersion.V311
            ),
            timeout=settings.connect_timeout_s,
            tls_context=context if address.tls else None,
            tls_insecure=settings.tls_insecure if address.tls else None,
        )
        try:
            async with client:
                for letter in letters[len(result.replayed) :]:
                    await client.publish(
                        letter.topic,
                        letter.payload,
                        qos=REPLAY_QOS,
                        timeout=settings.publish_timeout_s,
                    )
                    await asyncio.to_thread(store.delete, letter.id)
                    result.replayed.append(letter.id)
            return result
        except (aiomqtt.MqttError, OSError) as exc:
            errors.append(f"{address}: {exc or type(exc).__name__}")
    result.left = [letter.id for letter in letters[len(result.replayed) :]]
    result.error = "; ".join(errors)
    return result
