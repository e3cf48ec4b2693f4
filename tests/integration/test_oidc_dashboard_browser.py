"""The dashboard's "Sign in with <issuer>" in a real headless Chromium against a real
OpenID Provider (npm oidc-provider): the provider's own login and consent pages, then the
proxy's callback and a session with the team's role (the SameSite=Strict cookie included)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Route

from tests.conftest import ProxyFactory
from tests.integration.browser_support import DashboardFactory
from tests.integration.oidc_support import MODULE, Provider, oidc_proxy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MODULE.is_file(), reason="oidc-provider missing: scripts/setup --full"),
]


async def loopback_only(route: Route) -> None:
    """The provider's pages ask for a web font: nothing leaves 127.0.0.1."""
    if urlsplit(route.request.url).hostname == "127.0.0.1":
        await route.continue_()
    else:
        await route.abort()


async def test_sign_in_with_the_provider_in_chromium(
    make_proxy: ProxyFactory, dashboard: DashboardFactory, pg_dir: Path, op: Provider, store: str
) -> None:
    p = await oidc_proxy(make_proxy, pg_dir, op, store)
    dash = await dashboard(p)
    await dash.context.route("**/*", loopback_only)
    page = await dash.page("/ui/states")
    assert page.url == dash.base + "/ui/signin"
    await page.click("#signin-oidc")
    await page.wait_for_url(op.issuer + "/interaction/**")  # the provider's login form
    await page.fill("input[name=login]", "ana")
    await page.fill("input[name=password]", "anything")
    await page.click("button[type=submit]")
    await page.wait_for_selector("input[name=prompt][value=consent]", state="attached")
    await page.click("button[type=submit]")  # consent
    await page.wait_for_url(dash.base + "/")  # the callback's page moves on by itself
    assert "Sign in" not in await page.title()
    # the cookie now carries ana's principal: her team's alias only, the viewer of states
    await page.goto(dash.base + "/ui/aliases")
    assert page.url == dash.base + "/ui/aliases"
    assert "shop" in await page.content()
    cookies = {c["name"]: c for c in await dash.context.cookies(dash.base)}
    assert cookies["taidon_session"]["sameSite"] == "Strict"
    assert "taidon_oidc_state" not in cookies
    ours = [x for x in dash.problems if op.issuer not in x]
    assert ours == [], ours
