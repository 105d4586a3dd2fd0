"""Agent runtime benchmark: cost per turn, wake latency, memory — each against a baseline.

    python bench/agents.py                 # a few minutes on 2 cores
    python bench/agents.py --quick         # smoke run (seconds)
    python bench/agents.py --turn-cost-only --repeats 3
    python bench/agents.py --wake-only --wake-agents 1000
    python bench/agents.py --hibernated 20000 --duration-s 2

Turn cost (`--turn-cost-only`): the durable turns of the transports' agents, in process (no
broker, no sockets): "echo" is bench/gateway_agents.py's TelemetryEcho (SQL insert +
set_state + a reply through the durable outbox, as over MQTT; the reply is reported delivered
on the next loop iteration and its row deleted in a later transaction), "frames" is
FrameCounter with a TCP-style DedupKey (insert + set_state + exactly-once seq, no reply).
Load: `--turn-agents` agents (20, like the MQTT real-client harness), closed loop, "paced" =
one event in flight per agent (every turn its own commit: the latency case), "burst" = 32 in
flight per agent (turns share commits). Baseline, same run, interleaved: raw `sqlite3` doing
the same writes per turn (BEGIN, the insert, the state upsert with json.dumps, the outbox
row and the delete of the previous one, or the dedup upsert; COMMIT) with the same pragmas
and the same number of turns per commit, synchronously: the floor of any durable agent
runtime. Reported: turns/s, process CPU µs per turn (`time.process_time`, all threads; the
gatewayd side includes the driver's submit/await, what a transport does), SQL statements per
turn (a trace callback on every agent's connection, counted in a separate pass).

Wake latency (`--wake-only`): `--wake-agents` hibernated agents (database closed, not parked)
woken one after the other by a call, each followed by the floor on another hibernated agent's
file: a bare sqlite3 open + state read + INSERT + COMMIT (same files, same moment); then wakes
right after hibernation (parked connection) and the same call on an awake agent. The garbage
collector is set up as the daemon sets it once started (gctuning.py) unless `--gc-default`.

The older throughput comparison (`--agents`) against one aiosqlite connection per agent
needs the `bench` extra (aiosqlite). Memory figures come from a fresh subprocess.
Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gateway_agents import FrameCounter, TelemetryEcho
from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from gatewayd.agents.storage import CHECKPOINT_AFTER_COMMITS
from protocols.link import DedupKey, DeliveredCallback, OutputAddress, Route

PAYLOAD = b"\x01" * 32
TOTAL_WINDOW = 20_000  # events in flight over all agents
MAX_AGENT_WINDOW = 256
_GC_DEFAULTS = gc.get_threshold()


class BenchAgent(Agent):
    initial_state: ClassVar[dict[str, int]] = {"n": 0}

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, v BLOB)")

    def on_message(self, conn: Any, message: bytes | str) -> None:
        self.sql("INSERT INTO r (v) VALUES (?)", message)
        self.set_state({"n": self.state["n"] + 1})

    @callable
    def touch(self) -> int:
        self.sql("INSERT INTO r (v) VALUES (?)", PAYLOAD)
        self.set_state({"n": self.state["n"] + 1})
        return self.state["n"]


class BenchLink:
    """In-process transport session (what MQTT/TCP/WS hand to the runtime)."""

    def __init__(self, agent_id: str) -> None:
        self.route = Route("bench", agent_id)
        self.link_id = f"bench-{agent_id}"
        self.transport = "tcp"
        self.remote = "bench"

    def send(self, data: bytes | str) -> None:
        pass

    def close(self, code: int = 1000, reason: str = "") -> None:
        pass


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def drive_for(deadline: float, submit: Any, window: int) -> int:
    pending: deque[asyncio.Future[Any]] = deque()
    done = 0
    while time.perf_counter() < deadline:
        pending.append(submit())
        if len(pending) >= window:
            await pending.popleft()
            done += 1
    while pending:
        await pending.popleft()
        done += 1
    return done


async def gatewayd_turns(state_dir: Path, agents: int, durability: str, duration_s: float) -> dict:
    runtime = AgentRuntime(
        AgentSettings(state_dir=state_dir, durability=durability, hibernate_after_s=600),
        {"bench": BenchAgent},
    )
    await runtime.start()
    links = [BenchLink(f"a{i}") for i in range(agents)]
    await asyncio.gather(*(runtime.open_link(link, {}) for link in links))
    window = max(1, min(MAX_AGENT_WINDOW, TOTAL_WINDOW // agents))
    before = runtime.stats()
    started = time.perf_counter()
    deadline = started + duration_s
    counts = await asyncio.gather(
        *(
            drive_for(deadline, lambda link=link: runtime.submit_message(link, PAYLOAD), window)
            for link in links
        )
    )
    elapsed = time.perf_counter() - started
    after = runtime.stats()
    await runtime.close()
    turns = sum(counts)
    commits = after["commits_total"] - before["commits_total"]
    return {
        "turns_per_s": turns / elapsed,
        "turns_per_commit": turns / max(1, commits),
        "window": window,
    }


async def naive_turns(state_dir: Path, agents: int, durability: str, duration_s: float) -> dict:
    import aiosqlite  # the bench extra

    state_dir.mkdir(parents=True, exist_ok=True)
    conns = []
    for i in range(agents):
        db = await aiosqlite.connect(state_dir / f"a{i}.sqlite3")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        await db.execute("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, v BLOB)")
        await db.commit()
        conns.append(db)

    async def one_agent(db: aiosqlite.Connection, deadline: float) -> int:
        done = 0
        while time.perf_counter() < deadline:
            await db.execute("INSERT INTO r (v) VALUES (?)", (PAYLOAD,))
            await db.commit()
            done += 1
        return done

    started = time.perf_counter()
    counts = await asyncio.gather(*(one_agent(db, started + duration_s) for db in conns))
    elapsed = time.perf_counter() - started
    for db in conns:
        await db.close()
    return {"turns_per_s": sum(counts) / elapsed}


# -- turn cost: durable transport turns vs raw sqlite3 doing the same writes ------------------

BURST_WINDOW = 32


class InstantOutputs:
    """A `DurableOutputs` transport that delivers each output on the next loop iteration."""

    transport = "mqtt"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        self._loop.call_soon(on_delivered, seq)


class DurableLink(BenchLink):
    """A device session whose outputs are durable (what the MQTT bridge hands the runtime)."""

    def __init__(self, agent_class: str, agent_id: str, outputs: InstantOutputs) -> None:
        super().__init__(agent_id)
        self.route = Route(agent_class, agent_id)
        self.transport = "mqtt"
        self.output_address = OutputAddress("mqtt", f"dev/{agent_id}/down", 1)
        self.outputs = outputs


async def gatewayd_turn_cost(
    state_dir: Path, kind: str, agents: int, window: int, duration_s: float
) -> dict[str, float]:
    runtime = AgentRuntime(
        AgentSettings(state_dir=state_dir, hibernate_after_s=600),
        {"echo": TelemetryEcho, "frames": FrameCounter},
    )
    await runtime.start()
    outputs = InstantOutputs(asyncio.get_running_loop())
    runtime.attach_outputs(outputs)  # type: ignore[arg-type]
    links = [DurableLink(kind, f"d{i}", outputs) for i in range(agents)]
    await asyncio.gather(*(runtime.open_link(link, {}) for link in links))
    seqs = dict.fromkeys(range(agents), 0)

    def submit(i: int) -> Any:
        link = links[i]
        if kind == "frames":
            seqs[i] += 1
            return runtime.submit_message(link, PAYLOAD, DedupKey(link.link_id, seqs[i], 0))
        return runtime.submit_message(link, PAYLOAD)

    async def drive(seconds: float) -> tuple[int, float, float]:
        deadline = time.perf_counter() + seconds
        cpu, wall = time.process_time(), time.perf_counter()
        counts = await asyncio.gather(
            *(drive_for(deadline, functools.partial(submit, i), window) for i in range(agents))
        )
        return sum(counts), time.process_time() - cpu, time.perf_counter() - wall

    await drive(min(0.3, duration_s))  # warm-up: agents awake, tables created
    commits = runtime.stats()["commits_total"]
    turns, cpu_s, wall_s = await drive(duration_s)
    commits = runtime.stats()["commits_total"] - commits
    # Statements per turn, in a pass of its own (the trace callback costs CPU).
    statements = [0]

    def count(_statement: str) -> None:
        statements[0] += 1

    for slot in runtime._scheduler.slots.values():
        if slot.db is not None:
            slot.db.connection.set_trace_callback(count)
    traced, _cpu, _wall = await drive(min(0.5, duration_s))
    for slot in runtime._scheduler.slots.values():
        if slot.db is not None:
            slot.db.connection.set_trace_callback(None)
    await runtime.close()
    return {
        "turns_per_s": turns / wall_s,
        "cpu_us_per_turn": cpu_s / turns * 1e6,
        "turns_per_commit": turns / max(1, commits),
        "statements_per_turn": statements[0] / max(1, traced),
    }


def raw_turn_cost(
    state_dir: Path, kind: str, agents: int, turns_per_commit: float, duration_s: float
) -> dict[str, float]:
    """The same writes with raw sqlite3, synchronously, round robin over the agents' files."""
    state_dir.mkdir(parents=True, exist_ok=True)
    conns = []
    for i in range(agents):
        conn = sqlite3.connect(state_dir / f"a{i}.sqlite3", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA cache_size=-256")
        conn.execute("CREATE TABLE readings (n INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        conn.execute("CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 0), json TEXT)")
        conn.execute("CREATE TABLE dedup (stream TEXT PRIMARY KEY, last_seq INTEGER NOT NULL)")
        conn.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, transport TEXT NOT "
            "NULL, target TEXT NOT NULL, qos INTEGER NOT NULL, payload BLOB NOT NULL)"
        )
        conns.append(conn)
    per_commit = max(1, round(turns_per_commit))
    state = [{"readings": 0, "last": None} for _ in range(agents)]
    delivered: list[list[int]] = [[] for _ in range(agents)]
    seq = [0] * agents
    commits = [0] * agents
    turns = 0
    cpu, wall = time.process_time(), time.perf_counter()
    deadline = wall + duration_s
    while time.perf_counter() < deadline:
        for i, conn in enumerate(conns):
            conn.execute("BEGIN")
            if delivered[i]:  # the replies of the previous commit, delivered in order
                conn.execute(
                    "DELETE FROM outbox WHERE seq BETWEEN ? AND ?",
                    (delivered[i][0], delivered[i][-1]),
                )
                delivered[i] = []
            for _ in range(per_commit):
                if kind == "frames":
                    conn.execute("INSERT INTO readings (body) VALUES (?)", (len(PAYLOAD),))
                else:
                    conn.execute("INSERT INTO readings (body) VALUES (?)", (PAYLOAD,))
                new = {"readings": state[i]["readings"] + 1, "last": len(PAYLOAD)}
                conn.execute(
                    "INSERT INTO state (id, json) VALUES (0, ?) "
                    "ON CONFLICT (id) DO UPDATE SET json = excluded.json",
                    (json.dumps(new, separators=(",", ":"), ensure_ascii=False),),
                )
                state[i] = new
                if kind == "frames":
                    seq[i] += 1
                    conn.execute(
                        "INSERT INTO dedup (stream, last_seq) VALUES (?, ?) "
                        "ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq",
                        (f"d{i}", seq[i]),
                    )
                else:
                    cursor = conn.execute(
                        "INSERT INTO outbox (transport, target, qos, payload) VALUES (?, ?, ?, ?)",
                        ("mqtt", f"dev/d{i}/down", 1, PAYLOAD),
                    )
                    assert cursor.lastrowid is not None
                    delivered[i].append(cursor.lastrowid)
                turns += 1
            conn.execute("COMMIT")
            commits[i] += 1
            if commits[i] % CHECKPOINT_AFTER_COMMITS == 0:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
    for conn in conns:
        conn.close()
    # Per turn: the insert, the state upsert, the outbox row or the dedup upsert; per commit:
    # BEGIN, COMMIT and (echo) the delete of the delivered rows.
    statements = 3 + (3 if kind == "echo" else 2) / per_commit
    return {
        "turns_per_s": turns / wall_s,
        "cpu_us_per_turn": cpu_s / turns * 1e6,
        "turns_per_commit": per_commit,
        "statements_per_turn": statements,
    }


