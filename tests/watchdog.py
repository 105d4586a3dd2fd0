"""A per-test time limit that always ends a stuck run, with the stacks that explain it.

Loaded for every run by `-p tests.watchdog` in pyproject's `addopts`, in place of pytest-timeout
(disabled there with `-p no:timeout`). The `timeout` ini value and `@pytest.mark.timeout(N)` keep
their meaning: the seconds one test may take, setup, call and teardown together.

Why not pytest-timeout: it stands down as soon as a test fails (it cancels its timer in
`pytest_exception_interact`, which pytest calls for every failure, not only under --pdb), so a
teardown that then hangs -- pytest-asyncio waiting for a task that ignores its cancellation --
sat for 15 minutes under `timeout = 120`. Its signal method also raises inside the event loop,
where asyncio's callback runner can swallow the exception; and when it exits it leaves the
test's mosquitto and daemon processes running.

When a test runs past its limit this plugin, from a timer thread, writes to the real stderr:
the test's id, the stack of every thread, the stack of every unfinished asyncio task (the hang
is often a task, while the main thread sits in `epoll`), then SIGKILLs every process the test
run started (mosquitto, daemons, helpers) and exits with status 1. If the timer thread itself
cannot run (the stuck code holds the GIL), faulthandler dumps the threads and exits
`timeout_backstop` (30) seconds later.

Under pytest-xdist (scripts/test runs the suite in worker processes) each worker has its own
watchdog: it reports the test to the real stderr as above, kills that worker's child processes
(never another worker's) and ends the worker; xdist reports the test as failed ("worker crashed
while running"), starts a new worker and runs the rest, and the run exits non-zero.

Debugging: the limit is off under --pdb and --trace; `--timeout=0` turns it off too.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import io
import os
import threading
from collections.abc import Generator

import pytest

from tests.processes import descendants, kill_and_wait

EXIT_STATUS = 1  # what pytest returns when tests failed
_STDERR_FD = pytest.StashKey[int]()
_FAILURES = pytest.StashKey[list[str]]()  # what the running test already failed with


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--timeout",
        type=float,
        default=None,
        help="seconds one test may take (overrides the ini value; a test's marker wins)",
    )
    parser.addini(
        "timeout",
        "seconds one test (setup + call + teardown) may take before the run is stopped; 0: none",
        default="120",
    )
    parser.addini(
        "timeout_backstop",
        "seconds after the limit at which faulthandler ends the run if the watchdog thread could "
        "not (the stuck code holds the GIL)",
        default="30",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "timeout(seconds): this test's own limit (setup + call + teardown)"
    )
    # Output capture replaces fd 2 while a test runs; the report must reach the real stderr.
    config.stash[_STDERR_FD] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STDERR_FD in config.stash:
        os.close(config.stash[_STDERR_FD])
        del config.stash[_STDERR_FD]


def limit_s(item: pytest.Item) -> float:
    """The test's limit in seconds: its `timeout` marker, else --timeout, else the ini value."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        return float(marker.args[0] if marker.args else marker.kwargs["timeout"])
    option = item.config.getoption("timeout")
    return float(option if option is not None else item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    seconds = limit_s(item)
    debugging = item.config.getoption("usepdb") or item.config.getoption("trace")
    if seconds <= 0 or debugging:
        yield
        return
    stderr_fd = item.config.stash[_STDERR_FD]
    failures = item.stash[_FAILURES] = []
    timer = threading.Timer(seconds, _stop_the_run, (item.nodeid, seconds, stderr_fd, failures))
    timer.name = f"watchdog {item.nodeid}"
    timer.daemon = True
    timer.start()
    backstop_s = float(item.config.getini("timeout_backstop"))
    faulthandler.dump_traceback_later(seconds + backstop_s, exit=True, file=stderr_fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep a failure's report: a teardown that then hangs never lets pytest print it."""
    report = yield
    if report.failed and _FAILURES in item.stash:
        item.stash[_FAILURES].append(f"{report.when}: {report.longreprtext}")
    return report


def _stop_the_run(nodeid: str, seconds: float, stderr_fd: int, failures: list[str]) -> None:
    _write(
        stderr_fd,
        f"\n{'+' * 30} watchdog {'+' * 30}\n"
        f"{nodeid} ran past its {seconds:g} s limit (setup, call and teardown together).\n",
    )
    for failure in failures:
        _write(stderr_fd, f"It had already failed in {failure}\n\n")
    _write(
        stderr_fd,
        "Stacks of every thread and every unfinished asyncio task follow; then every process\n"
        "this run started is killed and the run stops.\n",
    )
    faulthandler.dump_traceback(file=stderr_fd, all_threads=True)
    _write(stderr_fd, _asyncio_tasks_report())
    killed = descendants()
    kill_and_wait(killed)
    _write(stderr_fd, f"killed child processes: {killed or 'none'}\n{'+' * 70}\n")
    os._exit(EXIT_STATUS)


def _write(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, text.encode(errors="replace"))


def _asyncio_tasks_report() -> str:
    """Stacks of unfinished tasks of every loop (read from another thread: best effort)."""
    out = io.StringIO()
    try:
        tasks = [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task)]
        for task in tasks:
            if task.done():
                continue
            out.write(f"\nasyncio task {task!r}\n")
            task.print_stack(file=out)
    except Exception as exc:  # a diagnostic on the way out must never mask the report
        out.write(f"(could not list asyncio tasks: {exc!r})\n")
    return out.getvalue()
