"""How sessions end: a client's own close never gets an error; the pid a client is told is
its backend's; an instance dying after the relay let go adds nothing to a cut stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
from typing import Any

import asyncpg
import psycopg
import pytest

from taidon_proxy.pgwire import messages
from tests.conftest import REPO, ProxyFactory
from tests.integration.test_relay_boundaries import (
    RELAYS,
    RawClient,
    copy_until_paused,
    frame,
    kill_instance,
    recipe,
    relay_proxy,
)

pytestmark = pytest.mark.integration

BIG = "select g, md5(g::text) from generate_series(1, 50000) g"
TERMINATE = b"X\x00\x00\x00\x04"


async def test_terminate_then_instance_close_adds_no_error(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    """The client sends its last query and Terminate together and keeps reading: the instance
    closes first (it has read the Terminate), and nothing may follow the query's results."""
    p = await relay_proxy(make_proxy, pg_dir, relay)
    for _ in range(3):
        c = await RawClient.connect(p, "t")
        try:
            c.writer.write(messages.query(BIG) + TERMINATE)
            msgs, tail = frame(await c.rest())
            assert tail == b""
            kinds = [k for k, _ in msgs]
            assert kinds[-1] == b"Z" and b"E" not in kinds, kinds[-3:]
            assert kinds.count(b"D") == 50000
        finally:
            c.close()


@pytest.fixture(params=RELAYS)
def relay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_tls_terminate_adds_no_error(
    make_proxy: ProxyFactory, pg_dir: Any, cert: dict[str, str]
) -> None:
    p = await make_proxy({"t": recipe(pg_dir)}, tls=cert)
    ctx = ssl.create_default_context(cafile=cert["cert"])
    for _ in range(3):
        reader, writer = await asyncio.open_connection(p.host, p.port, limit=1 << 20)
        try:
            writer.write(struct.pack("!ii", 8, 80877103))
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(ctx, server_hostname="localhost")
            c = RawClient(reader, writer)
            writer.write(messages.startup_message({"user": "postgres", "database": "t"}))
            while (await c.message())[0] != b"Z":
                pass
            writer.write(messages.query(BIG) + TERMINATE)
            kinds = []
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    kinds.append((await c.message())[0])
            assert kinds[-1] == b"Z" and b"E" not in kinds, kinds[-3:]
        finally:
            writer.close()


