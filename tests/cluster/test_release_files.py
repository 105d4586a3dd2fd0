"""What a member does with the local files of a partition it gave up (released or lost,
`ClusterMember._forget`): the databases of every agent of that partition go, the ones it
knew (committed, restored, awake) and any other found on disk by the id it stores; other
partitions' files stay; and when a take of the same partition began meanwhile, the files
are that take's and stay. A real agent runtime writes real SQLite files; no NATS (the
member is not started; the end-to-end check is in test_failover's join and pause tests)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.agents.storage import agent_db_file
from gatewayd.cluster import ClusterSettings
from gatewayd.cluster.changelog import PartitionLog
from gatewayd.cluster.member import ClusterMember, OwnedPartition
from gatewayd.cluster.naming import partition_of
from tests.cluster.cluster_agents import Recorder

PARTITIONS = 4
AGENTS = [f"agent-{index}" for index in range(24)]


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[AgentRuntime]:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path), {"rec": Recorder})
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


def _part(member: ClusterMember, number: int, epoch: int, agents: list[str]) -> OwnedPartition:
    log = PartitionLog(
        cast(Any, None), member.names, number, epoch, member.name, max_payload=1 << 20
    )
    part = OwnedPartition(number, epoch, log, state="released")
    part.agents = {("rec", agent) for agent in agents}
    return part


def _stored(state_dir: Path) -> set[str]:
    return {a for a in AGENTS if os.path.exists(agent_db_file(str(state_dir), "rec", a))}


def _in(number: int) -> list[str]:
    return [a for a in AGENTS if partition_of(a, PARTITIONS) == number]


async def _touch(runtime: AgentRuntime, agents: list[str]) -> None:
    for agent in agents:
        await runtime.run_in_agent("rec", agent, lambda a: a.set_state({"here": True}))


async def test_a_given_up_partition_leaves_no_file_and_a_take_begun_meanwhile_keeps_its_own(
    runtime: AgentRuntime, tmp_path: Path
) -> None:
    member = ClusterMember(
        ClusterSettings(agent_class="rec", partitions=PARTITIONS, member="m1"), runtime, tmp_path
    )
    await _touch(runtime, AGENTS)
    assert _stored(tmp_path) == set(AGENTS)
    given_up, kept = _in(0), _in(1)
    assert len(given_up) >= 3 and kept
    # The partition knew only its first agent; the others are awake here or only on disk.
    runtime.hibernate_idle()
    await _touch(runtime, given_up[1:2])
    part = _part(member, 0, 1, given_up[:1])
    member.partitions[0] = part
    member.partitions[1] = _part(member, 1, 1, kept)

    await member._forget(part)

    assert _stored(tmp_path) == set(AGENTS) - set(given_up)
    assert 0 not in member.partitions and 1 in member.partitions
    assert not {key for key in runtime.awake_agents() if key[1] in given_up}

    # A loss that overtook a release: the partition was taken again before the release's
    # clean-up ran; the files (restored by the take) stay.
    await _touch(runtime, given_up)
    retaken = _part(member, 0, 2, given_up)
    member.partitions[0] = retaken
    await member._forget(_part(member, 0, 1, given_up))
    assert _stored(tmp_path) == set(AGENTS)
    assert member.partitions[0] is retaken
