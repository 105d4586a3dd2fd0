"""The blocking client and the `gatewayd agent` verbs against a real daemon, and the client
package's promise to import nothing of the daemon."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gatewayd.client import MethodNotFoundError, SyncAgentClient, SyncChatClient
from gatewayd.client.errors import rpc_error
from tests.client.daemon import Gateway
from tests.gatewayd.daemon_process import REPO


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", "agent", *args, "--url", gateway.ws_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_sync_client_and_cli_verbs_call_state_set_state_and_watch(gateway: Gateway) -> None:
    with SyncAgentClient(gateway.ws_url, "thermostat", "thermo-1") as agent:
        assert agent.call("set_target", 22) == 22.0
        agent.send_message('{"temp": 19.5}')
        state = agent.wait_for_state(lambda s: s["readings"] == 1, 10)
        assert state["temp"] == 19.5 and state["heating"] is True
        chunks = list(agent.stream("history", 5))
        assert [c["temp"] for c in chunks] == [19.5]
        with pytest.raises(MethodNotFoundError):
            agent.call("nope")

        done = cli(gateway, "call", "thermostat", "thermo-1", "set_target", "23")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "23.0"
        agent.wait_for_state(lambda s: s["target"] == 23.0, 10)  # the CLI's change, synced

    streamed = cli(gateway, "call", "thermostat", "thermo-1", "history", "3")
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert streamed.returncode == 0 and lines[0]["temp"] == 19.5 and lines[-1] == 1

    shown = cli(gateway, "state", "thermostat", "thermo-1")
    assert shown.returncode == 0 and json.loads(shown.stdout)["target"] == 23.0

    refused = cli(gateway, "set-state", "thermostat", "thermo-1", '{"target": 99}')
    assert refused.returncode == 1 and "refused" in refused.stderr

    failed = cli(gateway, "call", "thermostat", "thermo-1", "nope")
    assert failed.returncode == 1 and "has no method 'nope'" in failed.stderr

    watch_prints_each_change(gateway)

    with SyncChatClient(gateway.ws_url, "chat", "c-1") as chat:
        answer = chat.send("hello there")
        assert answer.status == "complete" and answer.text == "echo: hello there"
        assert [m["role"] for m in chat.get_messages()] == ["user", "assistant"]


def watch_prints_each_change(gateway: Gateway) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "agent", "watch", "thermostat", "w-1", "--count", "1",
         "--url", gateway.ws_url],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())  # the current state, once connected
        assert first["target"] == 21.0
        with SyncAgentClient(gateway.ws_url, "thermostat", "w-1") as agent:
            agent.call("set_target", 25)
        assert json.loads(watcher.stdout.readline())["target"] == 25.0
        assert watcher.wait(timeout=30) == 0
    finally:
        watcher.kill()
        watcher.wait()


def test_the_client_imports_nothing_of_the_daemon() -> None:
    code = (
        "import sys, gatewayd.client, gatewayd.client.cli\n"
        "heavy = ('gatewayd.agents', 'gatewayd.api', 'gatewayd.chat', 'engine', 'protocols',"
        " 'numpy', 'pydantic', 'prometheus_client', 'starlette')\n"
        "print([m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize(
    ("text", "kind", "remote"),
    [
        ("message failed: RpcError: agent t has no method 'x'", "MethodNotFoundError", "RpcError"),
        ("message failed: RpcError: bad arguments for f(a): too many", "BadArgumentsError", "RpcError"),
        ("message failed: TurnTimeoutError: turn took 30 s", "CallTimeoutError", "TurnTimeoutError"),
        ("message failed: ReadonlyConnectionError: read-only", "ReadOnlyError", "ReadonlyConnectionError"),
        ("message failed: ValueError: boom", "RemoteError", "ValueError"),
        ("something else", "RemoteError", ""),
    ],
)  # fmt: skip
def test_rpc_error_texts_map_to_typed_errors(text: str, kind: str, remote: str) -> None:
    err = rpc_error("f", text)
    assert type(err).__name__ == kind and err.remote_type == remote and err.method == "f"
