"""A group of gateways on NATS JetStream (cluster mode), end to end on this machine.

Everything is real: a 3-node NATS JetStream cluster (R3 streams) on loopback, `gatewayd run`
member processes, the `Recorder` agent of tests/cluster (SQL insert + `set_state` + an echo
published after the commit). Publishers use JetStream (PubAck = acknowledged); the echo on
`gw.out.<id>` closes the loop.

1. Throughput and latency for 1, 2 and 3 members: closed loop, `--window` messages in flight,
   `--count` messages; end to end = JetStream publish -> partition consumer -> turn ->
   changelog append (R3) -> COMMIT -> echo received. On 2 cores the ratio shows overhead,
   not scaling: the members, the 3 NATS servers and the load generator share the cores.
2. Failover: with 3 members and an open-loop stream to the devices of the victim's partitions,
   SIGKILL the member, time kill -> first echo from those devices arriving 100 ms or more after
   the kill (the new owner serving), then start a replacement member; `--kills` times.
   Each member count runs twice, interleaved: replies durable (the default: outbox rows sent
   through JetStream, deduplicated) and live (`durable_replies = false`: core NATS, at most
   once), the baseline of what durable replies cost.
3. The changelog's cost per commit vs single-box mode, in this process: the same agent runtime
   and workload, once alone (the baseline) and once as a cluster member (every commit
   serialised, diffed and appended to the replicated changelog before it commits).

    python bench/cluster.py                 # short: ~3 min
    python bench/cluster.py --count 5000 --kills 10 --turns 4000   # the recorded run

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats
import nats.errors

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.cluster import ClusterSettings
from gatewayd.cluster.member import ClusterMember
from gatewayd.cluster.naming import partition_of, preferred_owner
from tests.cluster.cluster_agents import Recorder
from tests.cluster.group import GROUP, Group, serving, wait_serving

PARTITIONS = 8
DEVICES = 48
_LOG_COST = re.compile(r"changelog: (\d+) commits, (\d+) bytes, ([0-9.]+) ms per commit")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Echoes:
    """Sends device messages through JetStream and matches their echoes."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.sent_at: dict[str, float] = {}
        self.received: list[tuple[str, float, float]] = []  # (message, sent, received)
        self.room: asyncio.Semaphore | None = None
        self._serial = 0

    async def listen(self) -> None:
        await self.nc.subscribe("gw.out.>", cb=self._on_echo)

    async def _on_echo(self, msg: Any) -> None:
        text = msg.data.decode()
        sent = self.sent_at.pop(text, None)
        if sent is None:
            return
        self.received.append((text, sent, time.perf_counter()))
        if self.room is not None:
            self.room.release()

    async def send(self, device: str) -> None:
        self._serial += 1
        text = f"{device}:{self._serial}"
        self.sent_at[text] = time.perf_counter()
        await self.js.publish(
            f"devices.{device}.telemetry", text.encode(), headers={"Nats-Msg-Id": text}
        )

    async def closed_loop(self, count: int, window: int) -> tuple[float, list[float]]:
        self.room = asyncio.Semaphore(window)
        start_index = len(self.received)
        started = time.perf_counter()
        for index in range(count):
            await self.room.acquire()
            asyncio.get_running_loop().create_task(self.send(f"dev{index % DEVICES}"))
        deadline = time.monotonic() + 120
        while len(self.received) - start_index < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        batch = self.received[start_index:]
        self.room = None
        return len(batch) / elapsed, [(got - sent) * 1000 for _, sent, got in batch]


async def throughput(
    work_dir: Path, members: int, count: int, window: int, *, durable_replies: bool = True
) -> dict[str, Any]:
    mode = "durable" if durable_replies else "live"
    group = Group(
        work_dir / f"members-{members}-{mode}",
        partitions=PARTITIONS,
        durable_replies=durable_replies,
    )
    group.start_nats()
    try:
        for index in range(members):
            group.add_member(f"m{index + 1}")
        nc = await nats.connect(servers=group.urls)
        try:
            await wait_serving(nc, PARTITIONS, set(group.members), timeout_s=60)
            echoes = Echoes(nc)
            await echoes.listen()
            await echoes.closed_loop(min(500, count), window)  # warm up: agents created
            rate, latencies = await echoes.closed_loop(count, window)
        finally:
            await nc.close()
    finally:
        group.stop()
    commits = cost_ms = 0.0
    byte_count = 0
    for member in group.members.values():
        found = _LOG_COST.findall(member.log_text())
        if found:
            n, b, ms = found[-1]
            commits += int(n)
            byte_count += int(b)
            cost_ms += int(n) * float(ms)
    return {
        "members": members,
        "replies": mode,
        "msgs_per_s": round(rate, 1),
        "p50_ms": round(_pct(latencies, 0.5), 2),
        "p99_ms": round(_pct(latencies, 0.99), 2),
        "commits": int(commits),
        "changelog_ms_per_commit": round(cost_ms / max(1, commits), 3),
        "changelog_bytes_per_commit": round(byte_count / max(1, commits)),
    }


