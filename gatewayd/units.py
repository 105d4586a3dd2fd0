"""Human units in the config file: durations ("30s", "250ms") and sizes ("1GiB", "64KiB").

Pure functions; each raises ValueError with a message that shows an accepted example.
"""

from __future__ import annotations

import math
import re

_NUMBER_AND_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-zµ]*)\s*$")

_SECONDS_PER_UNIT = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_BYTES_PER_UNIT = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration_s(value: object) -> float:
    """Seconds from a duration string such as "30s", "2ms", "1.5m", "1h" (a unit is required)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"expected a duration string with a unit like '30s' or '250ms', found {value!r}"
        )
    match = _NUMBER_AND_UNIT.match(value)
    unit = match.group(2) if match else None
    if match is None or unit not in _SECONDS_PER_UNIT:
        units = ", ".join(sorted(_SECONDS_PER_UNIT))
        raise ValueError(
            f"expected a duration like '30s' or '250ms' (units: {units}), found {value!r}"
        )
    seconds = float(match.group(1)) * _SECONDS_PER_UNIT[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} is too large")
    return seconds


def parse_size_bytes(value: object) -> int:
    """Bytes from an integer or a size string such as "1GiB", "64KiB", "10MB" (SI or binary)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '64KiB' or '1GiB', found {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, found {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '64KiB' or '1GiB', found {value!r}")
    match = _NUMBER_AND_UNIT.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTES_PER_UNIT:
        raise ValueError(
            f"expected a size like '64KiB', '10MB' or '1GiB' (units: B, KB, MB, GB, KiB, MiB, GiB), "
            f"found {value!r}"
        )
    return int(float(match.group(1)) * _BYTES_PER_UNIT[unit])


def format_duration_s(seconds: float) -> str:
    """The inverse for log lines: 0.002 -> '2ms', 30 -> '30s'."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
