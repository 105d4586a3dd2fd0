"""Which device ids an MQTT route serves, and how fast ids may become new agents.

Any client that may publish on `devices/+/telemetry` chooses the ids, and every new id costs a
link, a runtime connection and an agent's SQLite file. A route therefore may name the ids it
serves (`allowed_ids`, `allowed_id_pattern`) and caps how many ids *without an agent yet* are
admitted per minute (`max_new_agents_per_minute`, a token bucket holding one minute's worth).
Refusals come in episodes: the bridge logs once when an episode starts and once when new ids
are admitted again, with how many messages were refused in between.

Pure: no I/O and no clock of its own (callers pass `now`, in monotonic seconds), so it is
tested without a broker. Never imports `gatewayd`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from protocols.mqtt_settings import MqttRoute

SECONDS_PER_MINUTE = 60.0


class Verdict(enum.Enum):
    ADMIT = "admit"
    NOT_ALLOWED = "not_allowed"  # not in the route's allow-list
    RATE_LIMITED = "new_agent_refused"  # a new id over the route's new-agent cap


class IdAllowList:
    """Ids in `ids`, or matching `pattern` in full, are allowed; with neither set, all are."""

    __slots__ = ("_ids", "_pattern")

    def __init__(self, ids: frozenset[str] | None = None, pattern: str | None = None) -> None:
        self._ids = ids
        self._pattern = re.compile(pattern) if pattern is not None else None

    @property
    def restricted(self) -> bool:
        return self._ids is not None or self._pattern is not None

    def allows(self, device_id: str) -> bool:
        if not self.restricted:
            return True
        if self._ids is not None and device_id in self._ids:
            return True
        return self._pattern is not None and self._pattern.fullmatch(device_id) is not None


class TokenBucket:
    """`per_minute` tokens refilled evenly over a minute; holds at most one minute's worth."""

    __slots__ = ("_capacity", "_per_s", "_tokens", "_updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self._capacity = float(per_minute)
        self._per_s = per_minute / SECONDS_PER_MINUTE
        self._tokens = self._capacity
        self._updated = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._per_s)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class RefusalEpisode:
    """New ids refused back to back: since when, how many messages, the first id refused."""

    started_at: float
    first_id: str
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    episode_started: RefusalEpisode | None = None  # this refusal opened an episode: log it
    episode_ended: RefusalEpisode | None = None  # this admission closed one: log its summary


class RouteAdmission:
    """Admission of ids that have no open link on one route."""

    def __init__(self, route: MqttRoute, now: float) -> None:
        self.route = route
        self.allow_list = IdAllowList(route.allowed_ids, route.allowed_id_pattern)
        per_minute = route.max_new_agents_per_minute
        self._bucket = TokenBucket(per_minute, now) if per_minute > 0 else None
        self._episode: RefusalEpisode | None = None

    @property
    def caps_new_agents(self) -> bool:
        return self._bucket is not None

    def check(self, device_id: str, *, is_known: Callable[[], bool], now: float) -> Decision:
        """`is_known()`: the id already has an agent (such ids are never rate limited); asked
        only when the answer matters."""
        if not self.allow_list.allows(device_id):
            return Decision(Verdict.NOT_ALLOWED)
        if self._bucket is None or is_known():
            return Decision(Verdict.ADMIT)
        if self._bucket.take(now):
            ended, self._episode = self._episode, None
            return Decision(Verdict.ADMIT, episode_ended=ended)
        started = None
        if self._episode is None:
            started = self._episode = RefusalEpisode(now, device_id)
        self._episode.refused += 1
        return Decision(Verdict.RATE_LIMITED, episode_started=started)
