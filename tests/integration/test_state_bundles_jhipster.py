"""A real application's Liquibase changelog (the JHipster sample in the shared test data) as
a bundle between two separate stores: the same rows, and no Liquibase run where imported."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from tests.conftest import SHARED_TESTDATA, ProxyFactory
from tests.integration.bundle_support import ADMIN, Api
from tests.integration.test_liquibase_build import needs_liquibase

pytestmark = [pytest.mark.integration, pytest.mark.liquibase, needs_liquibase]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


@pytest.mark.skipif(
    not (SHARED_TESTDATA / "jhipster-liquibase").is_dir(), reason="jhipster testdata missing"
)
async def test_jhipster_changelog_bundle_between_two_stores(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A real application's changelog (11 changesets, CSV loads): same data, no build."""
    root = SHARED_TESTDATA / "jhipster-liquibase"
    recipe = {
        "bank": {
            "prepare": {
                "kind": "lb", "search_path": str(root),
                "changelog": "config/liquibase/master.xml", "contexts": "faker",
            }
        }
    }  # fmt: skip
    a = await make_proxy(recipe, admin=ADMIN)
    b = await make_proxy(recipe, admin=ADMIN)
    query = "select count(*), string_agg(login, ',' order by login) from jhi_user"
    conn = await asyncpg.connect(a.dsn("bank"), timeout=240)
    try:
        users = tuple(await conn.fetchrow(query))
    finally:
        await conn.close()
    _, key = await Api(a, http).get("/v1/aliases/bank/key")
    assert key["steps"] == 11 and key["cached"]
    status, out = await Api(b, http).import_(await Api(a, http).export(key["key"]))
    assert status == 200 and out["adopted"], out
    conn = await asyncpg.connect(b.dsn("bank"), timeout=240)
    try:
        assert tuple(await conn.fetchrow(query)) == users
        assert await conn.fetchval("select count(*) from databasechangelog") == 11
    finally:
        await conn.close()
    assert b.proxy.builder is not None and b.proxy.builder.jobs == {}
