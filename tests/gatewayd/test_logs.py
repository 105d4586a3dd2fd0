"""Log lines: one logfmt event per line; under journald no timestamp and a priority prefix."""

from __future__ import annotations

import logging

from gatewayd.logs import LogfmtFormatter


def _record(message: str, level: int = logging.WARNING, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("gatewayd.test", level, __file__, 1, message, (), None)
    record.fields = fields
    return record


def test_plain_line_has_timestamp_and_quoted_fields() -> None:
    line = LogfmtFormatter(for_journal=False).format(
        _record("broker unreachable", broker="mqtt://10.0.0.2:1883", retry_s=3.2)
    )
    assert line.startswith("ts=")
    assert 'level=warning logger=gatewayd.test msg="broker unreachable"' in line
    assert "broker=mqtt://10.0.0.2:1883 retry_s=3.2" in line
    assert "\n" not in line


def test_journal_line_has_priority_and_no_timestamp() -> None:
    line = LogfmtFormatter(for_journal=True).format(_record("disk full", logging.ERROR))
    assert line.startswith("<3>level=error ")
    assert "ts=" not in line


def test_multiline_values_stay_on_one_line() -> None:
    line = LogfmtFormatter(for_journal=False).format(_record('bad "frame"\nat offset 3'))
    assert 'msg="bad \\"frame\\"\\nat offset 3"' in line
