"""No fsync on the event loop: a real daemon with `durability = "full"` under strace. Every
fsync/fdatasync it makes while serving RPCs (agent commits, the schedule index, WAL
checkpoints, start-up and shut-down) must come from a worker thread, never from the main
thread that runs the event loop."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.brokers import free_port
from tests.gatewayd.daemon_process import REPO
from tests.gatewayd.notify import NotifySocket

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[gateway]
state_dir = "state"
drain_timeout = "5s"
[http]
enabled = false
[agents]
python_path = ["{repo}"]
durability = "full"
[agents.classes.planner]
class = "tests.gatewayd.lifecycle_agents:Planner"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[mqtt]
enabled = false
"""

STRACE = ("strace", "-f", "-e", "trace=fsync,fdatasync")
SYNC_CALL = re.compile(r"^(\d+)\s+(fsync|fdatasync)\(")


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="needs strace with ptrace permitted")
async def test_no_fsync_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    ws_port = free_port()
    config = tmp_path / "gatewayd.toml"
    config.write_text(CONFIG.format(repo=REPO, ws_port=ws_port))
    trace = tmp_path / "sync-calls.strace"
    notify = NotifySocket(tmp_path)
    env = {**os.environ, **notify.env, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen(
            [*STRACE, "-o", str(trace), sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        notify.wait_for("READY", "1", timeout_s=60)
        async with ws_connect(f"ws://127.0.0.1:{ws_port}/agents/planner/p1") as ws:
            for n in range(5):
                await ws.send(
                    json.dumps({"type": "gw.rpc", "id": n, "method": "plan", "args": [n]})
                )
                while True:
                    reply = json.loads(await ws.recv())
                    if reply["type"] == "gw.rpc_result":
                        break
                assert reply == {
                    "type": "gw.rpc_result",
                    "id": str(n),
                    "ok": True,
                    "done": True,
                    "result": n,
                }
        # The daemon's pid is its main thread's id: the thread that runs the event loop.
        loop_thread = int((tmp_path / "state" / "gatewayd.lock").read_text())
        os.kill(loop_thread, signal.SIGTERM)  # the daemon, not strace (which would detach)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()

    calls = [SYNC_CALL.match(line) for line in trace.read_text().splitlines()]
    by_thread = [(int(m.group(1)), m.group(2)) for m in calls if m]
    # The test means something only if the daemon did fsync (5 durable commits at least).
    assert len(by_thread) >= 5, trace.read_text()[-2000:]
    on_loop = [call for tid, call in by_thread if tid == loop_thread]
    assert on_loop == [], f"{len(on_loop)} fsync calls on the event loop thread"
