"""The dashboard in headless Chromium against a real daemon, a real Mosquitto and real devices:
a wrong token is refused at sign-in; the overview's numbers move when MQTT messages arrive; an
agent's page shows a device's change within a second; an approval clicked in the page lets a
chat continue. Set GATEWAYD_SCREENSHOT_DIR to save the README's screenshot there."""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gatewayd.chat import ScriptedBackend
from tests.brokers import MosquittoBroker
from tests.client.daemon import TOKEN, Gateway
from tests.gatewayd.notify import NotifySocket

pytestmark = pytest.mark.timeout(120)

WAIT_MS = 15_000
CHAT_TOOLS = "replies" in inspect.signature(ScriptedBackend).parameters  # the tool loop landed


@pytest.fixture
def gateway(tmp_path: Path, notify: NotifySocket, mosquitto: MosquittoBroker) -> Iterator[Gateway]:
    extra = ""
    if CHAT_TOOLS:
        extra = '[agents.classes.site]\nclass = "tests.dashboard.tool_chat_agents:Site"\n'
    gw = Gateway(tmp_path, notify, api=True, broker_url=mosquitto.url, extra=extra)
    gw.process.start()
    try:
        yield gw
    finally:
        gw.process.stop()


@pytest.fixture
async def device(mosquitto: MosquittoBroker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="test-device") as client:
        yield client


async def reading(device: aiomqtt.Client, device_id: str, temp: float) -> None:
    await device.publish(f"sensors/{device_id}/temp", json.dumps({"temp": temp}), qos=1)


async def sign_in(page: Any, gateway: Gateway, token: str = TOKEN) -> None:
    await page.goto(f"{gateway.api_url}/dashboard/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def metric(page: Any, key: str) -> float:
    text = await page.locator(f'[data-metric="{key}"]').inner_text(timeout=WAIT_MS)
    return float(text.replace(",", ""))


async def test_sign_in_overview_agent_page_and_devices(
    gateway: Gateway, device: aiomqtt.Client, page: Any
) -> None:
    await sign_in(page, gateway, token="not-the-token-at-all")
    refusal = page.get_by_role("alert")
    await refusal.filter(has_text="Sign-in refused: invalid token").wait_for(timeout=WAIT_MS)
    assert await page.get_by_role("navigation").is_hidden()

    await sign_in(page, gateway)
    await page.get_by_role("heading", name="Overview").wait_for(timeout=WAIT_MS)
    await page.locator('[data-metric="mqtt_state"]', has_text="connected").wait_for(timeout=WAIT_MS)
    before = await metric(page, "mqtt_in_total")
    for i in range(3):
        await reading(device, "dev-1", 19.0 + i)
    deadline = time.monotonic() + 15
    while await metric(page, "mqtt_in_total") < before + 3:
        assert time.monotonic() < deadline, "the overview's MQTT count did not move"
        await page.wait_for_timeout(100)
    await page.locator('figure[data-chart="mqtt_in_per_s"] svg polyline').wait_for(timeout=WAIT_MS)
    # The token survives a reload (sessionStorage), so the page does not ask again.
    await page.reload()
    await page.get_by_role("heading", name="Overview").wait_for(timeout=WAIT_MS)
    if os.environ.get("GATEWAYD_SCREENSHOT_DIR"):  # the README's picture: some traffic first
        for i in range(60):
            await reading(device, f"room-{i % 4}", 18.0 + (i % 7) / 2)
            await page.wait_for_timeout(150)
        await page.screenshot(
            path=str(Path(os.environ["GATEWAYD_SCREENSHOT_DIR"]) / "dashboard.png")
        )

    await page.get_by_role("link", name="Agents").click()
    await page.get_by_label("Search agents").fill("dev-1")
    await page.get_by_role("link", name="dev-1").click()
    state = page.locator("#agent-state")
    await page.locator("#live-status", has_text="live").wait_for(timeout=WAIT_MS)
    await state.filter(has_text='"temp": 21').wait_for(timeout=WAIT_MS)
    sent_at = time.monotonic()
    await reading(device, "dev-1", 27.5)
    await state.filter(has_text='"temp": 27.5').wait_for(timeout=WAIT_MS)
    shown_after_s = time.monotonic() - sent_at
    assert shown_after_s < 1.0, f"the device's change took {shown_after_s:.2f} s to show"
    await page.get_by_role("cell", name="mqtt").first.wait_for(timeout=WAIT_MS)  # connections

    # An RPC from the page's form.
    await page.get_by_label("Method").select_option("set_target")
    await page.get_by_label("Arguments (JSON array)").fill("[23]")
    await page.get_by_role("button", name="Call").click()
    await page.locator("#call-result", has_text="→ 23").wait_for(timeout=WAIT_MS)
    await state.filter(has_text='"target": 23,').wait_for(timeout=WAIT_MS)

    assert await unlabelled_controls(page) == []

    await page.get_by_role("link", name="Devices").click()
    row = page.get_by_role("row").filter(has_text="dev-1")
    await row.filter(has_text="open (no allow-list)").wait_for(timeout=WAIT_MS)
    assert "yes" in await row.inner_text()  # connected: its MQTT link is open

    # A phone: nothing wider than the screen but the tables, which scroll on their own.
    await page.set_viewport_size({"width": 390, "height": 844})
    for view in ("overview", "agents", "devices"):
        await page.goto(f"{gateway.api_url}/dashboard/#/{view}")
        await page.locator("#view h2").first.wait_for(timeout=WAIT_MS)
        assert await page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        ), f"the {view} page is wider than a phone"
        assert await unlabelled_controls(page) == []
    await served_browser_client_works(page, gateway)

    # The keyboard reaches the sections: the first Tab shows the skip link, then the nav.
    await page.reload()
    await page.locator("#view h2").first.wait_for(timeout=WAIT_MS)
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Overview"


