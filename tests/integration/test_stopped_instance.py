"""A stopped (SIGSTOP) instance: a connecting client gets a clear error in bounded time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.net import serverpool, session
from tests.conftest import ProxyFactory

pytestmark = pytest.mark.integration


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


def _tree(pid: int) -> list[int]:
    """The postmaster and its backends and workers."""
    kids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                kids.append(int(proc.name))
    return [pid, *kids]


async def a_stopped_instance_times_out(p: Any, stopped_for: float = 0.0) -> None:
    """SIGSTOP the instance's processes: a new client gets 57P03 in bounded time; after
    SIGCONT the next one is served."""
    assert p.proxy.instances is not None
    [inst] = p.proxy.instances.instances.values()
    stopped = _tree(inst.handle.pid)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(stopped_for)
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as err:
            await asyncpg.connect(p.dsn("one"), timeout=60)
        assert time.monotonic() - started < 20
        assert err.value.sqlstate == "57P03", err.value
        assert "did not answer" in str(err.value)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    conn = await asyncpg.connect(p.dsn("one"))
    assert await conn.fetchval("select x from t") == 42
    await conn.close()


async def test_a_stopped_instance_times_out_with_a_clear_error(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "INSTANCE_HANDSHAKE_TIMEOUT", 2.0)
    # No kept server connections: one kept for less than CHECK_AFTER_S is handed over
    # without a round trip (as PgBouncer's are); the test below covers those.
    p = await make_proxy({"one": recipe(pg_dir)}, store=store, instances={"server_pool": 0})
    conn = await asyncpg.connect(p.dsn("one"))
    assert await conn.fetchval("select x from t") == 42
    await conn.close()
    await a_stopped_instance_times_out(p)


async def kept_connections(p: Any, n: int) -> None:
    pool = p.proxy.server.pool
    deadline = time.monotonic() + 30
    while pool.idle_count() < n:
        assert time.monotonic() < deadline, "the server connection was not kept"
        await asyncio.sleep(0.01)


async def test_a_long_kept_connection_to_a_stopped_instance_is_checked_first(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "INSTANCE_HANDSHAKE_TIMEOUT", 2.0)
    monkeypatch.setattr(serverpool, "CHECK_AFTER_S", 0.5)
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    conn = await asyncpg.connect(p.dsn("one"))
    pid = await conn.fetchval("select pg_backend_pid()")
    await conn.close()
    await kept_connections(p, 1)
    # Kept longer than the check delay and still healthy: a round trip, then reused.
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(p.dsn("one"))
    assert await conn.fetchval("select pg_backend_pid()") == pid
    await conn.close()
    await kept_connections(p, 1)
    await a_stopped_instance_times_out(p, stopped_for=1.0)
