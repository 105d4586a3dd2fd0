"""The operator's view of a group, read from NATS (no member needs to answer):
members and how recently each heartbeat, each partition's owner and epoch, its consumer's
lag (messages not yet delivered) and its changelog's last sequence and ingest floor."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError

from gatewayd.cluster.naming import Names
from gatewayd.cluster.pages import LogMessage
from gatewayd.cluster.settings import ClusterSettings

T = TypeVar("T")


# A read that times out (a busy box, a NATS node on its way out) is tried this many times
# before the status says it could not be read.
READ_ATTEMPTS = 3


async def group_status(settings: ClusterSettings, timeout_s: float = 5.0) -> dict[str, Any]:
    """The group as NATS holds it. What could not be read is listed under "errors" (and a
    partition whose record could not be read has owner None), never shown as "no owner"."""
    names = Names(settings.group, settings.ingest_subject)
    options: dict[str, Any] = {
        "servers": list(settings.servers),
        "connect_timeout": timeout_s,
        "max_reconnect_attempts": 1,
        **settings.nats_credentials(),
    }
    nc = await nats.connect(**options)
    errors: list[str] = []
    try:
        js = nc.jetstream(timeout=timeout_s)
        records = await _partition_records(js, names, settings.partitions, errors)
        members = await _members(js, names, records, errors)
        consumers: dict[str, Any] = {}
        try:
            consumers = {c.name: c for c in await _retried(js.consumers_info, names.ingest_stream)}
        except NotFoundError:
            pass  # no ingest stream yet: no member has started
        except Exception as err:
            errors.append(f"ingest consumers of {names.ingest_stream}: {err!r} (lag unknown)")
        partitions = []
        for number in range(settings.partitions):
            record = records.get(number, {})
            epoch = int(record.get("epoch", 0)) if record is not None else 0
            current = [  # oldest to newest (the generation is the name's last number)
                c
                for name, c in sorted(consumers.items(), key=lambda nc: _generation(nc[0]))
                if Names.consumer_partition_epoch(name) == (number, epoch)
            ]
            lag = None
            if current:  # the owner's latest consumer: messages not yet delivered to it
                lag = current[-1].num_pending or 0
            log_seq, floor = 0, 0
            try:
                last = await _retried(js.get_last_msg, names.log_stream, names.log_subject(number))
                log_seq = int(last.seq or 0)
                floor = LogMessage.decode(last.data or b"").floor
            except NotFoundError:
                pass  # nothing logged for it yet
            except Exception as err:
                errors.append(f"partition {number}: its changelog position: {err!r}")
            partitions.append(
                {
                    "partition": number,
                    # None: the record could not be read ("" is a partition nobody owns)
                    "owner": None if record is None else record.get("owner", ""),
                    "epoch": epoch,
                    "lag": lag,
                    "log_seq": log_seq,
                    "ingest_floor": floor,
                }
            )
        status: dict[str, Any] = {
            "group": settings.group,
            "members": members,
            "partitions": partitions,
        }
        if errors:
            status["errors"] = errors
        return status
    finally:
        await nc.close()


async def _retried(read: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`await read(*args)`, again after a timeout, up to `READ_ATTEMPTS` times."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return await read(*args)
        except (TimeoutError, nats.errors.TimeoutError):
            if attempt == READ_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def _partition_records(
    js: JetStreamContext, names: Names, partitions: int, errors: list[str]
) -> dict[int, dict[str, Any] | None]:
    """Each partition's record, read by its key (listing the bucket's keys needs a consumer,
    whose answer a busy box or a NATS node going away can lose). None: not readable."""
    try:
        kv = await _retried(js.key_value, names.partitions_bucket)
    except NotFoundError:
        return {}  # no member has started yet
    except Exception as err:
        errors.append(f"partitions bucket {names.partitions_bucket}: {err!r}")
        return dict.fromkeys(range(partitions))
    records: dict[int, dict[str, Any] | None] = {}
    for number in range(partitions):
        try:
            entry = await _retried(kv.get, names.partition_key(number))
        except NotFoundError:
            continue  # never owned (KeyNotFoundError), or released (KeyDeletedError)
        except Exception as err:
            errors.append(f"partition {number}: its record could not be read: {err!r}")
            records[number] = None
            continue
        records[number] = json.loads(entry.value or b"{}")
    return records


async def _members(
    js: JetStreamContext,
    names: Names,
    records: dict[int, dict[str, Any] | None],
    errors: list[str],
) -> list[dict[str, Any]]:
    """The members' heartbeat records. Their names come from listing the bucket; if that
    fails, the owners named in the partition records are read (and the error says the list
    may be incomplete)."""
    try:
        kv = await _retried(js.key_value, names.members_bucket)
    except NotFoundError:
        return []
    except Exception as err:
        errors.append(f"members bucket {names.members_bucket}: {err!r}")
        return []
    try:
        keys = await _retried(kv.keys)
    except NoKeysError:
        keys = []
    except Exception as err:
        owners = {r.get("owner") for r in records.values() if r is not None}
        keys = sorted(owner for owner in owners if owner)
        errors.append(
            f"members bucket {names.members_bucket}: listing failed ({err!r}); only the "
            "members that own partitions are shown"
        )
    members = []
    for key in keys:
        try:
            entry = await _retried(kv.get, key)
        except NotFoundError:
            continue  # left the group while we read
        except Exception as err:
            errors.append(f"member {key}: its heartbeat record could not be read: {err!r}")
            continue
        raw = json.loads(entry.value or b"{}")
        members.append(
            {
                "member": key,
                "heartbeat_age_s": round(time.time() - float(raw.get("at", 0)), 1),
                "partitions": raw.get("partitions", []),
                "addresses": raw.get("addresses", {}),  # where clients reach it
            }
        )
    return members


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
        owner = "(unread)" if p["owner"] is None else p["owner"] or "(none)"
        lines.append(
            f"{p['partition']:>9}  {owner:<20} {p['epoch']:>5} {lag:>8} "
            f"{p['log_seq']:>10}  {p['ingest_floor']:>12}"
        )
    if status.get("errors"):
        lines += ["", "NOT READ (the figures above are incomplete):"]
        lines += [f"  {error}" for error in status["errors"]]
    return "\n".join(lines)
