"""The dashboard's JSON API and files over real HTTP, from a gateway assembled in-process by
`wiring.Components` (real runtime, WebSocket listener, API server, SQLite files), and the
metrics sampler on a registry of its own."""

from __future__ import annotations

import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gatewayd.config import parse_config
from gatewayd.dashboard.sampler import Sampler
from gatewayd.wiring import Components
from tests import waiting
from tests.brokers import free_port
from tests.gatewayd.daemon_process import REPO

OPERATOR = "operator-secret-0123456789"
READER = "reader-secret-0123456789"
OTHER = "other-scope-secret-0123456789"
TOKENS = f"""
[tokens.operator]
token = "{OPERATOR}"
scopes = ["dashboard"]
[tokens.reader]
token = "{READER}"
scopes = ["dashboard"]
classes = ["worker"]
read_only = true
[tokens.other]
token = "{OTHER}"
scopes = ["openai"]
"""


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Components, httpx.AsyncClient]]:
    (tmp_path / "tokens.toml").write_text(TOKENS)
    config = parse_config(
        {
            "gateway": {"state_dir": str(tmp_path / "state")},
            "http": {"enabled": False},
            "agents": {
                "python_path": [str(REPO)],
                "classes": {
                    "worker": {"class": "tests.dashboard.queue_agents:Worker"},
                    "thermostat": {"class": "gatewayd.examples.thermostat:Thermostat"},
                },
            },
            "listeners": {"websocket": {"bind": f"127.0.0.1:{free_port()}"}},
            "api": {"enabled": True, "bind": "127.0.0.1:0", "tokens_file": "tokens.toml"},
            "dashboard": {"path": "/ops", "sample_interval": "100ms", "history": "10s"},
        },
        tmp_path / "gatewayd.toml",
    )
    components = Components(config)
    await components.start()
    base = f"http://127.0.0.1:{components.api.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            yield components, http
    finally:
        await components.stop(5.0)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """`tests.waiting.eventually` for a check that answers true or false."""
    await waiting.eventually(check, bool, timeout_s, what)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tokens_scopes_and_classes(gateway: tuple[Components, httpx.AsyncClient]) -> None:
    components, http = gateway
    page = await http.get("/ops/")
    assert page.status_code == 200 and "Sign in" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (await http.get("/ops/static/app.js")).status_code == 200
    assert (await http.get("/ops/static/gatewayd.js")).status_code == 200
    assert (await http.get("/ops/static/../config.py")).status_code == 404
    assert (await http.get("/client/gatewayd.d.ts")).status_code == 200

    refused = await http.get("/ops/api/session", headers=auth("wrong-token-0123456789"))
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "invalid token"
    assert (await http.get("/ops/api/overview")).status_code == 401
    assert (await http.get("/ops/api/agents", headers=auth(OTHER))).status_code == 403

    session = (await http.get("/ops/api/session", headers=auth(OPERATOR))).json()
    assert session["token"] == "operator"
    assert session["ws"]["port"] == components.transports["ws"].bound_port

    await components.runtime.call("thermostat", "t-1", "set_target", 22)
    await components.runtime.call("worker", "w-1", "heal")
    listing = (await http.get("/ops/api/agents", headers=auth(READER))).json()
    assert [a["id"] for a in listing["agents"]] == ["w-1"]  # its classes only
    assert listing["classes"] == ["worker"]
    everyone = (await http.get("/ops/api/agents?q=t-", headers=auth(OPERATOR))).json()
    assert [(a["class"], a["id"], a["awake"]) for a in everyone["agents"]] == [
        ("thermostat", "t-1", True)
    ]
    hidden = await http.get("/ops/api/agent?class=thermostat&id=t-1", headers=auth(READER))
    assert hidden.status_code == 403
    bad = await http.get("/ops/api/agent?class=nope&id=x", headers=auth(OPERATOR))
    assert bad.status_code == 404 and "nope" in bad.json()["error"]["message"]
    unknown = await http.get("/ops/api/agent?class=worker&id=never-seen", headers=auth(OPERATOR))
    assert unknown.status_code == 404  # looking does not create the agent
    listing = (await http.get("/ops/api/agents?class=worker", headers=auth(OPERATOR))).json()
    assert [a["id"] for a in listing["agents"]] == ["w-1"]
    assert (
        await http.get("/ops/api/overview?since=soon", headers=auth(OPERATOR))
    ).status_code == 400


async def test_a_dead_letter_is_listed_and_replayed(
    gateway: tuple[Components, httpx.AsyncClient],
) -> None:
    components, http = gateway
    runtime = components.runtime
    item = await runtime.call("worker", "w-2", "enqueue", "job-7")

    async def detail() -> dict[str, Any]:
        response = await http.get("/ops/api/agent?class=worker&id=w-2", headers=auth(OPERATOR))
        assert response.status_code == 200, response.text
        return dict(response.json())

    dead: list[dict[str, Any]] = []

    async def died() -> bool:
        dead[:] = (await detail())["dead_letters"]
        return bool(dead)

    await eventually(died, 10, "the queue item to become a dead letter")
    assert dead and dead[0]["id"] == item and "cannot do job-7 yet" in dead[0]["last_error"]
    shown = await detail()
    assert any("cannot do job-7 yet" in e["message"] for e in shown["errors"])
    assert {c["name"] for c in shown["callables"]} == {"enqueue", "heal"}

    body = {"class": "worker", "id": "w-2", "item": item}
    read_only = await http.post("/ops/api/replay", json=body, headers=auth(READER))
    assert read_only.status_code == 403
    await runtime.call("worker", "w-2", "heal")
    replayed = await http.post("/ops/api/replay", json=body, headers=auth(OPERATOR))
    assert replayed.status_code == 200, replayed.text
    state: dict[str, Any] = {}

    async def done() -> bool:
        state.update(await runtime.get_agent_state("worker", "w-2"))
        return state["done"] == ["job-7"]

    await eventually(done, 10, "the replayed item to run")
    assert state["done"] == ["job-7"]
    again = await http.post("/ops/api/replay", json=body, headers=auth(OPERATOR))
    assert again.status_code == 404  # no longer a dead letter
    assert (await detail())["dead_letters"] == []


