"""Maintenance connections and CREATE/DROP DATABASE, through psql, psycopg and asyncpg.

The Rails-style cycle (`db:create` / connect / `db:drop` with `DATABASE_URL`), the errors
Postgres gives for each misstep (same SQLSTATEs), templates, and catalog queries on the
maintenance database.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from taidon_proxy.instances.keys import InstanceKey
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "items.sql"
    f.write_text(
        "create table item (name text);\ninsert into item values ('from recipe');\n"
        "grant all on item to app;\n"
    )
    return {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": ["app"]}


async def psql(
    p: RunningProxy, database: str, *sql: str, user: str = "postgres"
) -> tuple[int, str]:
    """Run psql -c ... for each statement (each its own simple Query); (exit code, output)."""
    args = ["psql", "-X", "-v", "VERBOSITY=verbose", "-v", "ON_ERROR_STOP=1", "-At",
            "-h", p.host, "-p", str(p.port), "-U", user, "-d", database]  # fmt: skip
    for s in sql:
        args += ["-c", s]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def sqlstate_of(p: RunningProxy, database: str, sql: str) -> str:
    """The SQLSTATE psycopg gets for `sql` on a fresh autocommit connection ('' for none)."""
    conn = await psycopg.AsyncConnection.connect(p.dsn(database), autocommit=True)
    try:
        await conn.execute(sql)
        return ""
    except psycopg.Error as e:
        return e.sqlstate or "?"
    finally:
        await conn.close()


async def names(p: RunningProxy, database: str) -> list[str]:
    conn = await asyncpg.connect(p.dsn(database))
    try:
        return [r[0] for r in await conn.fetch("select name from item order by name")]
    finally:
        await conn.close()


async def test_rails_style_create_connect_drop_through_psql(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    # db:create
    rc, out = await psql(p, "postgres", "CREATE DATABASE \"shop_test\" ENCODING = 'utf8'")
    # (the recipe is built first: its progress notices come before)
    assert (rc, out.strip().splitlines()[-1]) == (0, "CREATE DATABASE"), out
    # the new database starts from the recipe; writes stay in it
    rc, out = await psql(p, "shop_test", "insert into item values ('by test')", user="app")
    assert rc == 0, out
    assert await names(p, "shop_test") == ["by test", "from recipe"]
    assert await names(p, "shop") == ["from recipe"]  # the alias's own instance is untouched
    # db:create again: Postgres's duplicate_database
    rc, out = await psql(p, "postgres", "CREATE DATABASE shop_test")
    assert rc != 0 and "42P04" in out and 'database "shop_test" already exists' in out, out
    # inside a transaction block the real server refuses, as Postgres does
    rc, out = await psql(p, "postgres", "BEGIN; CREATE DATABASE shop_test; COMMIT")
    assert rc != 0 and "25001" in out, out
    # names that map to no recipe, templates that do not exist
    rc, out = await psql(p, "postgres", "CREATE DATABASE scratch")
    assert rc != 0 and "0A000" in out and "test_{alias}" in out, out
    rc, out = await psql(p, "postgres", "CREATE DATABASE test_shop TEMPLATE nosuch")
    assert rc != 0 and "3D000" in out and 'template database "nosuch"' in out, out
    # db:drop while someone is connected: 55006 (after Postgres's 5 s grace)
    held = await asyncpg.connect(p.dsn("shop_test"))
    try:
        started = time.monotonic()
        rc, out = await psql(p, "postgres", 'DROP DATABASE "shop_test"')
        assert rc != 0 and "55006" in out and "There is 1 other session" in out, out
        assert time.monotonic() - started >= 4.5
    finally:
        await held.close()
    # db:drop
    rc, out = await psql(p, "postgres", 'DROP DATABASE IF EXISTS "shop_test"')
    assert (rc, out.strip()) == (0, "DROP DATABASE"), out
    with pytest.raises(asyncpg.InvalidCatalogNameError):  # 3D000 at connect
        await asyncpg.connect(p.dsn("shop_test"))
    rc, out = await psql(p, "postgres", "DROP DATABASE shop_test")
    assert rc != 0 and "3D000" in out and 'database "shop_test" does not exist' in out, out
    rc, out = await psql(p, "postgres", "DROP DATABASE IF EXISTS shop_test")
    assert rc == 0 and 'database "shop_test" does not exist, skipping' in out, out
    # db:create after db:drop: the recipe's state again, not the dropped database's
    rc, out = await psql(p, "postgres", "create database shop_test")
    assert rc == 0, out
    assert await names(p, "shop_test") == ["from recipe"]
    assert p.proxy.virtual is not None
    assert [d.name for d in p.proxy.virtual.databases()] == ["shop_test"]


async def test_alias_drop_extended_protocol_catalog_and_kept_clones(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, store=store, instances={"idle_ttl": "1s"})
    # The maintenance database is a real server: catalog queries GUI tools send work.
    conn = await asyncpg.connect(p.dsn("postgres"))
    try:
        datnames = {r[0] for r in await conn.fetch("select datname from pg_database")}
        assert {"postgres", "template1", "shop"} <= datnames
        # asyncpg's fetch runs through the extended protocol (Parse/Describe/Sync, then
        # Bind/Execute/Sync): the proxy answers that batch too.
        await conn.fetch('CREATE DATABASE "test_shop"')
        with pytest.raises(asyncpg.DuplicateDatabaseError):
            await conn.fetch("CREATE DATABASE test_shop")
        with pytest.raises(asyncpg.DuplicateDatabaseError):  # the alias itself exists
            await conn.execute("CREATE DATABASE shop")
        assert await conn.fetchval("select 41 + 1") == 42  # the connection goes on
    finally:
        await conn.close()
    # psycopg with a server-side prepared statement (extended protocol, named statement)
    pconn = await psycopg.AsyncConnection.connect(p.dsn("template1"), autocommit=True)
    try:
        await pconn.execute("DROP DATABASE IF EXISTS test_shop_9", prepare=True)
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            await pconn.execute("DROP DATABASE test_shop_9", prepare=True)
    finally:
        await pconn.close()
    # Idle TTL stops the server but keeps the clone (a shared instance): the data stays.
    conn = await asyncpg.connect(p.dsn("test_shop"))
    try:
        await conn.execute("insert into item values ('kept')")
    finally:
        await conn.close()
    assert p.proxy.instances is not None
    deadline = time.monotonic() + 30
    while any(str(i.key) == "shop:test_shop" for i in p.proxy.instances.instances.values()):
        assert time.monotonic() < deadline, "the idle instance did not stop"
        await asyncio.sleep(0.2)
    assert InstanceKey.parse("shop:test_shop") in p.proxy.instances.kept
    assert await names(p, "test_shop") == ["from recipe", "kept"]
    # ... and DROP throws the clone away, running or kept: a new CREATE starts fresh.
    assert await sqlstate_of(p, "postgres", "DROP DATABASE test_shop") == ""
    assert not any(str(t.key) == "shop:test_shop" for t in p.proxy.instances.listing())
    assert await sqlstate_of(p, "postgres", "CREATE DATABASE test_shop") == ""
    assert await names(p, "test_shop") == ["from recipe"]
    # DROP DATABASE <alias> resets the alias's own instance (Rails db:drop with
    # DATABASE_URL at the alias); its next connection gets the recipe's state.
    conn = await asyncpg.connect(p.dsn("shop"))
    try:
        await conn.execute("insert into item values ('dev data')")
    finally:
        await conn.close()
    assert await sqlstate_of(p, "postgres", "DROP DATABASE shop") == ""
    assert await names(p, "shop") == ["from recipe"]


async def test_a_restart_forgets_virtual_databases_and_their_clones(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    settings = {"store": str(pg_dir / "same-store"), "databases": {"shop": recipe(pg_dir)}}
    first = await make_proxy(**settings)
    assert await sqlstate_of(first, "postgres", "CREATE DATABASE shop_test") == ""
    conn = await asyncpg.connect(first.dsn("shop_test"))
    try:
        await conn.execute("insert into item values ('before restart')")
    finally:
        await conn.close()
    await first.proxy.close()
    second = await make_proxy(**settings)
    assert second.proxy.instances is not None
    assert not any(str(t.key) == "shop:shop_test" for t in second.proxy.instances.listing())
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(second.dsn("shop_test"))
    assert await sqlstate_of(second, "postgres", "CREATE DATABASE shop_test") == ""
    assert await names(second, "shop_test") == ["from recipe"]
