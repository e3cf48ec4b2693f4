"""The web dashboard in a real headless Chromium against a real proxy with real instances:
sign-in and its refusals, a build's progress bar, reset, pin, the cache chart, markup as text."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Page

from taidon_proxy.admin.context import SESSIONS
from taidon_proxy.admin.sessions import COOKIE
from tests.conftest import ProxyFactory, demo_recipe
from tests.integration.browser_support import Dashboard, DashboardFactory

pytestmark = pytest.mark.integration
ADMIN = {"listen": "127.0.0.1:0"}
STEP_SLEEP = 1.2  # seconds per slow step: long enough to see the bar between 0 and 100


def assert_clean(dash: Dashboard) -> None:
    assert dash.problems == [], dash.problems


async def test_sign_in_refusals_expiry_and_sign_out(
    make_proxy: ProxyFactory, dashboard: DashboardFactory
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    dash = await dashboard(p)
    page = await dash.page("/ui/states")
    assert page.url == dash.base + "/ui/signin"  # no cookie: the sign-in page, no data
    assert await page.locator("nav").count() == 0

    async with page.expect_response(dash.base + "/ui/signin") as answer:
        await dash.sign_in(page, "not-the-token")
    assert (await answer.value).status == 401
    assert await page.inner_text("#signin-error") == "wrong admin token"
    assert await page.locator("nav").count() == 0
    dash.problems.clear()  # Chromium logs the 401 document itself as a console error

    await dash.sign_in(page)
    await page.wait_for_url(dash.base + "/")
    assert await page.inner_text("#version")
    cookie = next(c for c in await dash.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert dash.token not in cookie["value"]

    # The cookie opens the same /v1 API; a change without the page's CSRF token is refused.
    status = await dash.context.request.get(dash.base + "/v1/status")
    assert status.status == 200 and (await status.json())["aliases"] == ["demo"]
    refused = await dash.context.request.post(dash.base + "/v1/cache/gc", data="{}")
    assert refused.status == 403 and (await refused.json())["error"]["code"] == "csrf"
    forged = await dash.context.request.get(
        dash.base + "/v1/status", headers={"Cookie": f"{COOKIE}=forged"}
    )
    assert forged.status == 401

    # An expired session: the next refresh of a panel leads to the sign-in page.
    await page.goto(dash.base + "/ui/aliases")
    assert await page.locator("tr[data-alias=demo]").count() == 1
    admin = p.proxy.admin
    assert admin is not None and admin.app is not None
    admin.app[SESSIONS].expire_all()
    await page.wait_for_url(dash.base + "/ui/signin?expired=1")
    assert "session has ended" in await page.inner_text("#signin-message")

    await dash.sign_in(page)
    await page.wait_for_url(dash.base + "/")
    await page.click(".signout button")
    await page.wait_for_url(dash.base + "/ui/signin")
    await page.goto(dash.base + "/ui/jobs")
    assert page.url.startswith(dash.base + "/ui/signin")
    assert_clean(dash)


def slow_recipe(d: Path, steps: int = 3) -> dict[str, Any]:
    files = [d / "01_schema.sql"]
    files[0].write_text("create table marker (note text);\n")
    for i in range(steps):
        f = d / f"{i + 2:02d}_slow.sql"
        f.write_text(f"insert into marker values ('step {i}');\nselect pg_sleep({STEP_SLEEP});\n")
        files.append(f)
    return {"prepare": {"kind": "psql", "files": [str(f) for f in files]}}


async def cache_used(page: Page) -> int:
    value = await page.get_attribute("rect[data-bar=cache]", "data-value")
    assert value is not None
    return int(value)


async def signed_in(dash: Dashboard, path: str) -> Page:
    page = await dash.page(path)
    await dash.sign_in(page)
    await page.wait_for_url(dash.base + "/")
    if path != "/":
        await page.goto(dash.base + path)
    return page


async def test_build_progress_reset_pin_and_cache_chart(
    make_proxy: ProxyFactory, dashboard: DashboardFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"slow": slow_recipe(pg_dir)}, admin=ADMIN)
    dash = await dashboard(p)
    overview = await signed_in(dash, "/")
    assert await cache_used(overview) == 0
    jobs = await dash.page("/ui/jobs")  # a second tab: the same session cookie
    aliases = await dash.page("/ui/aliases")

    # Prepare now: the jobs tab's bar advances by itself, then reaches 100%.
    await aliases.click("tr[data-alias=slow] button.prepare")
    row = jobs.locator("tr[data-job]").first
    await row.wait_for()
    followed: list[str] = []
    dash.context.on("request", lambda r: followed.append(r.url) if "follow=true" in r.url else None)
    job_page = await dash.page(f"/ui/jobs/{await row.get_attribute('data-job')}")
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await row.get_attribute("data-status")
        bar = row.locator("progress")
        if await bar.count():
            seen.add(int(await bar.get_attribute("data-percent") or "-1"))
        if status != "running":
            break
        await asyncio.sleep(0.25)
    assert status == "succeeded", status
    assert 100 in seen and any(0 < s < 100 for s in seen), seen
    # The job's own page followed its events (server-sent) and shows the end by itself.
    await job_page.wait_for_selector("#job-status[data-status=succeeded]")
    assert await job_page.get_attribute("#job-progress", "data-percent") == "100"
    assert followed and "/events?follow=true" in followed[0]
    await aliases.wait_for_selector("#flash.ok")
    assert "prepared slow" in await aliases.inner_text("#flash")
    assert await aliases.inner_text("tr[data-alias=slow] td.status") != "unbuilt"

    # The cache chart moved: the overview refreshes itself.
    await overview.wait_for_function(
        "document.querySelector('rect[data-bar=cache]').dataset.value > 0"
    )
    assert await cache_used(overview) > 0

    # Reset: the client's session ends, its next connection lands on a fresh clone.
    conn = await asyncpg.connect(p.dsn("slow"))
    await conn.execute("insert into marker values ('mine')")
    busy = asyncio.create_task(conn.execute("select pg_sleep(30)"))
    instances = await dash.page("/ui/instances")
    before = await instances.get_attribute("tr[data-key='slow:default']", "data-instance")
    await instances.click("tr[data-key='slow:default'] button.reset")
    await instances.wait_for_selector("#flash.ok")
    with pytest.raises(asyncpg.ConnectionDoesNotExistError) as ended:
        await asyncio.wait_for(busy, 10)
    assert getattr(ended.value.__cause__, "sqlstate", None) == "57P01"
    await conn.close()
    conn = await asyncpg.connect(p.dsn("slow"))
    try:
        notes = await conn.fetch("select note from marker order by note")
        assert [r["note"] for r in notes] == ["step 0", "step 1", "step 2"]
    finally:
        await conn.close()
    await instances.wait_for_selector("tr[data-key='slow:default']")
    after = await instances.get_attribute("tr[data-key='slow:default']", "data-instance")
    assert after != before

    # Snapshot to a named state: the name typed into the prompt reaches POST /v1/snapshots.
    dash.prompt_answer = "from_browser"
    await instances.click("tr[data-key='slow:default'] button.snapshot")
    await instances.wait_for_selector("#flash.ok:has-text('snapshot taken')")
    named = await dash.api("GET", "/v1/states/from_browser")
    assert named["names"] == ["from_browser"]
    assert any(d.startswith("prompt: ") for d in dash.dialogs)

    # Pin the recipe's state from the states page; the API says so too.
    target = (await dash.api("GET", "/v1/aliases"))[0]["state"]
    states = await dash.page("/ui/states")
    await states.click(f"tr[data-state='{target}'] button.pin")
    await states.wait_for_selector(f"tr[data-state='{target}'] button.unpin")
    assert (await dash.api("GET", f"/v1/states/{target}"))["pinned"] is True
    # Removal says what it would take first, and a pinned state is refused without force.
    await states.click(f"tr[data-state='{target}'] a.rm")
    await states.wait_for_selector("#blockers")
    assert target[:12] in await states.inner_text("#removal-states")
    assert_clean(dash)


async def test_markup_in_step_names_and_sql_errors_shows_as_text(
    make_proxy: ProxyFactory, dashboard: DashboardFactory, pg_dir: Path
) -> None:
    step = pg_dir / "<b>one<i>.sql"
    step.write_text("create table t (a int);\n")
    bad = pg_dir / "bad.sql"
    markup = "<script>alert(1)</script><b>bold</b>"
    bad.write_text(f"select 1;\nDO $$ BEGIN RAISE EXCEPTION '{markup}'; END $$;\n")
    recipe = {"prepare": {"kind": "psql", "files": [str(step), str(bad)]}}
    p = await make_proxy({"broken": recipe}, admin=ADMIN)
    dash = await dashboard(p)
    page = await signed_in(dash, "/ui/aliases")
    await page.click("tr[data-alias=broken] button.prepare")
    await page.wait_for_selector("#flash.error")
    assert markup in await page.inner_text("#flash")

    await page.goto(dash.base + "/ui/jobs")
    await page.click("tr[data-status=failed] a")
    error = await page.inner_text("#job-error")
    assert markup in error and "bad.sql:2" in error
    assert await page.locator("#job-error b, #job-error script").count() == 0
    assert "<b>one<i>.sql (1/2)" in await page.inner_text("#job-log")

    # The same events as server-sent events (what the job page follows while it runs).
    job = page.url.rsplit("/", 1)[1]
    sse = await dash.context.request.get(
        f"{dash.base}/v1/jobs/{job}/events", headers={"Accept": "text/event-stream"}
    )
    assert sse.headers["content-type"] == "text/event-stream"
    text = await sse.text()
    assert text.startswith("id: 0\ndata: {") and text.endswith("event: end\ndata: {}\n\n")
    assert markup in text  # JSON in the data lines: the browser gets it as data, not markup

    await page.goto(dash.base + "/")
    assert markup in await page.inner_text("#last-errors")
    await page.goto(dash.base + "/ui/states")
    labels = await page.locator("#states td:nth-child(2)").all_inner_texts()
    assert "<b>one<i>.sql" in labels
    assert await page.locator("#states b, #states i, #state-tree b").count() == 0

    # An action on something that vanished meanwhile: a clear message on the page.
    state = next(s for s in await dash.api("GET", "/v1/states") if s["label"] == step.name)
    await page.click(f"tr[data-state='{state['id']}'] a.rm")
    await page.wait_for_selector("#remove")
    await dash.api("DELETE", f"/v1/states/{state['id']}")
    await page.click("#remove")
    await page.wait_for_selector("#flash.error")
    assert "does not exist" in await page.inner_text("#flash")
    assert page.url.endswith("/remove")
    # Chromium and htmx both log the refused request; the refusal is the point here.
    refused = ("Response Status Error Code 404", "responded with a status of 404")
    dash.problems = [m for m in dash.problems if not any(r in m for r in refused)]
    assert_clean(dash)