async def _settled(nc: nats.NATS, alive: set[str]) -> dict[int, str]:
    """Every partition served by its preferred owner among `alive` (no handover under way;
    with few partitions a member may be preferred for none)."""
    wanted = {p: preferred_owner(p, sorted(alive)) for p in range(PARTITIONS)}
    deadline = time.monotonic() + 60
    while True:
        try:
            owned = await serving(nc, PARTITIONS)
        except nats.errors.Error:
            owned = {}
        if owned == wanted:
            return owned
        if time.monotonic() > deadline:
            raise RuntimeError(f"partitions did not settle: {owned} != {wanted}")
        await asyncio.sleep(0.2)


async def failover(work_dir: Path, kills: int, lease_s: float) -> dict[str, Any]:
    group = Group(work_dir / "failover", partitions=PARTITIONS, lease_s=lease_s)
    group.start_nats()
    times: list[float] = []
    try:
        for index in range(3):
            group.add_member(f"m{index + 1}")
        nc = await nats.connect(servers=group.urls, max_reconnect_attempts=-1)
        try:
            echoes = Echoes(nc)
            await echoes.listen()
            next_name = 4
            for kill in range(kills):
                alive = {n for n, m in group.members.items() if m.process.proc.poll() is None}  # type: ignore[union-attr]
                owned = await _settled(nc, alive)
                holders = sorted(set(owned.values()))  # (a member may be preferred for none)
                victim = holders[kill % len(holders)]
                parts = {p for p, owner in owned.items() if owner == victim}
                devices = [f"dev{i}" for i in range(DEVICES)]
                devices = [d for d in devices if partition_of(d, PARTITIONS) in parts]
                stop = asyncio.Event()

                async def stream(devices: list[str] = devices, stop: asyncio.Event = stop) -> None:
                    index = 0
                    while not stop.is_set():
                        await echoes.send(devices[index % len(devices)])
                        index += 1
                        await asyncio.sleep(0.005)

                sender = asyncio.get_running_loop().create_task(stream())
                await asyncio.sleep(0.5)
                killed_at = time.perf_counter()
                group.members[victim].process.kill()
                seen = len(echoes.received)
                deadline = time.monotonic() + 60
                served = None
                while served is None and time.monotonic() < deadline:
                    for _text, _sent, got in echoes.received[seen:]:
                        if got - killed_at >= 0.1:
                            served = got - killed_at
                            break
                    seen = len(echoes.received) if served is None else seen
                    await asyncio.sleep(0.01)
                stop.set()
                await sender
                if served is not None:
                    times.append(served)
                print(f"  kill {kill + 1}: {victim} ({len(parts)} partitions) -> served again "
                      f"after {served if served is None else round(served, 2)} s", flush=True)  # fmt: skip
                replacement = f"m{next_name}"
                next_name += 1
                group.add_member(replacement)
        finally:
            await nc.close()
    finally:
        group.stop()
    return {
        "kills": kills,
        "served_again": len(times),
        "lease_s": lease_s,
        "p50_s": round(_pct(times, 0.5), 2),
        "p99_s": round(_pct(times, 0.99), 2),
        "max_s": round(max(times), 2) if times else None,
    }


