"""Fixtures for the dashboard's browser tests: headless Chromium (Debian's, driven by
playwright; scripts/setup installs it), one page per test, a screenshot in the test's temp
dir when the test fails."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="pip install 'gatewayd[test]' (scripts/setup cpu,test)"
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not at {CHROMIUM}: run scripts/setup cpu,test")
    async with playwright_api.async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh page (its own sessionStorage); on failure the screen is saved as
    `tmp_path/failure.png` and the browser console as `tmp_path/console.log`."""
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            await page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            (tmp_path / "console.log").write_text("\n".join(console))
            print(f"dashboard test failed: screenshot {tmp_path / 'failure.png'}")
        await context.close()
