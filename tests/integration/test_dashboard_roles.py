"""The dashboard for team members in a real Chromium: each role sees only the actions its
permissions allow (the admin API's own decision), a developer may stop only her own instance;
and the admin's actions: drain behind its confirmation, a stop of an instance that vanished
meanwhile, a removal refused because the state came into use, an expired session."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Page, Route

from taidon_proxy.admin.context import SESSIONS
from tests.conftest import ProxyFactory, RunningProxy, demo_recipe
from tests.integration.browser_support import Dashboard, DashboardFactory

pytestmark = pytest.mark.integration
ADMIN = {"listen": "127.0.0.1:0"}
USERS = ["ana", "bob", "vic"]
TEAMS = {
    "devs": {"members": ["ana", "bob"], "aliases": ["shop"], "role": "developer"},
    "auditors": {"members": ["vic"], "aliases": ["shop"], "role": "viewer"},
}
REFUSED = ("Response Status Error Code", "responded with a status of")


def shop(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "shop.sql"
    f.write_text("create table t (x int);\ninsert into t values (7);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": USERS}


async def signed_in(dash: Dashboard, path: str, token: str | None = None) -> Page:
    page = await dash.page("/ui/signin")
    await dash.sign_in(page, token)
    await page.wait_for_url(dash.base + "/")
    await page.goto(dash.base + path)
    return page


async def token_for(dash: Dashboard, user: str) -> str:
    created = await dash.api("POST", "/v1/tokens", data={"name": "ui", "user": user})
    return str(created["token"])


def without_refusals(dash: Dashboard) -> list[str]:
    """Console lines other than Chromium's and htmx's note of a refused request."""
    return [m for m in dash.problems if not any(r in m for r in REFUSED)]


async def test_each_role_sees_only_what_it_may_do(
    make_proxy: ProxyFactory, dashboard: DashboardFactory, pg_dir: Path
) -> None:
    p = await make_proxy(
        {"shop": shop(pg_dir), "hr": demo_recipe()}, admin=ADMIN, teams=TEAMS,
        auth={"method": "scram-sha-256"},
    )  # fmt: skip
    admin = await dashboard(p)
    ana_token, bob_token, vic_token = [await token_for(admin, u) for u in USERS]
    ana = await asyncpg.connect(p.dsn("shop", user="ana"), password=ana_token)
    bob = await asyncpg.connect(p.dsn("shop:bobs", user="bob"), password=bob_token)
    try:
        # The admin sees every action, on every alias.
        page = await signed_in(admin, "/ui/instances")
        await page.wait_for_selector("tr[data-key='shop:default'] button.reset")
        assert await page.locator("#drain").count() == 1
        await page.goto(admin.base + "/ui/aliases")
        assert await page.locator("tr[data-alias] button.prepare").count() == 2

        # A viewer: the rows of her alias, no button at all, no other alias.
        viewer = await dashboard(p)
        vpage = await signed_in(viewer, "/ui/aliases", vic_token)
        assert await vpage.inner_text("#who") == "vic (viewer)"
        assert await vpage.locator("tr[data-alias]").all() != []
        assert [await r.get_attribute("data-alias") for r in await vpage.locator(
            "tr[data-alias]").all()] == ["shop"]  # fmt: skip
        assert await vpage.locator("button").all_inner_texts() == ["Sign out"]
        for path in ("/ui/states", "/ui/instances"):
            await vpage.goto(viewer.base + path)
            assert await vpage.locator("main button, main a.rm").count() == 0, path
        await vpage.goto(viewer.base + "/ui/instances")
        assert await vpage.locator("tr[data-instance]").count() == 2

        # A developer: prepare; no reset, pin, remove, snapshot or drain; Stop on her own
        # instance only (reset_own), not on bob's.
        dev = await dashboard(p)
        dpage = await signed_in(dev, "/ui/aliases", ana_token)
        assert await dpage.locator("tr[data-alias=shop] button.prepare").count() == 1
        await dpage.goto(dev.base + "/ui/states")
        assert await dpage.locator("tr[data-state]").count() >= 1
        assert await dpage.locator("#states button, #states a.rm").count() == 0
        await dpage.goto(dev.base + "/ui/instances")
        mine = dpage.locator("tr[data-key='shop:default']")
        assert await mine.locator("button").all_inner_texts() == ["Stop"]
        assert await dpage.locator("tr[data-key='shop:bobs'] button").count() == 0
        assert await dpage.locator("#drain").count() == 0
        await mine.locator("button.stop").click()
        await dpage.wait_for_selector("#flash.ok")
        ended = (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)
        with pytest.raises(ended):  # her session was ended (57P01), the connection closed
            await asyncio.wait_for(ana.fetchval("select 1"), 10)
        assert await bob.fetchval("select x from t") == 7
        for d in (admin, viewer, dev):
            assert d.problems == [], d.problems
    finally:
        await ana.close()
        await bob.close()


async def remove_page(dash: Dashboard, p: RunningProxy) -> tuple[Page, str]:
    state = (await dash.api("GET", "/v1/aliases"))[0]["state"]
    assert state
    page = await signed_in(dash, f"/ui/states/{state}/remove")
    return page, state


async def test_admin_actions_vanished_in_use_drain_and_expiry(
    make_proxy: ProxyFactory, dashboard: DashboardFactory
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    dash = await dashboard(p)
    built = await dash.context.request.post(
        dash.base + "/v1/aliases/demo/prepare", headers={"Authorization": f"Bearer {dash.token}"}
    )
    assert built.ok and '"built": true' in await built.text()  # NDJSON progress, then the result

    # A removal refused because the state came into use after the page was opened.
    page, state = await remove_page(dash, p)
    await page.wait_for_selector("#remove")
    conn = await asyncpg.connect(p.dsn("demo"))
    try:
        await page.click("#remove")
        await page.wait_for_selector("#flash.error")
        refusal = await page.inner_text("#flash")
        assert f"state {state[:12]} is in use" in refusal and "running instance" in refusal
        assert (await dash.api("GET", f"/v1/states/{state}"))["id"] == state
        # Opened again, the page names what blocks it before any click.
        await page.reload()
        assert "running instance" in await page.inner_text("#blockers")

        # Snapshot to a named state: the name typed into the prompt reaches the API.
        await page.goto(dash.base + "/ui/instances")
        row = page.locator("tr[data-key='demo:default']")
        instance = await row.get_attribute("data-instance")
        dash.prompt_answer = "seen_in_ui"
        await row.locator("button.snapshot").click()
        await page.wait_for_selector("#flash.ok:has-text('snapshot taken')")
        assert (await dash.api("GET", "/v1/states/seen_in_ui"))["names"] == ["seen_in_ui"]

        # The same on an instance that someone else stopped meanwhile: a clear message.
        held: list[Route] = []  # the panel's refreshes wait: the row stays as it was seen

        async def hold(route: Route) -> None:
            held.append(route)

        await page.route(dash.base + "/ui/instances", hold)
        await dash.api("DELETE", f"/v1/instances/{instance}")
        dash.prompt_answer = "too_late"
        await row.locator("button.snapshot").click()
        await page.wait_for_selector("#flash.error")
        assert await page.inner_text("#flash") == f'instance "{instance}" does not exist'
        await page.unroute(dash.base + "/ui/instances")  # the held refreshes go on now
        await page.wait_for_selector("tr[data-key='demo:default']", state="detached")
        states = await dash.api("GET", "/v1/states")
        assert not any("too_late" in s["names"] for s in states)  # nothing was made
    finally:
        await conn.close()

    # Drain: behind a confirmation that says what it does; then new connections are refused.
    dash.dialogs.clear()
    await page.click("#drain")
    await page.wait_for_selector("#flash.ok")
    assert dash.dialogs == [
        "confirm: Drain the proxy? It refuses new connections and stops when the open ones end."
    ]
    health = await dash.context.request.get(dash.base + "/v1/health")
    assert await health.json() == {"status": "draining"}
    with pytest.raises(OSError):
        await asyncpg.connect(p.dsn("demo"), timeout=5)
    async with asyncio.timeout(10):
        await p.proxy.stop_requested.wait()  # no session was open: `sqlrs serve` stops now

    # Pin, then unpin: the unpin's confirmation says what it exposes to eviction first.
    await page.goto(dash.base + "/ui/states")
    await page.click(f"tr[data-state='{state}'] button.pin")
    await page.click(f"tr[data-state='{state}'] button.unpin")
    await page.wait_for_selector(f"tr[data-state='{state}'] button.pin")
    assert dash.dialogs[-1].startswith(f"confirm: Unpin {state[:12]}? Nothing is removed now;")

    # An expired session: the next action leads to the sign-in page and changes nothing.
    admin = p.proxy.admin
    assert admin is not None and admin.app is not None
    admin.app[SESSIONS].expire_all()
    await page.click(f"tr[data-state='{state}'] button.pin")
    await page.wait_for_url(dash.base + "/ui/signin?expired=1")
    assert "session has ended" in await page.inner_text("#signin-message")
    assert (await dash.api("GET", f"/v1/states/{state}"))["pinned"] is False
    assert without_refusals(dash) == [], dash.problems


async def test_a_stale_alias_names_the_input_that_changed(
    make_proxy: ProxyFactory, dashboard: DashboardFactory, pg_dir: Path
) -> None:
    schema, data = pg_dir / "01_schema.sql", pg_dir / "02_data.sql"
    schema.write_text("create table t (x int);\n")
    data.write_text("insert into t values (1);\n")
    recipe = {"prepare": {"kind": "psql", "files": [str(schema), str(data)]}}
    p = await make_proxy({"two": recipe}, admin=ADMIN)
    conn = await asyncpg.connect(p.dsn("two"))  # builds the recipe's state
    await conn.close()
    dash = await dashboard(p)
    page = await signed_in(dash, "/ui/aliases")
    assert await page.inner_text("tr[data-alias=two] td.status") == "fresh"
    data.write_text("insert into t values (2);\n")
    row = page.locator("tr[data-alias=two] td.status.stale")
    await row.wait_for()  # the panel refreshes by itself
    why = await row.locator(".why").inner_text()
    assert why.startswith("(step 2: 02_data.sql changed since state "), why
    assert "(after the same earlier steps)" in why
    assert dash.problems == []
