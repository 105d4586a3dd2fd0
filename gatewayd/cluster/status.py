"""The operator's view of a group, read from NATS (no member needs to answer):
members and how recently each heartbeat, each partition's owner and epoch, its consumer's
lag (messages not yet delivered) and its changelog's last sequence and ingest floor."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import nats
from nats.js.errors import NotFoundError

from gatewayd.cluster.naming import Names
from gatewayd.cluster.pages import LogMessage
from gatewayd.cluster.settings import ClusterSettings


async def group_status(settings: ClusterSettings, timeout_s: float = 5.0) -> dict[str, Any]:
    names = Names(settings.group, settings.ingest_subject)
    options: dict[str, Any] = {
        "servers": list(settings.servers),
        "connect_timeout": timeout_s,
        "max_reconnect_attempts": 1,
        **settings.nats_credentials(),
    }
    nc = await nats.connect(**options)
    try:
        js = nc.jetstream(timeout=timeout_s)
        members = []
        with contextlib.suppress(NotFoundError, Exception):
            kv = await js.key_value(names.members_bucket)
            for key in await kv.keys():
                entry = await kv.get(key)
                raw = json.loads(entry.value or b"{}")
                members.append(
                    {
                        "member": key,
                        "heartbeat_age_s": round(time.time() - float(raw.get("at", 0)), 1),
                        "partitions": raw.get("partitions", []),
                        "addresses": raw.get("addresses", {}),  # where clients reach it
                    }
                )
        records: dict[int, dict[str, Any]] = {}
        with contextlib.suppress(NotFoundError, Exception):
            kv = await js.key_value(names.partitions_bucket)
            for key in await kv.keys():
                raw = json.loads((await kv.get(key)).value or b"{}")
                records[int(key[1:])] = raw
        consumers: dict[str, Any] = {}
        with contextlib.suppress(NotFoundError, Exception):
            consumers = {c.name: c for c in await js.consumers_info(names.ingest_stream)}
        partitions = []
        for number in range(settings.partitions):
            record = records.get(number, {})
            epoch = int(record.get("epoch", 0))
            current = [  # oldest to newest (the generation is the name's last number)
                c
                for name, c in sorted(consumers.items(), key=lambda nc: _generation(nc[0]))
                if Names.consumer_partition_epoch(name) == (number, epoch)
            ]
            lag = None
            if current:  # the owner's latest consumer: messages not yet delivered to it
                lag = current[-1].num_pending or 0
            log_seq, floor = 0, 0
            with contextlib.suppress(NotFoundError, Exception):
                last = await js.get_last_msg(names.log_stream, names.log_subject(number))
                log_seq = int(last.seq or 0)
                floor = LogMessage.decode(last.data or b"").floor
            partitions.append(
                {
                    "partition": number,
                    "owner": record.get("owner", ""),
                    "epoch": epoch,
                    "lag": lag,
                    "log_seq": log_seq,
                    "ingest_floor": floor,
                }
            )
        return {"group": settings.group, "members": members, "partitions": partitions}
    finally:
        await nc.close()


def _generation(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def format_status(status: dict[str, Any]) -> str:
    lines = [f"group {status['group']}", "", "MEMBER               HEARTBEAT AGE  PARTITIONS"]
    for m in sorted(status["members"], key=lambda m: m["member"]):
        held = ",".join(str(p) for p in m["partitions"]) or "-"
        lines.append(f"{m['member']:<20} {m['heartbeat_age_s']:>12.1f}s  {held}")
    if not status["members"]:
        lines.append("(none)")
    lines += ["", "PARTITION  OWNER                EPOCH      LAG    LOG SEQ  INGEST FLOOR"]
    for p in status["partitions"]:
        lag = "-" if p["lag"] is None else str(p["lag"])
        lines.append(
            f"{p['partition']:>9}  {p['owner'] or '(none)':<20} {p['epoch']:>5} {lag:>8} "
            f"{p['log_seq']:>10}  {p['ingest_floor']:>12}"
        )
    return "\n".join(lines)
