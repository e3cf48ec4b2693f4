"""A Liquibase recipe's state as a bundle: built by one proxy (copy backend), imported into
a second one on a copy-on-write backend, and served there with no Liquibase run at all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import ProxyFactory
from tests.integration.bundle_support import ADMIN, Api, split, store_view
from tests.integration.test_liquibase_build import ITEMS, copy_project, lb_recipe, needs_liquibase

pytestmark = [pytest.mark.integration, pytest.mark.liquibase, needs_liquibase]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def test_liquibase_state_imports_into_a_cow_store_without_a_build(
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    cow_store: tuple[str, Path],
    pg_dir: Path,
) -> None:
    kind, store = cow_store
    project = copy_project(pg_dir)
    recipe = {"shop": lb_recipe(project)}
    a = await make_proxy(recipe, admin=ADMIN)
    b = await make_proxy(recipe, admin=ADMIN, store=str(store), snapshot={"backend": kind})
    api_a, api_b = Api(a, http), Api(b, http)
    conn = await asyncpg.connect(a.dsn("shop"), timeout=240)
    try:
        expected = await conn.fetchval(ITEMS)
    finally:
        await conn.close()
    _, key = await api_a.get("/v1/aliases/shop/key")
    assert key["cached"] and key["steps"] == 4
    data = await api_a.export(key["key"])
    status, out = await api_b.import_(data)
    assert status == 200, out
    assert out["adopted"], out["message"]
    conn = await asyncpg.connect(b.dsn("shop"), timeout=240)
    try:
        assert await conn.fetchval(ITEMS) == expected
        assert await conn.fetchval("select count(*) from databasechangelog") == 4
    finally:
        await conn.close()
    assert b.proxy.builder is not None and b.proxy.builder.jobs == {}
    rows = (await store_view(b))[0][0]
    assert [r[0] for r in rows] == [key["key"]]
    # B exports it again from the chain the import recorded: the same manifest chain.
    again = await api_b.export(key["key"][:12])
    assert split(again)[0]["chain"] == split(data)[0]["chain"]
    assert split(again)[0]["backend"] == kind
