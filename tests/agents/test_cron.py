"""Tests for gatewayd/agents/cron.py: parsing errors and next times, checked against an oracle."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.agents.cron import CronError, CronExpression


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def upcoming(expression: str, start: datetime, count: int) -> list[datetime]:
    cron = CronExpression.parse(expression)
    times, current = [], start
    for _ in range(count):
        current = cron.next_after(current)
        times.append(current)
    return times


@pytest.mark.parametrize(
    ("expression", "field"),
    [
        ("* * * *", "expected 5 fields"),
        ("* * * * * *", "expected 5 fields"),
        ("", "expected 5 fields"),
        ("60 * * * *", "minute field '60'"),
        ("* 24 * * *", "hour field '24'"),
        ("* * 0 * *", "day-of-month field '0'"),
        ("* * 32 * *", "day-of-month field '32'"),
        ("* * * 13 *", "month field '13'"),
        ("* * * FOO *", "month field 'FOO'"),
        ("* * * * 8", "day-of-week field '8'"),
        ("* * * * FUN", "day-of-week field 'FUN'"),
        ("* * * JAN-MON *", "month field 'JAN-MON'"),
        ("30-10 * * * *", "goes backwards"),
        ("*/0 * * * *", "step must be >= 1"),
        ("1,,2 * * * *", "minute field '1,,2'"),
        ("*/x * * * *", "minute field"),
        ("0 0 30 2 *", "never occurs"),
        ("0 0 31 4,6,9,11 *", "never occurs"),
        ("@reboot", "expected 5 fields"),
    ],
)
def test_parse_errors_name_the_bad_field(expression: str, field: str) -> None:
    with pytest.raises(CronError, match=field.replace("*", r"\*")):
        CronExpression.parse(expression)


def test_cron_error_is_a_value_error() -> None:
    assert issubclass(CronError, ValueError)
    with pytest.raises(CronError, match="must be a string"):
        CronExpression.parse(5)  # type: ignore[arg-type]


def test_fields_lists_ranges_steps_and_names() -> None:
    cron = CronExpression.parse("5/20,1 10-16/3 1-3,15 jan-Mar,DEC mon-FRI")
    assert cron.minutes == (1, 5, 25, 45)
    assert cron.hours == (10, 13, 16)
    assert cron.days_of_month == {1, 2, 3, 15}
    assert cron.months == {1, 2, 3, 12}
    assert cron.days_of_week == {1, 2, 3, 4, 5}
    assert CronExpression.parse("0 0 * * 7").days_of_week == {0}
    assert CronExpression.parse("0 0 * * 5-7").days_of_week == {5, 6, 0}
    assert CronExpression.parse("0 0 * * *").days_of_week == set(range(7))


def test_macros_and_whitespace_normalise() -> None:
    assert CronExpression.parse("@hourly").source == "0 * * * *"
    assert CronExpression.parse("@daily") == CronExpression.parse(" 0  0 * * * ")
    assert upcoming("@weekly", utc(2026, 11, 26, 8, 0), 1) == [utc(2026, 11, 29)]


def test_next_is_strictly_after_and_minute_aligned() -> None:
    assert upcoming("*/15 * * * *", utc(2026, 11, 26, 8, 50, 30), 3) == [
        utc(2026, 11, 26, 9, 0),
        utc(2026, 11, 26, 9, 15),
        utc(2026, 11, 26, 9, 30),
    ]
    cron = CronExpression.parse("0 9 * * *")
    assert cron.next_after(utc(2026, 1, 1, 9, 0)) == utc(2026, 1, 2, 9, 0)
    assert cron.next_after(utc(2026, 1, 1, 8, 59, 59, 999999)) == utc(2026, 1, 1, 9, 0)


def test_rolls_over_hour_day_month_and_year() -> None:
    assert upcoming("0 0 1 1 *", utc(2026, 12, 31, 23, 59), 1) == [utc(2027, 1, 1)]
    assert upcoming("59 23 * * *", utc(2026, 2, 28, 23, 59), 1) == [utc(2026, 3, 1, 23, 59)]
    assert upcoming("30 * * * *", utc(2026, 12, 31, 23, 45), 1) == [utc(2027, 1, 1, 0, 30)]


def test_day_31_skips_shorter_months() -> None:
    assert upcoming("0 0 31 * *", utc(2026, 4, 15), 4) == [
        utc(2026, 5, 31),
        utc(2026, 7, 31),
        utc(2026, 8, 31),
        utc(2026, 10, 31),
    ]


def test_february_29_waits_for_leap_years_and_skips_2100() -> None:
    assert upcoming("0 0 29 2 *", utc(2026, 3, 1), 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]
    assert upcoming("0 0 29 2 *", utc(2096, 3, 1), 1) == [utc(2104, 2, 29)]


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    # 2026-11-26 is a Thursday; Mondays and the 1st both match (Vixie cron rule).
    assert upcoming("0 9 1 * MON", utc(2026, 11, 26), 3) == [
        utc(2026, 11, 30, 9),
        utc(2026, 12, 1, 9),
        utc(2026, 12, 7, 9),
    ]
    # February 30 never occurs, but with a weekday restriction it still runs on Mondays.
    assert upcoming("0 0 30 2 MON", utc(2026, 1, 1), 1) == [utc(2026, 2, 2)]


def test_day_of_week_alone_and_star_step_keep_and_semantics() -> None:
    assert upcoming("0 12 * * FRI", utc(2026, 11, 26), 2) == [
        utc(2026, 11, 27, 12),
        utc(2026, 12, 4, 12),
    ]
    # A day-of-week starting with `*` counts as unrestricted (AND): "*/1" = every day, so
    # this is simply every 13th, not "every 13th or every day".
    assert upcoming("0 0 13 * */1", utc(2026, 1, 1), 2) == [utc(2026, 1, 13), utc(2026, 2, 13)]
    # Restricted day-of-week: every 13th OR every Friday.
    assert upcoming("0 0 13 * 5", utc(2026, 1, 1), 3) == [
        utc(2026, 1, 2),
        utc(2026, 1, 9),
        utc(2026, 1, 13),
    ]


def test_sunday_as_0_or_7_and_month_names() -> None:
    expected = [utc(2027, 1, 3, 4, 5), utc(2027, 1, 10, 4, 5)]
    assert upcoming("5 4 * JAN-MAR sun", utc(2026, 11, 26), 2) == expected
    assert upcoming("5 4 * 1-3 7", utc(2026, 11, 26), 2) == expected
    assert upcoming("5 4 * 1-3 0", utc(2026, 11, 26), 2) == expected


def test_aware_input_in_another_zone_returns_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    result = CronExpression.parse("0 * * * *").next_after(
        datetime(2026, 6, 1, 10, 30, tzinfo=plus_two)
    )
    assert result == utc(2026, 6, 1, 9, 0)
    assert result.tzinfo is UTC


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CronExpression.parse("* * * * *").next_after(datetime(2026, 1, 1))


def test_next_after_ts_uses_epoch_seconds() -> None:
    start = utc(2026, 11, 26, 8, 50).timestamp()
    assert (
        CronExpression.parse("0 9 * * *").next_after_ts(start) == utc(2026, 11, 26, 9).timestamp()
    )


def _oracle_next(
    minutes: set[int],
    hours: set[int],
    days: set[int],
    months: set[int],
    weekdays: set[int],
    dom_star: bool,
    dow_star: bool,
    after: datetime,
) -> datetime | None:
    """Independent reference: walk the calendar with `calendar`, Vixie's day rule."""
    start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for year in range(start.year, start.year + 30):
        for month in sorted(months):
            if (year, month) < (start.year, start.month):
                continue
            for day in range(1, calendar.monthrange(year, month)[1] + 1):
                if (year, month, day) < (start.year, start.month, start.day):
                    continue
                weekday = (calendar.weekday(year, month, day) + 1) % 7  # Sunday = 0
                dom_ok, dow_ok = day in days, weekday in weekdays
                ok = (dom_ok or dow_ok) if not dom_star and not dow_star else (dom_ok and dow_ok)
                if not ok:
                    continue
                for hour in sorted(hours):
                    for minute in sorted(minutes):
                        candidate = datetime(year, month, day, hour, minute, tzinfo=UTC)
                        if candidate >= start:
                            return candidate
    return None


