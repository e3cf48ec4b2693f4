"""Driving the dashboard in Debian's Chromium through Playwright (never Playwright's own browsers).

Each page collects its console errors and uncaught exceptions; a failed test leaves a
screenshot of every open page in a temporary directory and prints its path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from taidon_proxy.admin.auth import read_token
from tests.conftest import RunningProxy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STEP_TIMEOUT_MS = 20_000
CALL_FAILED = pytest.StashKey[bool]()  # set by the report hook in conftest.py


@dataclass
class Dashboard:
    """One browser context (its own cookies) on one proxy's admin endpoint."""

    proxy: RunningProxy
    context: BrowserContext
    base: str
    token: str
    problems: list[str] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    prompt_answer: str = ""

    async def page(self, path: str = "/") -> Page:
        page = await self.context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("console", lambda m: self._console(page, m.type, m.text))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.on("dialog", self._dialog)
        self.pages.append(page)
        await page.goto(self.base + path)
        return page

    def _console(self, page: Page, kind: str, text: str) -> None:
        if kind in ("error", "warning"):
            self.problems.append(f"console {kind} on {page.url}: {text}")

    async def _dialog(self, dialog: Any) -> None:
        # confirm() is accepted; prompt() gets the answer the test left in `prompt_answer`.
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "alert":  # nothing on the dashboard calls alert(): injected markup did
            self.problems.append(f"an alert ran: {dialog.message}")
        await dialog.accept(self.prompt_answer if dialog.type == "prompt" else None)

    async def sign_in(self, page: Page, token: str | None = None) -> None:
        await page.fill("#token", token if token is not None else self.token)
        await page.click("#signin")

    async def api(self, method: str, path: str, **kw: Any) -> Any:
        """A /v1 call with the bearer token, as the CLI makes it (not the page's cookie)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        r = await self.context.request.fetch(self.base + path, method=method, headers=headers, **kw)
        assert r.ok, (method, path, r.status, await r.text())
        return await r.json()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: run scripts/setup --full")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


DashboardFactory = Callable[[RunningProxy], Awaitable[Dashboard]]


@pytest.fixture
async def dashboard(
    browser: Browser, make_proxy: Any, request: pytest.FixtureRequest
) -> AsyncIterator[DashboardFactory]:
    """A browser context on a proxy's admin endpoint (after make_proxy: closed before it)."""
    opened: list[Dashboard] = []

    async def open_(proxy: RunningProxy) -> Dashboard:
        assert proxy.proxy.admin is not None and proxy.proxy.admin.address is not None
        token = read_token(proxy.proxy.config.store)
        assert token
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        dash = Dashboard(proxy, context, f"http://{proxy.proxy.admin.address}", token)
        opened.append(dash)
        return dash

    try:
        yield open_
    finally:
        for dash in opened:
            await keep_evidence(dash, request)


async def keep_evidence(dash: Dashboard, request: pytest.FixtureRequest) -> None:
    """On failure: screenshots of every page, their paths printed; then close the context."""
    try:
        if request.node.stash.get(CALL_FAILED, False):
            out = Path(tempfile.mkdtemp(prefix="taidon-dashboard-"))
            for i, page in enumerate(dash.pages):
                if not page.is_closed():
                    shot = out / f"{request.node.name}-{i}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    print(f"dashboard screenshot: {shot} ({page.url})")
            print("browser problems:", dash.problems)
    finally:
        await dash.context.close()
