"""Connecting to a running instance as a client of its unix socket (asyncpg)."""

from __future__ import annotations

import asyncpg

from taidon_proxy.runtimes.base import InstanceHandle

SUPERUSER = "postgres"


async def connect(
    handle: InstanceHandle,
    *,
    database: str,
    user: str = SUPERUSER,
    timeout: float,  # noqa: ASYNC109 - asyncpg's own connect timeout, passed through to it
) -> asyncpg.Connection:
    """A connection to the instance's server over its unix socket (trust: no password)."""
    conn: asyncpg.Connection = await asyncpg.connect(
        host=str(handle.socket_dir), port=handle.port, user=user, database=database,
        timeout=timeout,
    )  # fmt: skip
    return conn