async def test_overview_samples_in_the_daemon(
    gateway: tuple[Components, httpx.AsyncClient],
) -> None:
    components, http = gateway
    first = (await http.get("/ops/api/overview", headers=auth(OPERATOR))).json()
    assert first["samples"] and first["latest"]["ws_clients"] == 0
    since = first["samples"][-1]["t"]
    for i in range(5):
        await components.runtime.call("thermostat", f"t-{i}", "set_target", 20)
    newer: list[dict[str, Any]] = []

    async def sampled() -> bool:
        body = (await http.get(f"/ops/api/overview?since={since}", headers=auth(OPERATOR))).json()
        newer.extend(body["samples"])
        return any(s.get("agents_awake") == 5 for s in newer)

    await eventually(sampled, 10, "a sample with the 5 agents awake")
    assert all(s["t"] > since for s in newer)
    assert any(s.get("commits_per_s", 0) > 0 for s in newer)
    body = (await http.get("/ops/api/overview", headers=auth(OPERATOR))).json()
    assert body["agents"]["awake"] == 5 and body["agents"]["known"] == 5


def test_sampler_rates_means_and_the_batch_histogram() -> None:
    registry = CollectorRegistry()
    commits = Counter("gatewayd_agent_commits_total", "c", registry=registry)
    active = Gauge("gatewayd_agents_active", "a", registry=registry)
    latency = Histogram("gatewayd_agent_commit_group_seconds", "l", registry=registry)
    rows = Histogram(
        "gatewayd_engine_batch_rows", "r", ["model"], buckets=(1, 4, 16), registry=registry
    )
    tokens = Counter("gatewayd_generate_completion_tokens", "t", ["model"], registry=registry)
    kv_used = Gauge("gatewayd_generate_kv_blocks_used", "u", ["model"], registry=registry)
    kv_free = Gauge("gatewayd_generate_kv_blocks_free", "f", ["model"], registry=registry)
    now = [1000.0]
    sampler = Sampler(
        types.SimpleNamespace(transports={}, runtime=None),
        interval_s=1.0,
        history_s=3.0,
        registry=registry,
        clock=lambda: now[0],
    )
    first = sampler.sample()
    assert "commits_per_s" not in first  # no rate without an earlier sample
    commits.inc(10)
    active.set(3)
    latency.observe(0.002)
    latency.observe(0.004)
    for n in (1, 3, 3, 9, 40):
        rows.labels("m").observe(n)
    tokens.labels("a").inc(60)
    tokens.labels("b").inc(40)
    kv_used.labels("a").set(30)
    kv_free.labels("a").set(90)
    now[0] += 2.0
    second = sampler.sample()
    assert second["gen_tokens_per_s"] == 50.0
    assert second["kv_usage_pct"] == 25.0
    assert second["commits_per_s"] == 5.0
    assert second["agents_awake"] == 3.0
    assert second["commit_latency_ms"] == pytest.approx(3.0)
    assert second["batch_size_histogram"] == [["1", 1], ["4", 2], ["16", 1], ["+Inf", 1]]
    now[0] += 1.0
    third = sampler.sample()
    assert third["commits_per_s"] == 0.0 and "commit_latency_ms" not in third
    now[0] += 1.0
    sampler.sample()
    assert [s["t"] for s in sampler.samples()] == [1002.0, 1003.0, 1004.0]  # the last 3 s
    assert [s["t"] for s in sampler.samples(since=1002.0)] == [1003.0, 1004.0]


def test_the_log_buffer_finds_an_agents_own_warnings() -> None:
    from gatewayd.logring import LogRing

    buffer = LogRing(capacity=3, level=logging.WARNING)
    log = logging.getLogger("tests.dashboard.logbuffer")
    log.addHandler(buffer)
    try:
        log.info("not kept: below WARNING")
        log.warning("agents: %s/%r: message failed: %s", "worker", "w-1", "boom")
        log.error("agents: %s/%r: message failed: %s", "worker", "w-10", "bang")
        log.warning("mqtt: broker %s unreachable", "mqtt://x")
    finally:
        log.removeHandler(buffer)
    assert [e.message for e in buffer.about("worker", "w-1")] == [
        "agents: worker/'w-1': message failed: boom"
    ]  # not w-10's, whose id merely starts the same
    assert [e.level for e in buffer.entries()] == ["WARNING", "ERROR", "WARNING"]
    assert buffer.entries()[-1].message == "mqtt: broker mqtt://x unreachable"
