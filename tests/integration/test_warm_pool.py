"""instances.warm: per-connection instances come from a pool of started, never-used clones."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from taidon_proxy.instances.keys import InstanceKey
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


async def test_new_shared_labels_take_spares_that_become_kept_shared_instances(
    make_proxy: ProxyFactory,
) -> None:
    """instances.warm_labels: the first connection of a new label of a shared alias gets a
    started clone (run with the shared settings), which is then that label's instance: a
    second connection shares it, and it is recorded like any shared instance."""
    p = await make_proxy({"demo": demo_recipe()}, instances={"warm_labels": 1, "max": 10})
    mgr = p.proxy.instances
    first = await asyncpg.connect(p.dsn("demo:t1"))
    await first.execute("delete from rental")
    spare = (await _spares(p, 1))[0]
    assert mgr.instances[spare].isolation == "shared"
    second = await asyncpg.connect(p.dsn("demo:t2"))
    again = await asyncpg.connect(p.dsn("demo:t2"))
    try:
        t2 = mgr._shared[InstanceKey.recipe("demo", "t2")]
        assert t2.id == spare, "the new label should have taken the spare"
        assert {lease.instance.id for lease in t2.leases} == {spare}
        assert await second.fetchval("select count(*) from rental") == 5000
        assert await second.fetchval("show synchronous_commit") == "on"
        await second.execute("delete from rental where rental_id = 1")
        assert await again.fetchval("select count(*) from rental") == 4999  # one database
        records = {r.key: r for r in await p.proxy.store.meta.shared_instances()}
        assert records["demo:t2"].clone_id == spare
        # A connection spare pool is another pool: warm is 0, so none is made.
        assert all(k.isolation == "shared" for k in mgr._spares)
        refill = await _spares(p, 1)
        assert spare not in refill
    finally:
        for c in (first, second, again):
            await c.close()


async def _stream(p, n: int, gap: float) -> list[str]:
    """n per-connection clients one after another; the instance id each was served by."""
    served = []
    for _ in range(n):
        conn = await asyncpg.connect(p.dsn("demo"))
        try:
            served.append(await conn.fetchval("select current_setting('data_directory')"))
        finally:
            await conn.close()
        await asyncio.sleep(gap)
    return served


async def test_auto_pool_follows_a_steady_stream_and_lets_go_when_it_stops(
    make_proxy: ProxyFactory,
) -> None:
    """No instances.warm set (auto): a few cold connections, then a steady stream is served
    from spares (each a fresh clone: the rows are whole), at most warm_max of them; when
    the stream stops, the spares go after the window."""
    p = await make_proxy(
        {"demo": demo_recipe(isolation="connection")}, instances={"max": 20, "warm_max": 2}
    )
    mgr = p.proxy.instances
    assert p.proxy.config.instances.warm == "auto"
    mgr._sizer.window_s = 3.0  # the default is 30 s; the policy is the same
    spare_ids: set[str] = set()
    taken = 0
    for _ in range(8):
        spare_ids |= {i.id for lst in mgr._spares.values() for i in lst}
        conn = await asyncpg.connect(p.dsn("demo"))
        try:
            mine = {lease.instance.id for i in mgr.instances.values() for lease in i.leases}
            taken += bool(mine & spare_ids)
            assert await conn.fetchval("select count(*) from rental") == 5000
            await conn.execute("delete from rental")  # never seen by the next client
        finally:
            await conn.close()
        assert sum(len(v) for v in mgr._spares.values()) <= 2
        await asyncio.sleep(0.3)
    assert taken >= 4, f"only {taken} of 8 connections were served by a spare"
    for _ in range(100):  # 3 s window, re-checked every window: gone within ~6 s
        if not any(mgr._spares.values()) and not mgr.instances:
            break
        await asyncio.sleep(0.1)
    assert not any(mgr._spares.values()), "the spares outlived the stream"
    assert not mgr.instances


async def test_no_stream_no_spares(make_proxy: ProxyFactory) -> None:
    """Two connections are not a stream: auto makes no spare for them."""
    p = await make_proxy({"demo": demo_recipe(isolation="connection")}, instances={"max": 20})
    for _ in range(2):
        conn = await asyncpg.connect(p.dsn("demo"))
        await conn.close()
    await asyncio.sleep(0.5)
    assert not any(p.proxy.instances._spares.values())
    assert not p.proxy.instances.instances


async def test_warm_zero_turns_the_pool_off(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(
        {"demo": demo_recipe(isolation="connection")}, instances={"max": 20, "warm": 0}
    )
    for _ in range(5):
        conn = await asyncpg.connect(p.dsn("demo"))
        await conn.close()
    await asyncio.sleep(0.5)
    assert not any(p.proxy.instances._spares.values())
