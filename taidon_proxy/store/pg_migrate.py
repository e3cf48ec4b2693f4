"""The Postgres metadata schema: numbered migrations applied at open, under an advisory lock.

Each file `migrations_pg/NNNN_name.sql` is one migration; `schema_migrations` lists those
applied. Opening takes a session-level advisory lock, so two gateways starting at once apply
each migration once (the second waits, then finds nothing to do). A database at a version
this code does not know is refused: an older gateway must not write a newer schema.
Adding a table is one new file with the next number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from taidon_proxy.store.metadata_api import MetadataOpenError

# pg_advisory_lock key of the migration runner: the ASCII of "taidonmg".
LOCK_KEY = 0x746169646F6E6D67
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Applied:
    version: int  # the schema's version now
    applied: list[int]  # what this open applied (empty: it was current)


def migrations() -> list[Migration]:
    """The migrations this code knows, in order; the numbers must run 1, 2, 3, ..."""
    found: list[Migration] = []
    for entry in resources.files("taidon_proxy.store.migrations_pg").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda x: x.version)
    if [x.version for x in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations_pg: numbers must run 1..N: {[x.version for x in found]}")
    return found


async def migrate(conn: asyncpg.Connection, known: list[Migration] | None = None) -> Applied:
    """Bring the schema to the newest known version (each migration in its own transaction)."""
    known = migrations() if known is None else known
    newest = known[-1].version if known else 0
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
        current = max(done, default=0)
        if current > newest:
            raise MetadataOpenError(
                f"metadata: the Postgres metadata database is at schema version {current}, "
                f"newer than this proxy knows ({newest}); upgrade the proxy (every gateway "
                "sharing the database must run a version that knows its schema)"
            )
        applied: list[int] = []
        for m in known:
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    m.version, m.name,
                )  # fmt: skip
            applied.append(m.version)
        return Applied(max(current, newest), applied)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
