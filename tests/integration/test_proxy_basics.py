"""The drop-in promise: real clients connect through the proxy and land in the prepared data."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.conftest import ProxyFactory, demo_recipe

pytestmark = pytest.mark.integration


async def test_asyncpg_lands_in_prepared_data(make_proxy: ProxyFactory) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    conn = await asyncpg.connect(p.dsn("demo"))
    try:
        assert await conn.fetchval("select count(*) from film") == 1000
        assert await conn.fetchval("select count(*) from language") == 4
        assert await conn.fetchval("select current_database()") == "demo"
        # Prepared statements with parameters, through the extended protocol.
        stmt = await conn.prepare("select title from film where film_id = $1")
        assert await stmt.fetchval(7) == "Film #7"
    finally:
        await conn.close()


async def test_recipe_role_can_read_and_write(make_proxy: ProxyFactory) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    conn = await asyncpg.connect(p.dsn("demo", user="app"))
    try:
        assert await conn.fetchval("select current_user") == "app"
        assert await conn.fetchval("select count(*) from film_popularity") == 1000
        await conn.execute("insert into rental (film_id) values (1)")
    finally:
        await conn.close()


async def test_psycopg_transactions_copy_and_notify(make_proxy: ProxyFactory) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    async with await psycopg.AsyncConnection.connect(p.dsn("demo")) as conn:
        async with conn.transaction():
            await conn.execute("insert into language (name) values ('German')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                async with conn.transaction():
                    await conn.execute("insert into language (name) values ('German')")
        cur = await conn.execute("select count(*) from language")
        assert (await cur.fetchone()) == (5,)
        # COPY in and out.
        async with conn.cursor() as cur:
            async with cur.copy("copy language (name) from stdin") as copy:
                for i in range(100):
                    await copy.write_row((f"lang-{i}",))
            out = bytearray()
            async with cur.copy("copy (select name from language order by 1) to stdout") as copy:
                async for chunk in copy:
                    out += chunk
        assert out.count(b"\n") == 105
    # LISTEN/NOTIFY between two connections of one shared instance.
    connect = psycopg.AsyncConnection.connect
    async with (
        await connect(p.dsn("demo"), autocommit=True) as a,
        await connect(p.dsn("demo"), autocommit=True) as b,
    ):
        await a.execute("listen news")
        await b.execute("notify news, 'hello'")
        received = []
        async for n in a.notifies(timeout=5, stop_after=1):
            received.append((n.channel, n.payload))
        assert received == [("news", "hello")]


async def test_large_result(make_proxy: ProxyFactory) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    conn = await asyncpg.connect(p.dsn("demo"))
    try:
        rows = await conn.fetch("select g, repeat('x', 200) from generate_series(1, 200000) g")
        assert len(rows) == 200000
        assert rows[-1][0] == 200000
    finally:
        await conn.close()


async def test_psql_and_pgbench(make_proxy: ProxyFactory, pg_dir) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    env = p.libpq_env()
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-d", "demo", "-U", "postgres", "-c", "select count(*) from rental",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "5000"
    script = pg_dir / "bench.sql"
    script.write_text("\\set id random(1, 1000)\nselect title from film where film_id = :id;\n")
    proc = await asyncio.create_subprocess_exec(
        "pgbench", "-n", "-c", "4", "-t", "50", "-M", "prepared", "-f", str(script),
        "-U", "postgres", "demo", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"number of transactions actually processed: 200/200" in out


async def test_unknown_database_lists_aliases(make_proxy: ProxyFactory) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    with pytest.raises(asyncpg.InvalidCatalogNameError) as e:
        await asyncpg.connect(p.dsn("nope"))
    assert 'database "nope" does not exist' in str(e.value)
    assert "demo" in (e.value.detail or "")
    # The proxy keeps serving everyone else.
    conn = await asyncpg.connect(p.dsn("demo"))
    await conn.close()


async def test_unknown_user_gets_instance_error(make_proxy: ProxyFactory) -> None:
    p = await make_proxy({"demo": demo_recipe()})
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as e:
        await asyncpg.connect(p.dsn("demo", user="mallory"))
    assert 'role "mallory" does not exist' in str(e.value)
