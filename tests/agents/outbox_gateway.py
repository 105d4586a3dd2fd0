"""A small gateway process for the outbox crash test: the agent runtime (real SQLite) behind a
real MQTT bridge, with an `echo` agent.

    python -m tests.agents.outbox_gateway --broker-url mqtt://127.0.0.1:PORT --state-dir DIR

Each message on `devices/{id}/telemetry` is answered on `devices/{id}/cmd` with `echo:<msg>`.
A line `poke ID` on stdin makes agent `echo/ID` send `poked` to its MQTT device (a turn of its
own); `POKED ID` is printed once that turn committed. Prints READY once connected.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from protocols.mqtt import MqttBridge, MqttRoute, MqttSettings

ROUTE = MqttRoute("devices/{id}/telemetry", "echo", "devices/{id}/cmd")


class Echo(Agent):
    def on_message(self, conn: Any, message: bytes | str) -> None:
        data = message.encode() if isinstance(message, str) else message
        conn.send(b"echo:" + data)

    @callable()
    def poke(self) -> int:
        conns = self.get_connections()
        for conn in conns:
            conn.send(b"poked")
        return len(conns)


def settings(broker_url: str, **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "broker_urls": (broker_url,),
        "client_id": "gw-outbox",
        "routes": (ROUTE,),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "retry_min_s": 0.01,
        "retry_max_s": 0.05,
    }
    values.update(overrides)
    return MqttSettings(**values)


async def _main(args: argparse.Namespace) -> None:
    runtime = AgentRuntime(AgentSettings(state_dir=args.state_dir), {"echo": Echo})
    await runtime.start()
    bridge = MqttBridge(settings(args.broker_url), runtime)
    await bridge.start()
    await bridge.wait_connected(timeout_s=10)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := (await reader.readline()).decode().split():
            if line[0] == "poke":
                sent = await runtime.call("echo", line[1], "poke")
                print(f"POKED {line[1]} {sent}", flush=True)

    task = asyncio.create_task(commands())
    await stopped.wait()
    task.cancel()
    await bridge.stop(drain_timeout_s=5)
    await runtime.drain(5)
    await runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--state-dir", required=True)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