async def _turns(runtime: AgentRuntime, agents: int, turns: int) -> float:
    def record(agent: Any) -> None:
        agent.sql("CREATE TABLE IF NOT EXISTS seen (message TEXT NOT NULL)")
        agent.sql("INSERT INTO seen (message) VALUES (?)", "x" * 40)
        agent.set_state({"count": (agent.state or {}).get("count", 0) + 1})

    async def one_agent(index: int) -> None:
        for _ in range(turns // agents):
            await runtime.run_in_agent("rec", f"dev{index}", record)

    started = time.perf_counter()
    await asyncio.gather(*(one_agent(i) for i in range(agents)))
    return (turns // agents) * agents / (time.perf_counter() - started)


async def changelog_cost(work_dir: Path, turns: int, agents: int = 24) -> dict[str, Any]:
    alone = AgentRuntime(AgentSettings(state_dir=work_dir / "alone"), {"rec": Recorder})
    await alone.start()
    try:
        await _turns(alone, agents, agents * 5)  # warm up
        single_rate = await _turns(alone, agents, turns)
    finally:
        await alone.close()
    group = Group(work_dir / "cost", partitions=PARTITIONS)
    group.start_nats()
    runtime = AgentRuntime(AgentSettings(state_dir=work_dir / "member"), {"rec": Recorder})
    await runtime.start()
    member = ClusterMember(
        ClusterSettings(
            agent_class="rec",
            group=GROUP,
            member="bench",
            servers=tuple(group.urls),
            partitions=PARTITIONS,
            lease_s=3.0,
            heartbeat_s=0.5,
            snapshot_every=10**9,
        ),
        runtime,
        work_dir / "member",
    )
    try:
        await member.start()
        nc = await nats.connect(servers=group.urls)
        try:
            deadline = time.monotonic() + 60
            while len(await serving(nc, PARTITIONS)) < PARTITIONS:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bench member did not take every partition")
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        await _turns(runtime, agents, agents * 5)
        replicator = member.replicator
        commits0, seconds0, bytes0 = replicator.commits, replicator.seconds, replicator.bytes
        cluster_rate = await _turns(runtime, agents, turns)
        commits = replicator.commits - commits0
        per_commit_ms = 1000 * (replicator.seconds - seconds0) / max(1, commits)
        per_commit_bytes = (replicator.bytes - bytes0) / max(1, commits)
    finally:
        await member.stop()
        await runtime.close()
        group.stop()
    return {
        "single_box_turns_per_s": round(single_rate, 1),
        "cluster_turns_per_s": round(cluster_rate, 1),
        "ratio": round(cluster_rate / single_rate, 3),
        "changelog_ms_per_commit": round(per_commit_ms, 3),
        "changelog_bytes_per_commit": round(per_commit_bytes),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1500, help="messages per throughput run")
    parser.add_argument("--window", type=int, default=64, help="messages in flight")
    parser.add_argument("--kills", type=int, default=2, help="member SIGKILLs to time")
    parser.add_argument("--lease-s", type=float, default=3.0, help="cluster.lease for failover")
    parser.add_argument("--turns", type=int, default=1200, help="turns for the changelog cost")
    parser.add_argument("--members", default="1,2,3")
    parser.add_argument(
        "--no-live", action="store_true", help="skip the runs with live (at most once) replies"
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    work_dir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    rows, live_rows = [], []
    for members in [int(m) for m in args.members.split(",")]:
        row = await throughput(work_dir, members, args.count, args.window)
        rows.append(row)
        print(f"  {members} member(s): {row}", flush=True)
        if not args.no_live:  # interleaved: the same load, replies published live
            live = await throughput(
                work_dir, members, args.count, args.window, durable_replies=False
            )
            live_rows.append(live)
            print(f"  {members} member(s), live replies: {live}", flush=True)
    cost = await changelog_cost(work_dir, args.turns)
    print(f"  changelog cost: {cost}", flush=True)
    fail = await failover(work_dir, args.kills, args.lease_s)

    print()
    print("members  replies  msgs/s   p50 ms   p99 ms  changelog ms/commit  bytes/commit")
    for row in rows + live_rows:
        print(
            f"{row['members']:>7} {row['replies']:>8} {row['msgs_per_s']:>7} {row['p50_ms']:>8} "
            f"{row['p99_ms']:>8} {row['changelog_ms_per_commit']:>20} "
            f"{row['changelog_bytes_per_commit']:>13}"
        )
    print(
        f"\nchangelog vs single box (same runtime, {args.turns} turns, 24 agents): "
        f"{cost['cluster_turns_per_s']} vs {cost['single_box_turns_per_s']} turns/s "
        f"(x{cost['ratio']}), {cost['changelog_ms_per_commit']} ms and "
        f"{cost['changelog_bytes_per_commit']} bytes per commit"
    )
    print(
        f"failover (lease {fail['lease_s']} s, {fail['served_again']}/{fail['kills']} kills): "
        f"p50 {fail['p50_s']} s, p99 {fail['p99_s']} s"
    )
    base = next((r for r in rows if r["members"] == 1), rows[0])
    result = {
        "bench": "cluster",
        "members": {str(r["members"]): r for r in rows},
        "ratio_3_vs_1": round(rows[-1]["msgs_per_s"] / base["msgs_per_s"], 3),
        # The baseline of durable replies: the same members with replies published live.
        "live_replies": {str(r["members"]): r for r in live_rows},
        "durable_vs_live": {
            str(d["members"]): round(d["msgs_per_s"] / v["msgs_per_s"], 3)
            for d, v in zip(rows, live_rows, strict=False)
        },
        "changelog": cost,
        "failover": fail,
        "count": args.count,
        "window": args.window,
        "partitions": PARTITIONS,
        "replicas": 3,
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