async def test_client_libraries_close_without_errors(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    p = await relay_proxy(make_proxy, pg_dir, relay)
    for _ in range(5):
        conn = await asyncpg.connect(p.dsn("t"))
        assert len(await conn.fetch(BIG)) == 50000
        await conn.close()
        notices: list[Any] = []
        async with await psycopg.AsyncConnection.connect(p.dsn("t")) as pconn:
            pconn.add_notice_handler(notices.append)
            cur = await pconn.execute(BIG)
            assert len(await cur.fetchall()) == 50000
        assert notices == []


async def test_backend_pid_is_the_backends_own(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    p = await relay_proxy(make_proxy, pg_dir, relay)
    connect = psycopg.AsyncConnection.connect
    async with await connect(p.dsn("t"), autocommit=True) as conn:
        real = await (await conn.execute("select pg_backend_pid()")).fetchone()
        assert real is not None and conn.info.backend_pid == real[0]
        # A client can tell its own notifications apart, as with a direct server.
        await conn.execute("listen ch")
        await conn.execute("notify ch, 'hi'")
        notes = [n async for n in conn.notifies(timeout=5, stop_after=1)]
        assert [n.pid for n in notes] == [conn.info.backend_pid]
        # And other clients can act on that pid.
        async with await connect(p.dsn("t"), autocommit=True) as other:
            cur = await other.execute(
                "select count(*) from pg_stat_activity where pid = %s", [real[0]]
            )
            assert await cur.fetchone() == (1,)
            await other.execute("select pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("select 1")
    # Cancel still reaches the right backend through the real pid and our secret.
    aconn = await asyncpg.connect(p.dsn("t"))
    try:
        task = asyncio.create_task(aconn.fetchval("select pg_sleep(30)"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await aconn.fetchval("select 7") == 7
    finally:
        await aconn.close()


async def test_instance_end_reported_after_the_relay_let_go_adds_nothing(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    """The manager's word that the instance died can come after the relay already ended the
    session inside a message: nothing may be written then."""
    p = await relay_proxy(make_proxy, pg_dir, relay)
    c = await RawClient.connect(p, "t")
    try:
        session = await copy_until_paused(
            p, c, "copy (select t.* from t, generate_series(1, 5)) to stdout"
        )
        finish = session._finish

        def finish_then_hear_of_the_crash() -> None:
            # The crash watch can run in the same loop iteration as the relay's report,
            # before the session has closed its sockets: as here.
            session._finish = finish
            finish()
            session._terminated("57P02", "the instance stopped unexpectedly")

        session._finish = finish_then_hear_of_the_crash
        kill_instance(p)
        msgs, tail = frame(await c.rest())
        errors = [messages.parse_error_fields(b)["C"] for k, b in msgs if k == b"E"]
        for kind, body in msgs:
            if kind == b"d":
                ident, v = body.rstrip(b"\n").split(b"\t")
                assert ident.isdigit() and len(v) == 32
        if tail:
            assert errors == []
        else:
            assert errors == ["57P02"]
    finally:
        c.close()


NODE_SCRIPT = REPO / "tests" / "data" / "node" / "close_after_big_result.js"
NODE_PATH = REPO / ".tools" / "node_modules"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_node_postgres_end_gets_no_error(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str, tls: bool, cert: dict[str, str]
) -> None:
    """The reported case: node-postgres's client.end() after a 50,000-row result raised
    'the connection to the instance was lost' in 3-4 of 10 runs."""
    assert (NODE_PATH / "pg").is_dir(), "node-postgres is not installed: run scripts/setup --full"
    extra = {"tls": cert} if tls else {}
    p = await relay_proxy(make_proxy, pg_dir, relay, **extra)
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_SCRIPT), p.dsn("t"), "10", "ssl" if tls else "plain",
        env={**os.environ, "NODE_PATH": str(NODE_PATH)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(300):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode()
    assert "0 of 10 closes got an error" in out.decode()


async def test_a_server_fatal_is_the_last_word(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    """A backend ended by pg_terminate_backend says FATAL 57P01 and closes: the proxy adds no
    57P02 of its own (libpq would see two results, psycopg an InternalError)."""
    p = await relay_proxy(make_proxy, pg_dir, relay)
    c = await RawClient.connect(p, "t")
    try:
        assert p.proxy.server is not None
        [session] = p.proxy.server.sessions
        assert session.instance_key is not None
        other = await asyncpg.connect(p.dsn("t"))
        try:
            await other.execute("select pg_terminate_backend($1)", session.instance_key[0])
        finally:
            await other.close()
        msgs, tail = frame(await c.rest())
        assert tail == b""
        codes = [messages.parse_error_fields(b)["C"] for k, b in msgs if k == b"E"]
        assert codes == ["57P01"]
    finally:
        c.close()


async def test_a_cancel_is_done_when_the_proxy_says_so(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    """Postgres signals a cancelled backend twice and closes the cancel connection after:
    a client told "done" earlier may see its next statement cancelled."""
    p = await relay_proxy(make_proxy, pg_dir, relay)
    conn = await asyncpg.connect(p.dsn("t"))
    try:
        assert p.proxy.server is not None
        [session] = p.proxy.server.sessions
        pid, secret = session.keys[-1]
        for _ in range(30):
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(struct.pack("!iii", 16, 80877102, pid) + secret)
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # the proxy's close: the cancel is done
            writer.close()
            assert await conn.fetchval("select 1 from pg_sleep(0.05)") == 1
    finally:
        await conn.close()
