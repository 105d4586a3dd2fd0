"""Tests for gatewayd/agents/retry.py: policy validation, full-jitter bounds, retry()."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.agents import Agent, callable
from gatewayd.agents.retry import (
    FailureDecision,
    RetryPolicy,
    backoff_delay_s,
    decide_after_failure,
    retry,
)


class Flaky:
    """Fails `failures` times with numbered errors, then returns "ok"."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"failure {self.calls}")
        return "ok"


def test_policy_defaults_match_the_sdk() -> None:
    assert RetryPolicy() == RetryPolicy(max_attempts=3, base_delay_s=0.1, max_delay_s=3.0)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
        ({"base_delay_s": 0}, "base_delay_s"),
        ({"base_delay_s": -0.1}, "base_delay_s"),
        ({"base_delay_s": math.nan}, "base_delay_s"),
        ({"max_delay_s": math.inf}, "max_delay_s"),
        ({"max_delay_s": "3"}, "max_delay_s"),
        ({"base_delay_s": 5.0, "max_delay_s": 1.0}, "must be <="),
    ],
)
def test_policy_rejects_bad_options_eagerly(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        RetryPolicy(**kwargs)


def test_from_options_round_trips_and_rejects_unknown_keys() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay_s=2.0, max_delay_s=60.0)
    assert RetryPolicy.from_options(policy.to_options()) == policy
    assert RetryPolicy.from_options(None) == RetryPolicy()
    assert RetryPolicy.from_options({"max_attempts": 5}) == RetryPolicy(max_attempts=5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) max_attempt;"):
        RetryPolicy.from_options({"max_attempt": 5})
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy.from_options({"max_attempts": -1})
    with pytest.raises(ValueError, match="mapping"):
        RetryPolicy.from_options([("max_attempts", 2)])  # type: ignore[arg-type]


def test_backoff_is_full_jitter_of_a_capped_exponential() -> None:
    policy = RetryPolicy()  # 0.1 s base, 3 s cap
    almost_one = 0.999999
    ceilings = [
        backoff_delay_s(n, policy, rand=lambda: almost_one) / almost_one for n in range(1, 8)
    ]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0])
    assert backoff_delay_s(3, policy, rand=lambda: 0.0) == 0.0
    assert backoff_delay_s(2, policy, rand=lambda: 0.5) == pytest.approx(0.2)
    # Far past float range for 2**n: capped, no OverflowError.
    assert backoff_delay_s(5000, policy, rand=lambda: 0.5) == pytest.approx(1.5)


@pytest.mark.parametrize("attempt", [0, -1, 1.0, True])
def test_backoff_rejects_attempts_below_one(attempt: object) -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay_s(attempt, RetryPolicy())  # type: ignore[arg-type]


@given(
    attempt=st.integers(min_value=1, max_value=2000),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    base_delay_s=st.floats(min_value=1e-6, max_value=10.0),
    extra_s=st.floats(min_value=0.0, max_value=100.0),
)
def test_backoff_stays_within_bounds(
    attempt: int, jitter: float, base_delay_s: float, extra_s: float
) -> None:
    policy = RetryPolicy(
        max_attempts=3, base_delay_s=base_delay_s, max_delay_s=base_delay_s + extra_s
    )
    delay_s = backoff_delay_s(attempt, policy, rand=lambda: jitter)
    ceiling_s = min(math.ldexp(base_delay_s, min(attempt, 1000)), policy.max_delay_s)
    assert 0.0 <= delay_s <= ceiling_s
    assert delay_s == pytest.approx(jitter * ceiling_s)


def test_decide_after_failure_retries_then_gives_up() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=2.0, max_delay_s=60.0)
    first = decide_after_failure(1, policy, now=100.0, error="boom", rand=lambda: 0.5)
    assert first == FailureDecision(attempts=1, retry_at=102.0, error="boom")
    assert not first.gave_up
    second = decide_after_failure(2, policy, now=100.0, error="boom", rand=lambda: 0.5)
    assert second.retry_at == pytest.approx(104.0)
    last = decide_after_failure(3, policy, now=100.0, error="boom", rand=lambda: 0.5)
    assert last.gave_up and last.retry_at is None and last.attempts == 3