async def turn_cost(root: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Interleaved repeats of (gatewayd, raw) per case; medians and ratios."""
    cases = [
        (kind, shape, window)
        for kind in ("echo", "frames")
        for shape, window in (("paced", 1), ("burst", BURST_WINDOW))
    ]
    samples: dict[str, dict[str, list[float]]] = {}
    for repeat in range(opts.repeats):
        for kind, shape, window in cases:
            name = f"{kind}_{shape}"
            ours = await gatewayd_turn_cost(
                root / f"tc-g-{name}-{repeat}", kind, opts.turn_agents, window, opts.duration_s
            )
            raw = raw_turn_cost(
                root / f"tc-r-{name}-{repeat}",
                kind,
                opts.turn_agents,
                ours["turns_per_commit"],
                opts.duration_s,
            )
            shutil.rmtree(root / f"tc-g-{name}-{repeat}", ignore_errors=True)
            shutil.rmtree(root / f"tc-r-{name}-{repeat}", ignore_errors=True)
            case = samples.setdefault(name, {})
            for side, result in (("gatewayd", ours), ("raw", raw)):
                for key, value in result.items():
                    case.setdefault(f"{side}_{key}", []).append(value)
    out: dict[str, Any] = {}
    for name, case in samples.items():
        row = {key: round(statistics.median(values), 2) for key, values in case.items()}
        row["cpu_ratio"] = round(row["gatewayd_cpu_us_per_turn"] / row["raw_cpu_us_per_turn"], 2)
        row["throughput_ratio"] = round(row["gatewayd_turns_per_s"] / row["raw_turns_per_s"], 2)
        out[name] = row
    return out


def print_turn_cost(table: dict[str, Any], agents: int, repeats: int) -> None:
    print(
        f"turn cost, {agents} agents, medians of {repeats} interleaved repeats "
        "(raw = sqlite3 doing the same writes, same turns per commit)"
    )
    header = ("case", "turns/s", "raw/s", "CPU us/turn", "raw us", "ratio", "stmts/turn", "raw")
    print("{:<13} {:>8} {:>8} {:>11} {:>7} {:>6} {:>10} {:>5}".format(*header))
    for name, row in table.items():
        print(
            f"{name:<13} {row['gatewayd_turns_per_s']:>8.0f} {row['raw_turns_per_s']:>8.0f} "
            f"{row['gatewayd_cpu_us_per_turn']:>11.1f} {row['raw_cpu_us_per_turn']:>7.1f} "
            f"{row['cpu_ratio']:>6.2f} {row['gatewayd_statements_per_turn']:>10.2f} "
            f"{row['raw_statements_per_turn']:>5.2f}"
        )


def _state_query(path: str) -> str:
    """How the state is read in the agent files of the gatewayd under test (schema version 2
    keeps it in `_gw_turn_rows`, version 1 in `_gw_state`)."""
    first = sqlite3.connect(path)
    try:
        tables = {row[0] for row in first.execute("SELECT name FROM sqlite_master")}
    finally:
        first.close()
    if "_gw_turn_rows" in tables:
        return "SELECT value FROM _gw_turn_rows WHERE id = 0"
    return "SELECT json FROM _gw_state WHERE id = 0"


def _plain_wake(path: str, state_query: str) -> tuple[float, sqlite3.Connection]:
    """The floor of a cold wake: a bare sqlite3 open + read of the state + one INSERT and
    COMMIT (synchronous=NORMAL) on the loop thread, no runtime, no executor hop, no agent.
    The connection is returned open (closed after the timed loop: its close checkpoints)."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(state_query).fetchone()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO r (v) VALUES (?)", (PAYLOAD,))
    conn.execute("COMMIT")
    return time.perf_counter() - started, conn


