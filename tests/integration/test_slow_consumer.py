"""A client that stops reading a large result: the proxy holds a bounded amount of it (the
instance is paused by backpressure, not buffered in memory), other clients go on, and when
the client goes away its backend ends too."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.net import offload
from taidon_proxy.pgwire import messages
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

ROWS, WIDTH = 60_000, 1000  # a 60 MB result
BIG = f"select repeat('x', {WIDTH}) from generate_series(1, {ROWS}) /* slow-consumer */"
BOUND = 32 * 2**20  # what the proxy may hold or pass on while the client does not read
IO_TIMEOUT = 60.0


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!I", head[1:])
    return head[:1], await reader.readexactly(length - 4)


async def raw_client(p: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(messages.startup_message({"user": "postgres", "database": "r"}))
    async with asyncio.timeout(IO_TIMEOUT):
        while (await message(reader))[0] != b"Z":
            pass
    return reader, writer


def sessions(p: RunningProxy) -> set[Any]:
    assert p.proxy.server is not None
    return set(p.proxy.server.sessions)


async def big_backends(probe: asyncpg.Connection) -> int:
    return int(
        await probe.fetchval(
            "select count(*) from pg_stat_activity "
            "where query like '%slow-consumer%' and pid <> pg_backend_pid()"
        )
    )


@pytest.mark.parametrize("relay", ["native", "python"])
async def test_a_client_that_stops_reading(
    make_proxy: ProxyFactory, pg_dir: Path, relay: str
) -> None:
    if relay == "native":
        assert offload.available(), "the C relay is not built: run scripts/setup"
    sql = pg_dir / "r.sql"
    sql.write_text("create table t (x int);\n")
    p = await make_proxy(
        {"r": {"prepare": {"kind": "psql", "files": [str(sql)]}}},
        relay=relay, instances={"server_pool": 0},
    )  # fmt: skip
    probe = await asyncpg.connect(p.dsn("r"))
    others = sessions(p)
    reader, writer = await raw_client(p)
    try:
        (slow,) = sessions(p) - others
        before = rss()
        writer.write(messages.query(BIG))
        await writer.drain()
        await asyncio.sleep(2.0)  # the server could send all 60 MB in well under that
        held = rss() - before
        passed = slow.bytes_to_client
        print(f"{relay}: {passed} bytes passed on, proxy RSS +{held} bytes while not reading")
        assert passed < BOUND, f"{passed} bytes went on to a client that reads nothing"
        assert held < BOUND, f"the proxy grew by {held} bytes for a client that reads nothing"
        # The instance serves others meanwhile; the slow query waits in its send.
        assert await probe.fetchval("select count(*) from t") == 0
        assert await big_backends(probe) == 1

        # The client reads again: every row arrives, then its ReadyForQuery.
        rows = 0
        async with asyncio.timeout(IO_TIMEOUT):
            while (msg := await message(reader))[0] != b"Z":
                if msg[0] == b"D":
                    rows += 1
                    assert len(msg[1]) == 2 + 4 + WIDTH
                assert msg[0] != b"E", messages.parse_error_fields(msg[1])
        assert rows == ROWS

        # Once more, and this time it goes away without reading: its backend ends.
        writer.write(messages.query(BIG))
        await writer.drain()
        await asyncio.sleep(1.0)
        assert await big_backends(probe) == 1
        writer.transport.abort()
        async with asyncio.timeout(IO_TIMEOUT):
            while await big_backends(probe):
                await asyncio.sleep(0.1)
        assert await probe.fetchval("select 1") == 1
    finally:
        writer.transport.abort()
        await probe.close()
