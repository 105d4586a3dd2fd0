"""Five-field cron expressions, evaluated in UTC.

    minute  hour  day-of-month  month  day-of-week
    0-59    0-23  1-31          1-12   0-7 (0 and 7 are Sunday)

Each field is a comma list of `*`, `N`, `A-B`, with an optional `/STEP` after `*`, `A-B` or
`N` (`N/STEP` means `N-max/STEP`). Months accept JAN-DEC, days SUN-SAT (any case). Macros:
@yearly @annually @monthly @weekly @daily @midnight @hourly.

Day matching follows Vixie cron: when both day-of-month and day-of-week are restricted
(neither starts with `*`) a day matches if EITHER matches ("0 9 1 * MON" = the 1st and every
Monday); otherwise both must match.

Why not a library: croniter was declared abandoned on PyPI in 2025 before moving to
pallets-eco, and cronsim, though well kept, would add a runtime dependency on edge gateways
for ~150 lines, raises its own error type, and accepts extensions (L, W, #) we do not want to
promise. This module is pure (no clock, no I/O) and is tested against a brute-force oracle.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
        start=1,
    )
}
_DAY_NAMES = {name: n for n, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
_NAMES_BY_FIELD = {3: _MONTH_NAMES, 4: _DAY_NAMES}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ITEM = re.compile(
    r"^(?:(?P<star>\*)|(?P<lo>[0-9A-Za-z]+)(?:-(?P<hi>[0-9A-Za-z]+))?)(?:/(?P<step>[0-9]+))?$"
)
# Days per month in a leap year: the most a month can ever have.
_MAX_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# Feb 29 on a given weekday recurs within 28 years; anything matchable matches by then.
_SEARCH_YEARS = 30


class CronError(ValueError):
    """A cron expression that cannot be parsed or can never match."""


@dataclass(frozen=True, slots=True)
class CronExpression:
    """A parsed cron expression; build it with `CronExpression.parse`."""

    source: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # 0 = Sunday ... 6 = Saturday (7 folded into 0)
    day_of_month_restricted: bool
    day_of_week_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronExpression:
        """Parse `expression`; raises `CronError` (a ValueError) naming the bad field."""
        if not isinstance(expression, str):
            raise CronError(f"cron: expression must be a string, got {type(expression).__name__}")
        text = " ".join(expression.split())
        text = _MACROS.get(text.lower(), text)
        fields = text.split(" ") if text else []
        if len(fields) != 5:
            raise CronError(
                f"cron {expression!r}: expected 5 fields (minute hour day-of-month month "
                f"day-of-week), got {len(fields)}"
            )
        values = [_parse_field(expression, index, field) for index, field in enumerate(fields)]
        days_of_week = frozenset(day % 7 for day in values[4])
        parsed = cls(
            source=text,
            minutes=tuple(sorted(values[0])),
            hours=tuple(sorted(values[1])),
            days_of_month=frozenset(values[2]),
            months=frozenset(values[3]),
            days_of_week=days_of_week,
            day_of_month_restricted=not fields[2].startswith("*"),
            day_of_week_restricted=not fields[4].startswith("*"),
        )
        parsed._check_can_match()
        return parsed

    def _check_can_match(self) -> None:
        # Only "day-of-month restricted, day-of-week `*`" can select no real day, e.g. Feb 30.
        if self.day_of_week_restricted or not self.day_of_month_restricted:
            return
        longest = max(_MAX_DAYS_IN_MONTH[month - 1] for month in self.months)
        if min(self.days_of_month) > longest:
            raise CronError(
                f"cron {self.source!r}: day-of-month never occurs in the chosen month(s)"
            )

    def matches_day(self, day: datetime) -> bool:
        """Whether the calendar day of `day` is selected (month, day-of-month, day-of-week)."""
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.days_of_month
        dow_ok = (day.isoweekday() % 7) in self.days_of_week
        if self.day_of_month_restricted and self.day_of_week_restricted:
            return dom_ok or dow_ok
        return dom_ok and dow_ok

    def next_after(self, dt: datetime) -> datetime:
        """The first matching minute strictly after `dt` (timezone-aware), as a UTC datetime."""
        if not isinstance(dt, datetime) or dt.tzinfo is None or dt.utcoffset() is None:
            raise ValueError(f"cron: next_after needs a timezone-aware datetime, got {dt!r}")
        start = dt.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        first_hour, first_minute = start.hour, start.minute
        limit_year = start.year + _SEARCH_YEARS
        while day.year <= limit_year:
            if day.month not in self.months:
                day = _first_of_next_month(day)
                first_hour = first_minute = 0
                continue
            if self.matches_day(day):
                found = self._first_time_in_day(first_hour, first_minute)
                if found is not None:
                    hour, minute = found
                    return day.replace(hour=hour, minute=minute)
            day += timedelta(days=1)
            first_hour = first_minute = 0
        # Unreachable for expressions that passed parse(); kept as a loud guard.
        raise CronError(f"cron {self.source!r}: no match within {_SEARCH_YEARS} years")

    def next_after_ts(self, epoch_s: float) -> float:
        """`next_after` on epoch seconds."""
        return self.next_after(datetime.fromtimestamp(epoch_s, tz=UTC)).timestamp()

    def _first_time_in_day(self, from_hour: int, from_minute: int) -> tuple[int, int] | None:
        for hour in self.hours:
            if hour < from_hour:
                continue
            lowest_minute = from_minute if hour == from_hour else 0
            for minute in self.minutes:
                if minute >= lowest_minute:
                    return hour, minute
        return None


def _first_of_next_month(day: datetime) -> datetime:
    if day.month == 12:
        return day.replace(year=day.year + 1, month=1, day=1, hour=0, minute=0)
    return day.replace(month=day.month + 1, day=1, hour=0, minute=0)


def _parse_field(expression: str, index: int, field: str) -> set[int]:
    name = _FIELD_NAMES[index]
    low, high = _BOUNDS[index]

    def fail(reason: str) -> CronError:
        return CronError(f"cron {expression!r}: {name} field {field!r}: {reason}")

    values: set[int] = set()
    for item in field.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise fail(f"cannot parse {item!r}")
        step = int(match["step"]) if match["step"] is not None else 1
        if step < 1:
            raise fail("step must be >= 1")
        if match["star"]:
            start, end = low, high
            if index == 4:  # `*` for days is 0-6; 7 only duplicates Sunday
                end = 6
        else:
            start = _value(match["lo"], index, fail)
            if match["hi"] is not None:
                end = _value(match["hi"], index, fail)
            elif match["step"] is not None:
                end = high
            else:
                end = start
            if start > end:
                raise fail(f"range {start}-{end} goes backwards")
        values.update(range(start, end + 1, step))
    return values


def _value(token: str, index: int, fail: Callable[[str], CronError]) -> int:
    low, high = _BOUNDS[index]
    if token.isdigit():
        number = int(token)
    else:
        names = _NAMES_BY_FIELD.get(index, {})
        if token.upper() not in names:
            raise fail(f"unknown value {token!r}")
        number = names[token.upper()]
    if not low <= number <= high:
        raise fail(f"value {number} out of range {low}-{high}")
    return number
