"""Cancel requests: the proxy's keys reach the right instance, and cancel a wait for a build."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

READ_TIMEOUT = 60.0


def recipe(pg_dir: Path, sql: str, name: str = "one.sql") -> dict[str, Any]:
    f = pg_dir / name
    f.write_text(sql)
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


async def sleeping(p: RunningProxy, database: str, timeout: float = 10) -> None:
    """Wait until some backend of the instance runs pg_sleep."""
    conn = await asyncpg.connect(p.dsn(database))
    try:
        deadline = time.monotonic() + timeout
        sql = "select count(*) from pg_stat_activity where query like 'select pg_sleep(60)%'"
        while await conn.fetchval(sql) == 0:
            assert time.monotonic() < deadline, "the query never started"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_asyncpg_task_cancel_stops_the_query(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir, "create table t (x int);\n")}, store=store)
    conn = await asyncpg.connect(p.dsn("one"))
    other = await asyncpg.connect(p.dsn("one"))  # a second client whose query must survive
    try:
        other_task = asyncio.create_task(other.fetchval("select 7 from pg_sleep(1.5)"))
        task = asyncio.create_task(conn.execute("select pg_sleep(60)"))
        await sleeping(p, "one")
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The connection waits for the server to end the cancelled query before its next one.
        assert await conn.fetchval("select 1") == 1
        assert time.monotonic() - started < 1.0
        assert await other_task == 7  # the cancel went to conn's backend, not other's
    finally:
        await conn.close()
        await other.close()


async def test_psycopg_cancel_safe_raises_query_canceled(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir, "create table t (x int);\n")}, store=store)
    async with await psycopg.AsyncConnection.connect(p.dsn("one:psy")) as conn:
        task = asyncio.create_task(conn.execute("select pg_sleep(60)"))
        await sleeping(p, "one:psy")
        started = time.monotonic()
        await conn.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled) as e:
            await task
        assert time.monotonic() - started < 1.0
        assert e.value.sqlstate == "57014"
        await conn.rollback()
        cur = await conn.execute("select 2")
        assert await cur.fetchone() == (2,)


def startup(params: dict[str, str]) -> bytes:
    body = struct.pack("!hh", 3, 0)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    async with asyncio.timeout(READ_TIMEOUT):
        hdr = await reader.readexactly(5)
        (length,) = struct.unpack("!i", hdr[1:])
        return hdr[:1], await reader.readexactly(length - 4)


async def test_cancel_while_waiting_for_a_build(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    slow = recipe(pg_dir, "select pg_sleep(5);\ncreate table t as select 5 x;\n", "slow.sql")
    p = await make_proxy({"slow": slow}, store=store)
    # Another client waits for the same build and must get it.
    patient = asyncio.create_task(asyncpg.connect(p.dsn("slow:patient"), timeout=120))
    reader, writer = await asyncio.open_connection(p.host, p.port)
    try:
        writer.write(startup({"user": "postgres", "database": "slow"}))
        assert await read_message(reader) == (b"R", struct.pack("!i", 0))
        t, body = await read_message(reader)
        assert t == b"K"
        pid, secret = struct.unpack("!i", body[:4])[0], body[4:8]
        # Wait until the build runs the slow file (its progress notice arrives).
        for _ in range(20):
            t, body = await read_message(reader)
            assert t == b"N", (t, body)
            if b"applying slow.sql" in body:
                break
        _, cw = await asyncio.open_connection(p.host, p.port)
        cw.write(struct.pack("!iii", 16, 80877102, pid) + secret)
        await cw.drain()
        cw.close()
        await cw.wait_closed()
        started = time.monotonic()
        t, body = await read_message(reader)
        assert t == b"E", (t, body)
        fields = {chr(x[0]): x[1:].decode() for x in body.split(b"\0") if x}
        assert fields["C"] == "57014"
        assert time.monotonic() - started < 1.0
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    assert not patient.done()  # the build was not cancelled with the wait
    conn = await patient
    try:
        assert await conn.fetchval("select x from t") == 5
    finally:
        await conn.close()
    assert p.proxy.builder is not None
    [job] = [j for j in p.proxy.builder.jobs.values() if j.alias == "slow"]
    assert job.status == "succeeded"


async def test_cancel_with_a_wrong_secret_does_nothing(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir, "create table t (x int);\n")}, store=store)
    assert p.proxy.server is not None
    conn = await asyncpg.connect(p.dsn("one:wrong"))
    try:
        [session] = p.proxy.server.sessions
        pid, secret = session.keys[-1]
        task = asyncio.create_task(conn.fetchval("select 'done' from pg_sleep(1)"))
        await asyncio.sleep(0.2)
        bad = bytes(b ^ 0xFF for b in secret)
        _, cw = await asyncio.open_connection(p.host, p.port)
        cw.write(struct.pack("!iii", 16, 80877102, pid) + bad)
        await cw.drain()
        cw.close()
        await cw.wait_closed()
        assert await task == "done"
    finally:
        await conn.close()


async def test_client_hanging_up_during_a_build_does_not_stop_it(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    slow = recipe(pg_dir, "select pg_sleep(2);\ncreate table t as select 9 x;\n", "hang.sql")
    p = await make_proxy({"hang": slow}, store=store)
    assert p.proxy.server is not None and p.proxy.builder is not None
    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(startup({"user": "postgres", "database": "hang"}))
    for _ in range(20):
        t, body = await read_message(reader)
        if t == b"N" and b"applying hang.sql" in body:
            break
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
    server = p.proxy.server
    for _ in range(100):
        if not server.sessions:
            break
        await asyncio.sleep(0.05)
    assert not server.sessions  # the session ended with its client
    [job] = [j for j in p.proxy.builder.jobs.values() if j.alias == "hang"]
    assert not job.done
    conn = await asyncpg.connect(p.dsn("hang"), timeout=60)
    try:
        assert await conn.fetchval("select x from t") == 9
    finally:
        await conn.close()
    assert job.status == "succeeded"
    assert len([j for j in p.proxy.builder.jobs.values() if j.alias == "hang"]) == 1