async def test_retry_returns_after_transient_failures() -> None:
    flaky = Flaky(failures=2)
    assert await retry(flaky, base_delay_s=0.001, max_delay_s=0.002) == "ok"
    assert flaky.calls == 3


async def test_retry_awaits_async_functions() -> None:
    calls = 0

    async def read_sensor() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 1:
            raise TimeoutError("sensor busy")
        return 21

    assert await retry(read_sensor, base_delay_s=0.001, max_delay_s=0.002) == 21
    assert calls == 2


async def test_retry_reraises_the_last_error_after_max_attempts() -> None:
    flaky = Flaky(failures=10)
    with pytest.raises(ConnectionError, match="failure 4"):
        await retry(flaky, max_attempts=4, base_delay_s=0.001, max_delay_s=0.002)
    assert flaky.calls == 4


async def test_retry_sleeps_at_most_the_capped_backoff() -> None:
    flaky = Flaky(failures=10)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await retry(flaky, max_attempts=4, base_delay_s=0.02, max_delay_s=0.05)
    # Waits after attempts 1..3 are bounded by 0.04 + 0.05 + 0.05 s.
    assert time.monotonic() - started < 0.14 + 0.5
    assert flaky.calls == 4


async def test_should_retry_gets_error_and_next_attempt_and_can_stop() -> None:
    seen: list[tuple[str, int]] = []

    def should_retry(err: BaseException, next_attempt: int) -> bool:
        seen.append((str(err), next_attempt))
        return next_attempt < 3

    flaky = Flaky(failures=10)
    with pytest.raises(ConnectionError, match="failure 2"):
        await retry(
            flaky, max_attempts=5, base_delay_s=0.001, max_delay_s=0.002, should_retry=should_retry
        )
    assert seen == [("failure 1", 2), ("failure 2", 3)]
    assert flaky.calls == 2


async def test_should_retry_is_not_asked_after_the_last_attempt() -> None:
    seen: list[int] = []
    flaky = Flaky(failures=10)
    with pytest.raises(ConnectionError, match="failure 2"):
        await retry(
            flaky,
            max_attempts=2,
            base_delay_s=0.001,
            max_delay_s=0.002,
            should_retry=lambda err, n: seen.append(n) or True,
        )
    assert seen == [2]


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"base_delay_s": -1.0},
        {"base_delay_s": 1.0, "max_delay_s": 0.5},
        {"should_retry": "yes"},
    ],
)
async def test_retry_validates_options_before_the_first_call(options: dict) -> None:
    flaky = Flaky(failures=0)
    with pytest.raises(ValueError):
        await retry(flaky, **options)
    assert flaky.calls == 0


async def test_retry_does_not_retry_cancellation_or_base_exceptions() -> None:
    class Shutdown(BaseException):
        pass

    calls = 0

    def stop() -> None:
        nonlocal calls
        calls += 1
        raise Shutdown

    with pytest.raises(Shutdown):
        await retry(stop, base_delay_s=0.001, max_delay_s=0.002)
    assert calls == 1


class _Retrier(Agent):
    @callable
    async def flaky(self, base_delay: float, max_delay: float) -> str:
        return await self.retry(lambda: "ok", base_delay=base_delay, max_delay=max_delay)


@pytest.mark.parametrize(
    ("base_delay", "max_delay", "named"),
    [(-1.0, 3.0, "base_delay"), (0.1, math.inf, "max_delay"), (5.0, 1.0, "base_delay")],
)
async def test_agent_retry_errors_name_the_keywords_the_agent_passed(
    make_runtime, base_delay: float, max_delay: float, named: str
) -> None:
    async with make_runtime({"r": _Retrier}) as rt:
        with pytest.raises(Exception, match=rf"self\.retry\(\): {named}\)") as caught:
            await rt.call("r", "a", "flaky", base_delay, max_delay)
    assert "retry:" in str(caught.value)
