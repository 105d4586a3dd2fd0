"""Retries with exponential backoff and full jitter (the Agents SDK's `retry()`), plus the
retry bookkeeping shared by persisted schedules and queue items.

Backoff (AWS "full jitter"): after failed attempt `n` (attempts are numbered from 1) wait
`rand() * min(2**n * base_delay_s, max_delay_s)` seconds. With the defaults (base 0.1 s, cap
3 s) the waits are at most 0.2 s, 0.4 s, 0.8 s, ... 3 s. Full jitter spreads many agents that
failed at once (a broker restart) instead of retrying them in lock step.

Options are validated eagerly, before anything runs, so a typo fails at the call site and not
after the first failure. This module does no I/O besides `asyncio.sleep`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_OPTION_NAMES = ("max_attempts", "base_delay_s", "max_delay_s")
# `Agent.retry()` spells the delays without the unit (base_delay=, max_delay=), like the SDK;
# errors name both spellings so whoever typed either one finds it.
_AGENT_KEYWORDS = {"base_delay_s": "base_delay", "max_delay_s": "max_delay"}


def _named(option: str) -> str:
    return f"{option} (self.retry(): {_AGENT_KEYWORDS[option]})"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry: `max_attempts` counts the first try too."""

    max_attempts: int = 3
    base_delay_s: float = 0.1
    max_delay_s: float = 3.0

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"retry: max_attempts must be an int >= 1, got {attempts!r}")
        for name in ("base_delay_s", "max_delay_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"retry: {_named(name)} must be a finite number of seconds > 0, got {value!r}"
                )
        if self.base_delay_s > self.max_delay_s:
            raise ValueError(
                f"retry: {_named('base_delay_s')} = {self.base_delay_s} must be <= "
                f"{_named('max_delay_s')} = {self.max_delay_s}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> RetryPolicy:
        """Build from persisted options (`to_options()` output); None gives the defaults.

        Unknown keys are rejected rather than ignored: a misspelt `max_attempt` would otherwise
        silently fall back to the default.
        """
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ValueError(f"retry: options must be a mapping, got {type(options).__name__}")
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(
                f"retry: unknown option(s) {', '.join(map(str, unknown))}; "
                f"expected any of {', '.join(_OPTION_NAMES)}"
            )
        return cls(**options)

    def to_options(self) -> dict[str, int | float]:
        """Plain-JSON form, the inverse of `from_options`."""
        return {
            "max_attempts": self.max_attempts,
            "base_delay_s": self.base_delay_s,
            "max_delay_s": self.max_delay_s,
        }


def backoff_delay_s(
    attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt `attempt` (1 = the first try): full jitter.

    `rand` must return a float in [0, 1); it is injectable so tests can pin the jitter.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"retry: attempt must be an int >= 1, got {attempt!r}")
    try:
        ceiling_s = min(float(2**attempt) * policy.base_delay_s, policy.max_delay_s)
    except OverflowError:  # 2**attempt beyond float range: long past the cap anyway
        ceiling_s = policy.max_delay_s
    return rand() * ceiling_s


@dataclass(frozen=True, slots=True)
class FailureDecision:
    """What a persisted schedule or queue item does after a failed run.

    `attempts` is the number of failed attempts so far (persisted). `retry_at` is the epoch
    time of the next attempt, or None when the retries are used up and the item was moved to
    its visible failed state (schedule failure record / queue dead letter).
    """

    attempts: int
    retry_at: float | None
    error: str

    @property
    def gave_up(self) -> bool:
        return self.retry_at is None


def decide_after_failure(
    attempts: int,
    policy: RetryPolicy,
    now: float,
    error: str,
    rand: Callable[[], float] = random.random,
) -> FailureDecision:
    """Retry later with backoff, or give up once `attempts` failures used the policy up."""
    if attempts >= policy.max_attempts:
        return FailureDecision(attempts=attempts, retry_at=None, error=error)
    return FailureDecision(
        attempts=attempts,
        retry_at=now + backoff_delay_s(attempts, policy, rand),
        error=error,
    )


async def retry(
    fn: Callable[[], T | Awaitable[T]],
    *,
    max_attempts: int = 3,
    base_delay_s: float = 0.1,
    max_delay_s: float = 3.0,
    should_retry: Callable[[BaseException, int], bool] | None = None,
) -> T:
    """Call `fn` (sync or async, no arguments) until it succeeds, at most `max_attempts` times.

    Only `Exception`s are retried; cancellation and `KeyboardInterrupt` pass straight through.
    Before each retry `should_retry(error, next_attempt)` is asked (next_attempt is 2 for the
    first retry); False re-raises that error at once. After the last attempt the last error is
    re-raised unchanged.

        reading = await retry(lambda: sensor.read(), max_attempts=5, base_delay_s=0.2)
    """
    policy = RetryPolicy(max_attempts, base_delay_s, max_delay_s)
    if should_retry is not None and not callable(should_retry):
        raise ValueError(f"retry: should_retry must be callable, got {should_retry!r}")
    attempt = 1
    while True:
        try:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as err:
            if attempt >= policy.max_attempts:
                raise
            if should_retry is not None and not should_retry(err, attempt + 1):
                raise
            delay_s = backoff_delay_s(attempt, policy)
            logger.debug(
                "retry: attempt %d/%d failed (%s: %s); retrying in %.3fs",
                attempt,
                policy.max_attempts,
                type(err).__name__,
                err,
                delay_s,
            )
            await asyncio.sleep(delay_s)
            attempt += 1
