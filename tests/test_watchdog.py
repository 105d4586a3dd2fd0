"""The per-test limit (tests/watchdog.py) ends a stuck run, says why, and leaves no process behind;
the conftest guard fails a test that leaves a process running.

Each case runs pytest in a subprocess with the project's own configuration (pyproject.toml) on a
small test file that hangs in a known way, under a 3 s limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 3
BOUND_S = 60  # limit + start-up (xdist workers too) on a loaded 2-core machine, widely

HANGS_IN_THE_BODY = """
import subprocess, threading
from pathlib import Path

def test_hangs_holding_a_child(tmp_path):
    child = subprocess.Popen(["sleep", "600"])
    Path({pid_file!r}).write_text(str(child.pid))
    threading.Event().wait()  # never set
"""

# The hang observed in test_end_to_end: the test fails, then pytest-asyncio's teardown waits
# forever for a task that swallows its cancellation (what Python 3.11's wait_for can do).
HANGS_IN_TEARDOWN_AFTER_A_FAILURE = """
import asyncio

async def swallows_its_cancellation():
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass

async def test_fails_then_hangs_in_teardown():
    asyncio.get_running_loop().create_task(swallows_its_cancellation())
    await asyncio.sleep(0)
    assert False, "the test fails first"
"""


def run_pytest(test_file: Path, *extra: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir",
         str(REPO), "-p", "no:cacheprovider", "-o", f"timeout={LIMIT_S}", *extra, str(test_file)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=BOUND_S,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_hung_test_is_stopped_with_its_stack_and_its_child_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    test_file = tmp_path / "test_hangs.py"
    test_file.write_text(HANGS_IN_THE_BODY.format(pid_file=str(pid_file)))

    rc, output, elapsed = run_pytest(test_file)

    assert rc == 1, output
    assert elapsed >= LIMIT_S
    assert "test_hangs_holding_a_child ran past its 3 s limit" in output, output
    assert "in test_hangs_holding_a_child" in output, "the stuck frame is in the traceback"
    child = int(pid_file.read_text())
    assert not alive(child), f"the test's child process {child} outlived the run"


def test_a_teardown_that_hangs_after_a_failure_is_stopped_too(tmp_path: Path) -> None:
    test_file = tmp_path / "test_teardown_hangs.py"
    test_file.write_text(HANGS_IN_TEARDOWN_AFTER_A_FAILURE)

    rc, output, _ = run_pytest(test_file)

    assert rc == 1, output
    assert "ran past its 3 s limit" in output, output
    assert "the test fails first" in output, "the failure that came before is not lost"
    assert "_cancel_all_tasks" in output, "the main thread's stack shows where teardown waits"
    assert "swallows_its_cancellation" in output, "the stuck asyncio task is named"


def test_a_test_that_holds_the_gil_is_stopped_by_the_backstop(tmp_path: Path) -> None:
    test_file = tmp_path / "test_gil.py"
    # ctypes.PyDLL keeps the GIL while the C function runs: no Python thread can run.
    test_file.write_text(
        "import ctypes\ndef test_holds_the_gil():\n    ctypes.PyDLL(None).sleep(600)\n"
    )

    rc, output, elapsed = run_pytest(test_file, "-o", "timeout_backstop=2")

    assert rc == 1, output
    assert elapsed >= LIMIT_S + 2
    assert "Timeout (0:00:05)!" in output, output  # faulthandler's own header
    assert "in test_holds_the_gil" in output


def test_the_timeout_marker_sets_a_tests_own_limit(tmp_path: Path) -> None:
    test_file = tmp_path / "test_marked.py"
    test_file.write_text(
        "import threading, pytest\n"
        "@pytest.mark.timeout(1)\n"
        "def test_marked():\n"
        "    threading.Event().wait()\n"
    )

    rc, output, _ = run_pytest(test_file, "--timeout=600")

    assert rc == 1, output
    assert "test_marked ran past its 1 s limit" in output, output


def test_the_limit_is_per_test_not_for_the_whole_run(tmp_path: Path) -> None:
    test_file = tmp_path / "test_slow.py"
    test_file.write_text(
        "import time, pytest\n"
        "@pytest.mark.parametrize('n', range(3))\n"
        "def test_slow(n):\n"
        "    time.sleep(1.5)  # the workload: together longer than one test's limit\n"
    )

    rc, output, elapsed = run_pytest(test_file)

    assert rc == 0, output
    assert elapsed > LIMIT_S
    assert "watchdog" not in output


def test_a_process_left_running_by_a_test_is_killed_and_fails_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    test_file = tmp_path / "test_leaks.py"
    test_file.write_text(
        "import subprocess\n"
        "from pathlib import Path\n"
        "def test_leaks_a_child():\n"
        "    child = subprocess.Popen(['sleep', '600'])\n"
        f"    Path({str(pid_file)!r}).write_text(str(child.pid))\n"
    )

    # tests/conftest.py (the guard) applies to files under tests/ only: load it by name.
    rc, output, _ = run_pytest(test_file, "-p", "tests.conftest")

    assert rc == 1, output
    assert "processes left running by this test, now killed" in output, output
    assert "sleep 600" in output
    assert not alive(int(pid_file.read_text()))


def test_under_xdist_a_hung_test_fails_its_worker_and_the_others_run(tmp_path: Path) -> None:
    """scripts/test runs the suite in pytest-xdist workers: the watchdog of the worker that
    runs the stuck test reports it and kills that worker's children, the worker's crash
    fails the run, and the other tests still run."""
    pid_file = tmp_path / "child.pid"
    test_file = tmp_path / "test_hangs_in_a_worker.py"
    test_file.write_text(
        HANGS_IN_THE_BODY.format(pid_file=str(pid_file)) + "\n\ndef test_passes():\n    pass\n"
    )

    rc, output, _ = run_pytest(test_file, "-n", "2")

    assert rc == 1, output
    assert "test_hangs_holding_a_child ran past its 3 s limit" in output, output
    assert "in test_hangs_holding_a_child" in output, "the stuck frame is in the traceback"
    assert "crashed while running" in output and "test_hangs_holding_a_child" in output
    assert "1 failed, 1 passed" in output, output
    assert not alive(int(pid_file.read_text()))
