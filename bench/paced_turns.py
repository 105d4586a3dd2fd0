"""Paced turns: loop iterations, tasks and CPU per message when every message arrives alone.

    python bench/paced_turns.py                          # this tree only
    python bench/paced_turns.py --base-repo /work/main   # and a baseline tree, interleaved

One agent, in process (no broker, no sockets), fed the way a transport feeds it under paced
load: a timer callback submits one message (`submit_message`, as a read callback would), the
message's future settles a done-callback (as the acknowledgement would), and only then is
the next message due, `--gap-ms` later (the loop sleeps in between) or at once (`gap 0`: the
same work with no sleep, the floor). Kinds as in bench/agents.py's turn cost: "echo"
(TelemetryEcho: insert + set_state + a reply through the durable outbox) and "frames"
(FrameCounter with a TCP-style DedupKey).

Reported per message: process CPU (user and system, `getrusage`) on uvloop (the daemon's
loop), and, in a separate pass on the standard asyncio loop (whose `_run_once` can be
counted), event-loop iterations and tasks created. Each (tree, kind, gap) is its own
subprocess; repeats are interleaved across trees and the table shows medians. Prints a table
and one JSON line (with the load average before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


class _CountingLoop(asyncio.SelectorEventLoop):
    iterations = 0

    def _run_once(self) -> None:
        _CountingLoop.iterations += 1
        super()._run_once()  # type: ignore[misc]


async def _measure(kind: str, messages: int, gap_s: float) -> dict[str, float]:
    sys.path.insert(0, str(Path.cwd()))
    from bench.agents import PAYLOAD, DurableLink, InstantOutputs
    from bench.gateway_agents import FrameCounter, TelemetryEcho
    from gatewayd.agents import AgentRuntime, AgentSettings
    from protocols.link import DedupKey

    loop = asyncio.get_running_loop()
    tasks = [0]

    def count_tasks(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        tasks[0] += 1
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(count_tasks)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as state_dir:
        runtime = AgentRuntime(
            AgentSettings(state_dir=Path(state_dir), hibernate_after_s=600),
            {"echo": TelemetryEcho, "frames": FrameCounter},
        )
        await runtime.start()
        outputs = InstantOutputs(loop)
        runtime.attach_outputs(outputs)  # type: ignore[arg-type]
        link = DurableLink(kind, "d0", outputs)
        await runtime.open_link(link, {})
        seq = [0]

        def submit() -> asyncio.Future[Any]:
            if kind == "frames":
                seq[0] += 1
                return runtime.submit_message(link, PAYLOAD, DedupKey(link.link_id, seq[0], 0))
            return runtime.submit_message(link, PAYLOAD)

        for _ in range(200):  # warm-up: the agent awake, its tables created
            await submit()
        finished = loop.create_future()
        settled_count = [0]

        def one() -> None:
            submit().add_done_callback(settled)

        def settled(future: asyncio.Future[Any]) -> None:
            future.result()
            settled_count[0] += 1
            if settled_count[0] >= messages:
                finished.set_result(None)
            elif gap_s > 0:
                loop.call_later(gap_s, one)
            else:
                loop.call_soon(one)

        before = resource.getrusage(resource.RUSAGE_SELF)
        iterations, tasks_before = _CountingLoop.iterations, tasks[0]
        loop.call_soon(one)
        await finished
        after = resource.getrusage(resource.RUSAGE_SELF)
        iterations = _CountingLoop.iterations - iterations
        tasks_created = tasks[0] - tasks_before
        await runtime.close()
    user = (after.ru_utime - before.ru_utime) / messages * 1e6
    system = (after.ru_stime - before.ru_stime) / messages * 1e6
    return {
        "cpu_us": round(user + system, 1),
        "user_us": round(user, 1),
        "sys_us": round(system, 1),
        "iterations": round(iterations / messages, 2),
        "tasks": round(tasks_created / messages, 2),
    }


def child(kind: str, messages: int, gap_s: float, counting: bool) -> None:
    if counting:
        loop: asyncio.AbstractEventLoop = _CountingLoop()
    else:
        import uvloop

        loop = uvloop.new_event_loop()
    try:
        result = loop.run_until_complete(_measure(kind, messages, gap_s))
    finally:
        loop.close()
    print(json.dumps(result))


def run_child(repo: Path, kind: str, messages: int, gap_s: float, counting: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    argv = [sys.executable, str(HERE / "bench" / "paced_turns.py"), "--child", kind]
    argv += [str(messages), str(gap_s), "1" if counting else "0"]
    out = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-repo", type=Path, help="also measure this tree, interleaved")
    parser.add_argument("--messages", type=int, default=3000, help="per measurement")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="pause between messages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        kind, messages, gap_s, counting = opts.child
        child(kind, int(messages), float(gap_s), counting == "1")
        return
    trees = {"branch": HERE}
    if opts.base_repo is not None:
        trees = {"base": opts.base_repo.resolve(), "branch": HERE}
    loadavg_before = os.getloadavg()
    samples: dict[str, dict[str, list[float]]] = {}
    cases = [(kind, gap) for kind in ("echo", "frames") for gap in (0.0, opts.gap_ms / 1000)]
    for _repeat in range(opts.repeats):
        for kind, gap in cases:
            for tree, repo in trees.items():
                name = f"{tree}/{kind}/gap{gap * 1000:g}ms"
                row = samples.setdefault(name, {})
                for key, value in run_child(repo, kind, opts.messages, gap, False).items():
                    if key in ("cpu_us", "user_us", "sys_us"):
                        row.setdefault(key, []).append(value)
    for kind, gap in cases:  # counts are deterministic: one pass
        for tree, repo in trees.items():
            counted = run_child(repo, kind, min(opts.messages, 1000), gap, True)
            row = samples[f"{tree}/{kind}/gap{gap * 1000:g}ms"]
            row["iterations"] = [counted["iterations"]]
            row["tasks"] = [counted["tasks"]]
    table = {
        name: {key: round(statistics.median(values), 2) for key, values in sample.items()}
        for name, sample in samples.items()
    }
    print(f"paced turns, 1 agent, medians of {opts.repeats} interleaved repeats; per message:")
    print(
        f"{'tree/kind/gap':<26} {'CPU us':>7} {'user':>6} {'sys':>6} {'loop iters':>10} {'tasks':>6}"
    )
    for name, medians in table.items():
        print(
            f"{name:<26} {medians['cpu_us']:>7.1f} {medians['user_us']:>6.1f} "
            f"{medians['sys_us']:>6.1f} {medians['iterations']:>10.2f} {medians['tasks']:>6.2f}"
        )
    result: dict[str, Any] = {
        "bench": "paced_turns",
        "messages": opts.messages,
        "repeats": opts.repeats,
        "gap_ms": opts.gap_ms,
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "cases": table,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