def _field(values: set[int]) -> str:
    return ",".join(str(v) for v in sorted(values))


@settings(max_examples=150, deadline=None)
@given(
    minutes=st.sets(st.integers(0, 59), min_size=1, max_size=4),
    hours=st.sets(st.integers(0, 23), min_size=1, max_size=4),
    days=st.one_of(st.none(), st.sets(st.integers(1, 31), min_size=1, max_size=3)),
    months=st.one_of(st.none(), st.sets(st.integers(1, 12), min_size=1, max_size=3)),
    weekdays=st.one_of(st.none(), st.sets(st.integers(0, 6), min_size=1, max_size=3)),
    after=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 12, 31)),
)
def test_next_after_matches_a_calendar_walk(
    minutes: set[int],
    hours: set[int],
    days: set[int] | None,
    months: set[int] | None,
    weekdays: set[int] | None,
    after: datetime,
) -> None:
    expression = " ".join(
        [
            _field(minutes),
            _field(hours),
            "*" if days is None else _field(days),
            "*" if months is None else _field(months),
            "*" if weekdays is None else _field(weekdays),
        ]
    )
    after = after.replace(tzinfo=UTC)
    expected = _oracle_next(
        minutes,
        hours,
        days or set(range(1, 32)),
        months or set(range(1, 13)),
        weekdays or set(range(7)),
        days is None,
        weekdays is None,
        after,
    )
    try:
        cron = CronExpression.parse(expression)
    except CronError as err:
        assert "never occurs" in str(err)
        assert expected is None
        return
    assert expected is not None, f"{expression!r} parsed but never matches"
    assert cron.next_after(after) == expected
