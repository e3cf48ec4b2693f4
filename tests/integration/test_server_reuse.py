"""Server connections of shared instances are handed to the next client with the same startup
parameters, reset: nothing of one client's session reaches the next."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.pgwire import messages
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

IO_TIMEOUT = 30.0


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "r.sql"
    f.write_text("create table t (x int);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


async def kept(p: RunningProxy, n: int = 1) -> None:
    """Wait until the pool holds n connections (the reset runs after the client left)."""
    assert p.proxy.server is not None
    pool = p.proxy.server.pool
    async with asyncio.timeout(IO_TIMEOUT):
        while pool.idle_count() < n:
            await asyncio.sleep(0.01)


async def test_nothing_of_a_session_reaches_the_next_client(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)})
    assert p.proxy.server is not None
    pool = p.proxy.server.pool
    first = await psycopg.AsyncConnection.connect(p.dsn("r"), autocommit=True)
    pid = first.info.backend_pid
    startup_status = {k: first.info.parameter_status(k) for k in ("DateStyle", "TimeZone")}
    for sql in [
        "insert into t values (1)",  # data is not session state: it stays
        "create temp table scratch (y int)",
        "prepare plan1 as select 1",
        "set datestyle = 'SQL, DMY'",
        "set timezone = 'Asia/Tokyo'",
        "set application_name = 'leaky'",
        "set myapp.flag = 'on'",
        "select pg_advisory_lock(42)",
        "listen leaky_channel",
        "declare c cursor with hold for select 1",
        "set role pg_monitor",
    ]:
        await first.execute(sql)
    await first.close()
    await kept(p)
    second = await psycopg.AsyncConnection.connect(p.dsn("r"), autocommit=True)
    try:
        assert second.info.backend_pid == pid  # the same backend, reused
        assert pool.reused == 1
        # The client was told the session's real starting values.
        assert {k: second.info.parameter_status(k) for k in startup_status} == startup_status
        assert second.info.parameter_status("application_name") == ""

        async def one(sql: str) -> Any:
            row = await (await second.execute(sql)).fetchone()
            return row[0] if row else None

        assert await one("select to_regclass('pg_temp.scratch')") is None
        assert await one("select count(*) from pg_prepared_statements") == 0
        assert await one("show datestyle") == startup_status["DateStyle"]
        assert await one("show timezone") == startup_status["TimeZone"]
        assert await one("select current_setting('myapp.flag', true)") in (None, "")
        assert await one("select count(*) from pg_locks where locktype = 'advisory'") == 0
        assert await one("select count(*) from pg_listening_channels()") == 0
        assert await one("select count(*) from pg_cursors") == 0
        assert await one("select current_user") == "postgres"
        assert await one("select count(*) from t") == 1
    finally:
        await second.close()


async def test_other_startup_parameters_get_their_own_backend(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)})
    a = await asyncpg.connect(p.dsn("r"), server_settings={"application_name": "one"})
    pid_a = await a.fetchval("select pg_backend_pid()")
    await a.close()
    await kept(p)
    b = await asyncpg.connect(p.dsn("r"), server_settings={"application_name": "two"})
    try:
        assert await b.fetchval("select pg_backend_pid()") != pid_a
        assert await b.fetchval("show application_name") == "two"
    finally:
        await b.close()
    c = await asyncpg.connect(p.dsn("r"), server_settings={"application_name": "one"})
    try:
        assert await c.fetchval("select pg_backend_pid()") == pid_a
    finally:
        await c.close()


async def raw_session(p: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict]:
    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(messages.startup_message({"user": "postgres", "database": "r"}))
    seen: dict[bytes, list[bytes]] = {}
    async with asyncio.timeout(IO_TIMEOUT):
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
            seen.setdefault(head[:1], []).append(body)
            if head[:1] == b"Z":
                return reader, writer, seen


async def test_a_reused_backend_gets_a_new_secret_and_its_real_pid(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)})
    _, w1, seen1 = await raw_session(p)
    w1.write(b"X\x00\x00\x00\x04")
    w1.close()
    await kept(p)
    r2, w2, seen2 = await raw_session(p)
    try:
        k1, (k2,) = seen1[b"K"][-1], seen2[b"K"]  # the first session waited for a build
        assert k1[:4] == k2[:4] and k1[4:] != k2[4:]  # same backend, a new secret
        assert seen2[b"Z"] == [b"I"]
        names = sorted(b.split(b"\0")[0] for b in seen2[b"S"])
        assert names == sorted(b.split(b"\0")[0] for b in seen1[b"S"])
        # The new key cancels this client's query on that backend.
        w2.write(messages.query("select pg_sleep(30)"))
        await asyncio.sleep(0.3)
        _, cw = await asyncio.open_connection(p.host, p.port)
        cw.write(struct.pack("!ii", 16, 80877102) + k2)
        await cw.drain()
        cw.close()
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                head = await r2.readexactly(5)
                body = await r2.readexactly(struct.unpack("!I", head[1:])[0] - 4)
                if head[:1] == b"E":
                    assert messages.parse_error_fields(body)["C"] == "57014"
                    break
    finally:
        w2.close()


async def test_a_client_leaving_inside_a_transaction_does_not_hand_it_on(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)})
    a = await asyncpg.connect(p.dsn("r"))
    pid_a = await a.fetchval("select pg_backend_pid()")
    await a.execute("begin; insert into t values (7)")
    await a.close()
    b = await asyncpg.connect(p.dsn("r"))
    try:
        assert await b.fetchval("select pg_backend_pid()") != pid_a
        assert await b.fetchval("select count(*) from t") == 0
    finally:
        await b.close()
    assert p.proxy.server is not None and p.proxy.server.pool.reused == 0


async def test_reset_of_the_instance_drops_kept_connections(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)})
    a = await asyncpg.connect(p.dsn("r"))
    await a.close()
    await kept(p)
    assert p.proxy.instances is not None
    assert await p.proxy.instances.reset(InstanceKey.recipe("r"))
    b = await asyncpg.connect(p.dsn("r"))
    try:
        assert await b.fetchval("select 1") == 1
    finally:
        await b.close()
    assert p.proxy.server is not None and p.proxy.server.pool.reused == 0
