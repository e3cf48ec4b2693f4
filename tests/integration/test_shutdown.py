"""A stop is graceful: no new connections, open sessions may finish within the grace period,
the rest get 57P01 (as with Postgres's fast shutdown), and only then do instances stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.pgwire import messages
from tests.conftest import ProxyFactory
from tests.integration.test_relay_boundaries import RawClient, frame

pytestmark = pytest.mark.integration


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "r.sql"
    f.write_text("create table t (x int);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


async def test_a_session_finishes_its_work_within_the_grace_period(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)}, shutdown_grace="20s")
    conn = await asyncpg.connect(p.dsn("r"))
    await conn.execute("begin; insert into t values (1)")
    started = time.monotonic()
    closing = asyncio.create_task(p.proxy.close())
    await asyncio.sleep(0.3)
    assert not closing.done()
    # No new connections are taken meanwhile...
    with pytest.raises(OSError):
        await asyncpg.connect(p.dsn("r"), timeout=5)
    # ...but the open session goes on: it commits and leaves as it likes.
    await conn.execute("insert into t values (2); commit")
    assert await conn.fetchval("select count(*) from t") == 2
    await conn.close()
    async with asyncio.timeout(15):
        await closing
    assert time.monotonic() - started < 15  # it did not wait out the whole grace period


async def test_sessions_still_open_after_the_grace_period_get_57p01(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)}, shutdown_grace="1s")
    c = await RawClient.connect(p, "r")
    try:
        started = time.monotonic()
        async with asyncio.timeout(30):
            await p.proxy.close()
        assert time.monotonic() - started >= 1.0
        msgs, tail = frame(await c.rest())
        assert tail == b"" and [k for k, _ in msgs] == [b"E"]
        fields = messages.parse_error_fields(msgs[0][1])
        assert fields["C"] == "57P01" and fields["S"] == "FATAL"
    finally:
        c.close()
