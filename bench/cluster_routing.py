"""What relaying costs: a WebSocket client's RPC round trip straight to the agent's owner (the
baseline) vs through a member that does not own the agent (relayed to the owner), and an MCP
`agent_call` through the owner's API vs through the other member's (forwarded over NATS).

Everything is real: a 3-node NATS JetStream cluster on loopback, two `gatewayd run` members
serving WebSocket and the HTTP API, the `Tally` agent of tests/cluster (each `add` is a turn
whose commit is appended to the replicated changelog first, so a round trip includes it).
Repeats are interleaved (direct, relayed, direct, ...), medians reported.

    python bench/cluster_routing.py              # ~1 min
    python bench/cluster_routing.py --calls 400

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats

from gatewayd.client import AgentClient
from tests.cluster.group import API_TOKEN, Group, addresses, wait_settled
from tests.cluster.test_routing import _agent_owned_by, _start, routing_config
from tests.mcp.conftest import mcp_client


class _Token:
    secret = API_TOKEN


async def _ws_round_trips(client: AgentClient, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.call("add", 1)
        times.append(time.perf_counter() - started)
    return times


async def _mcp_round_trips(url: str, agent: str, calls: int) -> list[float]:
    times = []
    async with mcp_client(url, _Token()) as client:  # type: ignore[arg-type]
        for _ in range(calls):
            started = time.perf_counter()
            result = await client.call_tool(
                "agent_call",
                {"agent_class": "tally", "agent_id": agent, "method": "add", "args": {"n": 1}},
            )
            assert not result.is_error, result
            times.append(time.perf_counter() - started)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150, help="calls per repeat and path")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="gw-routing-"))
    group = Group(work_dir, clients=True, extra_config=routing_config(work_dir))
    try:
        _start(group, ["m1", "m2"])
        nc = await nats.connect(servers=group.urls)
        await wait_settled(nc, group.partitions, {"m1", "m2"}, timeout_s=60)
        while not all({"ws", "api"} <= set(a) for a in (await addresses(nc)).values()):
            await asyncio.sleep(0.1)
        urls = await addresses(nc)
        await nc.close()
        agent = _agent_owned_by("m2", ["m1", "m2"], group.partitions, "bench")
        samples: dict[str, list[float]] = {k: [] for k in ("ws_direct", "ws_relayed")}
        samples.update({"mcp_owner": [], "mcp_forwarded": []})
        async with (
            AgentClient(urls["m2"]["ws"], "tally", agent) as direct,
            AgentClient(urls["m1"]["ws"], "tally", agent) as relayed,
        ):
            await _ws_round_trips(direct, 20)  # warm-up
            await _ws_round_trips(relayed, 20)
            for _ in range(args.repeats):
                samples["ws_direct"] += await _ws_round_trips(direct, args.calls)
                samples["ws_relayed"] += await _ws_round_trips(relayed, args.calls)
                samples["mcp_owner"] += await _mcp_round_trips(
                    f"{urls['m2']['api']}/mcp", agent, args.calls // 3
                )
                samples["mcp_forwarded"] += await _mcp_round_trips(
                    f"{urls['m1']['api']}/mcp", agent, args.calls // 3
                )
    finally:
        group.stop()

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    rows = {name: (statistics.median(v) * 1000, ms(v, 0.99)) for name, v in samples.items()}
    print(f"{'path':<16}{'p50 ms':>10}{'p99 ms':>10}")
    for name, (p50, p99) in rows.items():
        print(f"{name:<16}{p50:>10.2f}{p99:>10.2f}")
    result: dict[str, Any] = {
        "bench": "cluster_routing",
        "calls": {name: len(v) for name, v in samples.items()},
        **{f"{name}_p50_ms": round(p50, 3) for name, (p50, _) in rows.items()},
        **{f"{name}_p99_ms": round(p99, 3) for name, (_, p99) in rows.items()},
        "ws_relay_added_p50_ms": round(rows["ws_relayed"][0] - rows["ws_direct"][0], 3),
        "ws_relayed_vs_direct": round(rows["ws_relayed"][0] / rows["ws_direct"][0], 3),
        "mcp_forwarded_vs_owner": round(rows["mcp_forwarded"][0] / rows["mcp_owner"][0], 3),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
