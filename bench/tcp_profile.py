"""Summarise py-spy raw (collapsed) profiles written by `bench/tcp.py --profile DIR`.

For each file: the share of GIL-holding samples by area (where the gateway's loop thread spends
its time: frame decoding, the TCP session, the agent turn, SQLite, the commit, asyncio itself),
and the top functions by inclusive and by self samples.

    python bench/tcp.py --devices 500 --repeats 1 --profile /tmp/tcp-prof
    python bench/tcp_profile.py /tmp/tcp-prof/*.txt
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# First match wins, checked from the innermost frame outwards: a sample counts for the area of
# the innermost frame that matches one of these.
AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("gc (collect)", re.compile(r"gctuning|<gc>|\bcollect\b \(gc")),
    ("sqlite commit", re.compile(r"\bcommit\b \(gatewayd/agents/storage")),
    ("sqlite statements (agent sql, dedup, state)", re.compile(r"gatewayd/agents/storage|sqlite3")),
    ("state json", re.compile(r"\bjson/")),
    ("agent turn (turn.py, agent code)", re.compile(r"gatewayd/agents/turn|bench/gateway_agents")),
    (
        "agent batch / outbox / scheduler",
        re.compile(r"gatewayd/agents/(batch|outbox|scheduler|slot|runtime)"),
    ),
    ("frame codec (frames.py)", re.compile(r"protocols/frames")),
    ("tcp session (tcp_session.py)", re.compile(r"protocols/tcp_session")),
    ("tcp connection (tcp.py)", re.compile(r"protocols/tcp")),
    ("prometheus counters", re.compile(r"prometheus_client")),
    ("asyncio / uvloop", re.compile(r"asyncio/|uvloop")),
]


def _frames(stack: str) -> list[str]:
    return stack.split(";")


def summarise(path: Path, top: int) -> str:
    samples: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((_frames(stack), int(count)))
    total = sum(count for _, count in samples)
    if not total:
        return f"## {path.name}\n\nno samples\n"
    areas: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        for frame in reversed(frames):
            area = next((name for name, pattern in AREAS if pattern.search(frame)), None)
            if area is not None:
                areas[area] += count
                break
        else:
            areas["other"] += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [
        f"## {path.name} ({total} GIL-holding samples)",
        "",
        "| area | share |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {100 * n / total:.1f}% |" for name, n in areas.most_common()]
    lines += ["", "| top inclusive | share |", "| --- | ---: |"]
    lines += [f"| `{name}` | {100 * n / total:.1f}% |" for name, n in inclusive.most_common(top)]
    lines += ["", "| top self | share |", "| --- | ---: |"]
    lines += [f"| `{name}` | {100 * n / total:.1f}% |" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
