"""Isolation through real clients: labels, shared vs per-connection instances, idle TTL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.instances.manager import InstanceManager
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration


def recipe(pg_dir: Path, **extra: Any) -> dict[str, Any]:
    f = pg_dir / "items.sql"
    f.write_text("create table items (name text);\ninsert into items values ('seed');\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}, **extra}


def manager(p: RunningProxy) -> InstanceManager:
    assert p.proxy.instances is not None
    return p.proxy.instances


def options(**switches: str) -> dict[str, str]:
    return {"options": " ".join(f"-c taidon.{k}={v}" for k, v in switches.items())}


async def names(p: RunningProxy, database: str, **switches: str) -> list[str]:
    conn = await asyncpg.connect(p.dsn(database), server_settings=options(**switches))
    try:
        return [r[0] for r in await conn.fetch("select name from items order by name")]
    finally:
        await conn.close()


async def insert(p: RunningProxy, database: str, name: str, **switches: str) -> str:
    """Insert a row; return the id of the instance that served it."""
    conn = await asyncpg.connect(p.dsn(database), server_settings=options(**switches))
    try:
        await conn.execute("insert into items values ($1)", name)
        port = conn._transport.get_extra_info("sockname")[1]
        [session] = [s for s in p.proxy.server.sessions if s.peer.endswith(f":{port}")]  # type: ignore[union-attr]
        assert session.lease is not None
        return session.lease.instance.id
    finally:
        await conn.close()


async def wait_until(predicate: Any, timeout: float, what: str) -> float:
    """Poll until predicate() is true; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_labels_are_separate_instances_and_a_label_is_shared(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    await insert(p, "shop:a", "from-a")
    await insert(p, "shop:b", "from-b")
    assert await names(p, "shop:a") == ["from-a", "seed"]
    assert await names(p, "shop:b") == ["from-b", "seed"]
    assert await names(p, "shop") == ["seed"]
    # shop:a and shop with -c taidon.instance=a name the same instance.
    assert await names(p, "shop", instance="a") == ["from-a", "seed"]
    await insert(p, "shop", "via-switch", instance="a")
    assert await names(p, "shop:a") == ["from-a", "seed", "via-switch"]
    # The switch overrides the label in the database name.
    assert await names(p, "shop:b", instance="a") == ["from-a", "seed", "via-switch"]
    assert sorted(str(i.key) for i in manager(p).instances.values()) == [
        "shop:a",
        "shop:b",
        "shop:default",
    ]


async def test_two_connections_on_one_shared_instance_see_each_other(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    a = await psycopg.AsyncConnection.connect(p.dsn("shop:pair"), autocommit=True)
    b = await psycopg.AsyncConnection.connect(p.dsn("shop:pair"), autocommit=True)
    try:
        await a.execute("insert into items values ('a-wrote')")
        cur = await b.execute("select count(*) from items where name = 'a-wrote'")
        assert await cur.fetchone() == (1,)
        # Different backends of one server.
        pa = await (await a.execute("select pg_backend_pid()")).fetchone()
        pb = await (await b.execute("select pg_backend_pid()")).fetchone()
        assert pa != pb
        assert len(manager(p).instances) == 1
        [inst] = manager(p).instances.values()
        assert len(inst.leases) == 2
    finally:
        await a.close()
        await b.close()


async def test_connection_isolation_gives_a_fresh_instance_that_dies_with_it(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    m = manager(p)
    c1 = await asyncpg.connect(p.dsn("shop"), server_settings=options(isolation="connection"))
    c2 = await asyncpg.connect(p.dsn("shop"), server_settings=options(isolation="connection"))
    try:
        await c1.execute("insert into items values ('only-c1')")
        assert await c2.fetchval("select count(*) from items") == 1
        assert len(m.instances) == 2
        pids = {i.handle.pid for i in m.instances.values()}
    finally:
        await c2.close()
    # c2's instance goes as soon as c2 closes; c1's stays while c1 is open.
    await wait_until(lambda: len(m.instances) == 1, 10, "c2's instance to stop")
    assert await c1.fetchval("select count(*) from items") == 2
    await c1.close()
    await wait_until(lambda: not m.instances, 10, "c1's instance to stop")
    for pid in pids:
        await wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, "postmaster exit")
    # A new connection starts from the recipe's state again.
    assert await names(p, "shop", isolation="connection") == ["seed"]


async def test_recipe_level_connection_isolation(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir, isolation="connection")}, store=store)
    await insert(p, "shop", "gone")
    assert await names(p, "shop") == ["seed"]
    # A connection may still ask for a shared instance explicitly.
    await insert(p, "shop", "kept", isolation="shared")
    assert await names(p, "shop", isolation="shared") == ["kept", "seed"]


async def test_shared_instance_lives_for_its_idle_ttl(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    m = manager(p)
    first = await insert(p, "shop:ttl", "kept-while-idle", ttl="1s")
    # Within the TTL the instance (and its data) is still there for the next connection.
    assert list(m.instances) == [first]
    assert await names(p, "shop:ttl") == ["kept-while-idle", "seed"]
    assert list(m.instances) == [first]
    closed = time.monotonic()
    waited = await wait_until(lambda: not m.instances, 15, "the idle instance to expire")
    assert time.monotonic() - closed >= 0.8, "expired before its 1s idle ttl"
    assert waited < 10
    # Its server stopped; its clone is kept, and the next connection starts a server on it.
    assert m.kept[InstanceKey.parse("shop:ttl")].clone_id == first
    assert await names(p, "shop:ttl") == ["kept-while-idle", "seed"]
    assert list(m.instances) == [first] and InstanceKey.parse("shop:ttl") not in m.kept


async def test_config_idle_ttl_applies_and_an_open_connection_keeps_the_instance(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store, instances={"idle_ttl": "1s"})
    m = manager(p)
    conn = await asyncpg.connect(p.dsn("shop"))
    try:
        await asyncio.sleep(2)  # twice the ttl: an open connection is a lease
        assert len(m.instances) == 1
        assert await conn.fetchval("select count(*) from items") == 1
    finally:
        await conn.close()
    waited = await wait_until(lambda: not m.instances, 15, "the idle instance to expire")
    assert 0.5 <= waited < 10
