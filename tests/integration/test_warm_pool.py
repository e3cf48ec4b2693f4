"""instances.warm: per-connection instances come from a pool of started, never-used clones."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.conftest import ProxyFactory, demo_recipe

pytestmark = pytest.mark.integration


async def _spares(p, n: int) -> list[str]:
    mgr = p.proxy.instances
    for _ in range(300):
        pool = [i.id for lst in mgr._spares.values() for i in lst]
        if len(pool) >= n:
            return pool
        await asyncio.sleep(0.05)
    raise AssertionError(f"the pool never reached {n} spare(s): {mgr._spares}")


async def test_connections_take_fresh_spares_and_the_pool_refills(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(
        {"demo": demo_recipe(isolation="connection")}, instances={"warm": 1, "max": 10}
    )
    first = await asyncpg.connect(p.dsn("demo"))
    await first.execute("delete from rental")  # must never be seen by a later connection
    spare = (await _spares(p, 1))[0]
    second = await asyncpg.connect(p.dsn("demo"))
    try:
        mgr = p.proxy.instances
        used = {lease.instance.id for i in mgr.instances.values() for lease in i.leases}
        assert spare in used, "the second connection should have taken the spare"
        assert await second.fetchval("select count(*) from rental") == 5000
        # The pool fills up again behind it.
        refill = await _spares(p, 1)
        assert spare not in refill
    finally:
        await first.close()
        await second.close()