def _raise_fd_limit(wanted: int) -> bool:
    """Whether this process may hold `wanted` file descriptors (raising its soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return True
    if hard != resource.RLIM_INFINITY and hard < wanted:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return True


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)]


async def wake_latency(state_dir: Path, agents: int, *, gc_tuned: bool = True) -> dict:
    """Cold wakes (hibernated, database closed) of `agents` agents one after the other,
    each followed by the plain-sqlite floor on another hibernated agent's file (same files,
    same moment, so the same load); then wakes right after hibernation (parked connection)
    and calls on awake agents. With `gc_tuned`, the garbage collector is set up as the
    daemon does once it started (gctuning.py: no automatic full collections)."""
    from gatewayd import gctuning
    from gatewayd.agents.storage import agent_db_file

    # 3 descriptors per open database: 2 * `agents` awake, then `agents` plain ones kept open
    # (else closed at once, which checkpoints between the wakes).
    keep_open = _raise_fd_limit(9 * agents + 256)
    runtime = AgentRuntime(AgentSettings(state_dir=state_dir), {"bench": BenchAgent})
    await runtime.start()
    if gc_tuned:
        gctuning.tune_for_serving()
    for start in range(0, 2 * agents, 500):
        await asyncio.gather(
            *(
                runtime.call("bench", f"w{i}", "touch")
                for i in range(start, min(2 * agents, start + 500))
            )
        )
    scheduler = runtime._scheduler
    runtime.hibernate_idle()
    while runtime.stats()["active_agents"] or scheduler.closing:  # closes (checkpoints) done
        await asyncio.sleep(0.05)
    scheduler.close_parked_before(float("inf"))  # cold: none of them parked
    while scheduler.closing:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # and the idle sweeper's memory trim
    warm_before = runtime.stats().get("warm_opens_total", 0)
    state_query = _state_query(agent_db_file(str(state_dir), "bench", "w1"))
    latencies, plain = [], []
    # CPU time of the loop thread (the wakes here open on the loop: `warm_opens`), which a
    # loaded machine inflates less than the wall clock.
    cpu, plain_cpu = [], []
    plain_conns = []
    for i in range(agents):
        cpu_started = time.thread_time()
        started = time.perf_counter()
        await runtime.call("bench", f"w{2 * i}", "touch")
        latencies.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - cpu_started)
        path = agent_db_file(str(state_dir), "bench", f"w{2 * i + 1}")
        cpu_started = time.thread_time()
        elapsed, conn = _plain_wake(path, state_query)
        plain_cpu.append(time.thread_time() - cpu_started)
        plain.append(elapsed)
        if keep_open:
            plain_conns.append(conn)
        else:
            conn.close()
    warm_opens = runtime.stats().get("warm_opens_total", 0) - warm_before
    for conn in plain_conns:
        conn.close()
    # Wakes of agents that hibernated a moment ago, each on its parked connection (the
    # scheduler keeps the most recent ones open), and the same call on an awake agent.
    runtime.hibernate_idle()
    await asyncio.gather(*list(scheduler.closing.values()))
    parked, awake = [], []
    for i in range(min(agents, 500)):
        await runtime.call("bench", f"w{2 * i}", "touch")
        started = time.perf_counter()
        await runtime.call("bench", f"w{2 * i}", "touch")
        awake.append(time.perf_counter() - started)
        runtime.hibernate_idle()
        await asyncio.gather(*list(scheduler.closing.values()))
        started = time.perf_counter()
        await runtime.call("bench", f"w{2 * i}", "touch")
        parked.append(time.perf_counter() - started)
        runtime.hibernate_idle()
        await asyncio.gather(*list(scheduler.closing.values()))
    parked_wakes = runtime.stats().get("parked_wakes_total", 0)
    await runtime.close()
    if gc_tuned:
        gc.unfreeze()
        gc.set_threshold(*_GC_DEFAULTS)
    return {
        "wake_p50_ms": statistics.median(latencies) * 1e3,
        "wake_p99_ms": _quantile(latencies, 0.99) * 1e3,
        "plain_sqlite_wake_p50_ms": statistics.median(plain) * 1e3,
        "plain_sqlite_wake_p99_ms": _quantile(plain, 0.99) * 1e3,
        "wake_cpu_p50_ms": statistics.median(cpu) * 1e3,
        "plain_sqlite_wake_cpu_p50_ms": statistics.median(plain_cpu) * 1e3,
        "parked_wake_p50_ms": statistics.median(parked) * 1e3,
        "parked_wake_p99_ms": _quantile(parked, 0.99) * 1e3,
        "awake_call_p50_ms": statistics.median(awake) * 1e3,
        "awake_call_p99_ms": _quantile(awake, 0.99) * 1e3,
        "parked_wakes": parked_wakes,
        "warm_opens": warm_opens,
    }


async def memory_child(state_dir: Path, active: int, hibernated: int, concurrency: int) -> dict:
    """Runs in a fresh process: RSS per active agent (when `active`), or the RSS after
    `hibernated` agents were created (`concurrency` awake at a time) and hibernated."""
    runtime = AgentRuntime(
        AgentSettings(state_dir=state_dir, max_active_agents=max(active, 1000)),
        {"bench": BenchAgent},
    )
    await runtime.start()
    await runtime.call("bench", "warmup", "touch")
    gc.collect()
    base = rss_bytes()
    result: dict[str, Any] = {"baseline_rss_mb": base / 2**20}
    if active:
        await asyncio.gather(*(runtime.call("bench", f"m{i}", "touch") for i in range(active)))
        gc.collect()
        result["rss_per_active_agent_kb"] = (rss_bytes() - base) / active / 1024
    created = 0
    started = time.perf_counter()
    while created < hibernated:
        chunk = min(concurrency, hibernated - created)
        await asyncio.gather(
            *(runtime.call("bench", f"h{created + i}", "touch") for i in range(chunk))
        )
        created += chunk
        runtime.hibernate_idle()
    if hibernated:
        result["create_rate_per_s"] = created / (time.perf_counter() - started)
        while runtime.stats()["active_agents"] or runtime._scheduler.closing:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # the idle sweeper returns freed memory (memory.py)
        gc.collect()
        result["hibernated_agents"] = created
        result["hibernated_rss_mb"] = rss_bytes() / 2**20
    await runtime.close()
    return result


def run_memory_subprocess(
    state_dir: Path, active: int, hibernated: int, concurrency: int, uvloop: bool
) -> dict:
    args = [sys.executable, __file__, "--memory-child", str(state_dir), str(active)]
    args += [str(hibernated), str(concurrency)]
    if not uvloop:
        args.append("--no-uvloop")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


async def main_async(opts: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="gatewayd-bench-"))
    results: dict[str, Any] = {
        "turns": {},
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        if not (opts.memory_only or opts.wake_only):
            table = await turn_cost(root, opts)
            results["turn_cost"] = table
            print_turn_cost(table, opts.turn_agents, opts.repeats)
            if opts.turn_cost_only:
                results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                return results
        rows = []
        naive_available = importlib.util.find_spec("aiosqlite") is not None
        if not naive_available and not (opts.memory_only or opts.wake_only):
            print("(the aiosqlite throughput comparison needs the bench extra: not run)")
        for durability in ("normal", "full"):
            for agents in (
                [] if opts.memory_only or opts.wake_only or not naive_available else opts.agents
            ):
                ours = await gatewayd_turns(
                    root / f"g-{durability}-{agents}", agents, durability, opts.duration_s
                )
                naive = await naive_turns(
                    root / f"n-{durability}-{agents}", agents, durability, opts.duration_s
                )
                ratio = ours["turns_per_s"] / naive["turns_per_s"]
                key = f"{durability}_{agents}"
                results["turns"][key] = {
                    "gatewayd": round(ours["turns_per_s"]),
                    "naive": round(naive["turns_per_s"]),
                    "x": round(ratio, 1),
                    "turns_per_commit": round(ours["turns_per_commit"], 1),
                    "window": ours["window"],
                }
                rows.append((durability, agents, ours, naive, ratio))
                shutil.rmtree(root / f"g-{durability}-{agents}", ignore_errors=True)
                shutil.rmtree(root / f"n-{durability}-{agents}", ignore_errors=True)
        if not opts.memory_only:
            wake = await wake_latency(root / "wake", opts.wake_agents, gc_tuned=opts.gc_tuned)
            results["wake_gc"] = "daemon (gctuning)" if opts.gc_tuned else "python defaults"
            results.update({k: round(v, 3) for k, v in wake.items()})
        results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if opts.wake_only or opts.no_memory:
            results["wake_targets_met"] = {
                "cold": results["wake_p50_ms"] < 1 and results["wake_p99_ms"] < 3,
                "parked": results["parked_wake_p50_ms"] < 1 and results["parked_wake_p99_ms"] < 3,
            }
            print(
                f"wake p50 {results['wake_p50_ms']:.3f} ms, p99 {results['wake_p99_ms']:.3f} ms"
                f" (target < 1 / < 3); plain sqlite3 open+read+commit, same files: p50 "
                f"{results['plain_sqlite_wake_p50_ms']:.3f} ms, p99 "
                f"{results['plain_sqlite_wake_p99_ms']:.3f} ms ({results['warm_opens']} of "
                f"{opts.wake_agents} wakes opened on the loop)"
            )
            print(
                f"wake of a just-hibernated agent (parked connection): p50 "
                f"{results['parked_wake_p50_ms']:.3f} ms, p99 {results['parked_wake_p99_ms']:.3f}"
                f" ms ({results['parked_wakes']} parked wakes); the same call on an awake agent:"
                f" p50 {results['awake_call_p50_ms']:.3f} ms, p99 "
                f"{results['awake_call_p99_ms']:.3f} ms"
            )
            return results
        # Two fresh processes: the active-agent measurement must not leave its high-water
        # mark in the hibernated one.
        for active, hibernated in ((opts.active_agents, 0), (0, opts.hibernated)):
            memory = run_memory_subprocess(
                root / f"mem{active}", active, hibernated, opts.create_concurrency, opts.uvloop
            )
            results.update(
                {k: round(v, 1) if isinstance(v, float) else v for k, v in memory.items()}
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = ("durability", "agents", "gatewayd/s", "naive/s", "x", "turns/commit", "window")
    print("{:<10} {:>6} {:>11} {:>9} {:>6} {:>12} {:>6}".format(*header))
    for durability, agents, ours, naive, ratio in rows:
        print(
            f"{durability:<10} {agents:>6} {ours['turns_per_s']:>11.0f} "
            f"{naive['turns_per_s']:>9.0f} {ratio:>6.1f} {ours['turns_per_commit']:>12.1f} "
            f"{ours['window']:>6}"
        )
    if "wake_p50_ms" in results:
        print(
            f"wake latency (hibernated -> first turn committed): p50 {results['wake_p50_ms']:.3f}"
            f" ms, p99 {results['wake_p99_ms']:.3f} ms ({opts.wake_agents} agents)"
        )
    print(
        f"RSS per active agent: {results['rss_per_active_agent_kb']:.1f} KiB "
        f"({opts.active_agents} agents)"
    )
    print(
        f"{results['hibernated_agents']} agents created and hibernated: process RSS "
        f"{results['hibernated_rss_mb']:.1f} MB (baseline {results['baseline_rss_mb']:.1f} MB, "
        f"{results['create_rate_per_s']:.0f} agents created/s, {opts.create_concurrency} awake "
        "at a time)"
    )
    results["create_concurrency"] = opts.create_concurrency
    results["loop"] = "uvloop" if opts.uvloop else "asyncio"
    results["cpus"] = os.cpu_count()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--duration-s", type=float, default=3.0, help="per throughput run")
    parser.add_argument("--wake-agents", type=int, default=2000)
    parser.add_argument("--active-agents", type=int, default=2000)
    parser.add_argument(
        "--hibernated", type=int, default=20_000, help="agents created then hibernated (RSS)"
    )
    parser.add_argument(
        "--create-concurrency",
        type=int,
        default=200,
        help="agents awake at once while creating the hibernated ones (RSS high-water)",
    )
    parser.add_argument("--turn-agents", type=int, default=20, help="agents in the turn cost")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved turn-cost repeats")
    parser.add_argument(
        "--turn-cost-only", action="store_true", help="only the turn cost against raw sqlite3"
    )
    parser.add_argument("--memory-only", action="store_true", help="only the memory figures")
    parser.add_argument(
        "--no-memory", action="store_true", help="turn cost and wake latency, no memory figures"
    )
    parser.add_argument("--wake-only", action="store_true", help="only the wake latency")
    parser.add_argument(
        "--gc-default",
        dest="gc_tuned",
        action="store_false",
        help="wake latency with Python's default GC settings, not the daemon's (gctuning.py)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            opts.uvloop = False
    if opts.memory_child:
        state_dir, active, hibernated, concurrency = opts.memory_child
        result = memory_child(Path(state_dir), int(active), int(hibernated), int(concurrency))
        print(json.dumps(asyncio.run(result)))
        return
    if opts.quick:
        opts.agents, opts.duration_s, opts.repeats = [1, 10], 0.5, 1
        opts.wake_agents, opts.active_agents, opts.hibernated = 100, 100, 1000
    print(json.dumps({"bench": "agents", **asyncio.run(main_async(opts))}))


if __name__ == "__main__":
    main()