async def unlabelled_controls(page: Any) -> list[str]:
    """Form controls a screen reader could not name."""
    names: list[str] = await page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter((el) => el.offsetParent !== null)
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                            && !(el.tagName === "BUTTON" && el.textContent.trim()))
            .map((el) => el.outerHTML)"""
    )
    return names


@pytest.mark.skipif(not CHAT_TOOLS, reason="needs the chat tool loop (gw.chat.tool_approval)")
async def test_an_approval_clicked_in_the_page_lets_the_chat_continue(
    gateway: Gateway, page: Any
) -> None:
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone
    await sign_in(page, gateway)
    await page.get_by_role("heading", name="Overview").wait_for(timeout=WAIT_MS)
    await page.goto(f"{gateway.api_url}/dashboard/#/agent/site/site-1")
    await page.get_by_role("button", name="Connect (creates site/site-1)").click()
    await page.locator("#live-status", has_text="live").wait_for(timeout=WAIT_MS)
    await page.get_by_label("Message").fill("set room 2 to 21")
    await page.keyboard.press("Enter")
    approve = page.get_by_role("button", name="Approve set_temperature")
    await approve.wait_for(timeout=WAIT_MS)
    await approve.focus()
    await page.keyboard.press("Enter")  # by keyboard
    log = page.locator("#chat-log")
    await log.filter(has_text="Done: 21 °C.").wait_for(timeout=WAIT_MS)
    await log.locator('[data-state="output-available"]', has_text="room 2 set to 21").wait_for(
        timeout=WAIT_MS
    )
    assert await approve.count() == 0  # the call is no longer waiting


async def served_browser_client_works(page: Any, gateway: Gateway) -> None:
    """/client/gatewayd.js needs no token and works from a page: sync, RPC, typed errors."""
    response = await page.goto(f"{gateway.api_url}/client/gatewayd.js")
    assert response is not None and response.ok
    assert "export class AgentClient" in await response.text()
    # ... and works from any page: state sync and RPC against the real agent.
    await page.goto(f"{gateway.api_url}/dashboard/")
    result = await page.evaluate(
        """async ([ws]) => {
            const { AgentClient, MethodNotFoundError } = await import("/client/gatewayd.js");
            const a = await new AgentClient(ws, "thermostat", "js-1").connect();
            const b = await new AgentClient(ws, "thermostat", "js-1").connect();
            const seen = b.waitForState((s) => s.target === 24.5);
            const value = await a.call("set_target", 24.5);
            const synced = await seen;
            let typed = null;
            try { await a.call("nope"); } catch (err) { typed = err instanceof MethodNotFoundError; }
            a.close(); b.close();
            return { value, target: synced.target, typed };
        }""",
        [gateway.ws_url],
    )
    assert result == {"value": 24.5, "target": 24.5, "typed": True}
