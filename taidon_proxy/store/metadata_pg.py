"""State metadata in a Postgres database shared by gateway replicas (asyncpg pool).

Rows that describe files in one gateway's store (states, fingerprints, shared instances)
carry that gateway's `node`: each gateway serves, reconciles and evicts its own rows, so two
gateways with their own stores never drop each other's. Names, pins, links, jobs, tokens
and the audit log are one set for all. A lost database turns every call into
`MetadataUnavailable` (57P03) until it answers again; the pool reconnects by itself.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from taidon_proxy.store.metadata import SharedRecord, StateLink, StateRow
from taidon_proxy.store.metadata_api import MetadataOpenError, MetadataUnavailable
from taidon_proxy.store.pg_migrate import migrate
from taidon_proxy.store.pg_tables import PgAudit, PgQueue, PgTokens

log = structlog.get_logger("taidon.metadata")

# What a lost or restarting database raises (a refused connect, a dead pooled connection,
# a server shutting down or starting up).
LOST: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)
_STATE_COLUMNS = (
    "s.id, s.parent, s.kind, s.alias, s.label, s.backend, s.engine, s.created, s.last_used,"
    " s.use_count, s.build_seconds, s.size_bytes, (p.state_id IS NOT NULL), s.clean"
)
_SHARED_COLUMNS = (
    "key, alias, label, state_ref, state_id, clone_id, path, created, last_used, status"
)


def describe_dsn(dsn: str) -> str:
    """user@host:port/database of a DSN, for messages and logs: never its password."""
    try:
        u = urlsplit(dsn)
        host = u.hostname or "(local socket)"
        where = f"{host}:{u.port}" if u.port else host
        return f"{u.username or '(default user)'}@{where}{u.path or '/'}"
    except ValueError:
        return "(a DSN that does not parse)"


def _state(r: Sequence[Any]) -> StateRow:
    return StateRow(
        id=r[0], parent=r[1], kind=r[2], alias=r[3], label=r[4], backend=r[5], engine=r[6],
        created=r[7], last_used=r[8], use_count=r[9], build_seconds=r[10], size_bytes=r[11],
        pinned=bool(r[12]), clean=bool(r[13]),
    )  # fmt: skip


class PgMetadata:
    """The metadata interface (store/metadata_api.py) on a shared Postgres database."""

    kind = "postgres"

    def __init__(
        self, dsn: str, node: str, *, connect_timeout: float = 10.0, max_size: int = 8
    ) -> None:
        self.dsn = dsn
        self.node = node
        self.where = describe_dsn(dsn)
        self._connect_timeout = connect_timeout
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self.schema_version = 0

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self._max_size, timeout=self._connect_timeout,
                command_timeout=30, max_inactive_connection_lifetime=60,
            )  # fmt: skip
        except (*LOST, asyncpg.PostgresError) as e:
            raise MetadataOpenError(
                f"metadata: cannot reach the Postgres metadata database {self.where}: "
                f"{type(e).__name__}: {e}"
            ) from None
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self.schema_version = applied.version
        log.info(
            "metadata.open", kind="postgres", database=self.where, node=self.node,
            schema=applied.version, applied=applied.applied,
        )  # fmt: skip

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a lost database becomes MetadataUnavailable (57P03)."""
        if self._pool is None:
            raise RuntimeError("PgMetadata.open() first")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as c:
                yield c
        except LOST as e:
            await self._pool.expire_connections()  # the others are likely dead too: new ones next
            log.warning("metadata.unavailable", database=self.where, error=str(e)[:200])
            raise MetadataUnavailable(
                "the gateway's metadata database is not reachable; try again shortly"
            ) from e

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.conn() as c:
            return list(await c.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self.conn() as c:
            return await c.fetchrow(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.conn() as c:
            return str(await c.execute(sql, *args))

    def token_table(self) -> PgTokens:
        return PgTokens(self)

    def audit_table(self, head_path: Path) -> PgAudit:
        return PgAudit(self)  # the head lives in the database, beside the chain

    def queue_table(self) -> PgQueue:
        return PgQueue(self, self.node)  # each gateway builds on its own store

    # --- states -----------------------------------------------------------------------------

    async def get_state(self, state_id: str) -> StateRow | None:
        rows = await self._select("AND s.id = $2", state_id)
        return rows[0] if rows else None

    async def states(self) -> list[StateRow]:
        return await self._select("ORDER BY s.created")

    async def _select(self, where: str, *args: Any) -> list[StateRow]:
        rows = await self.fetch(
            f"SELECT {_STATE_COLUMNS} FROM states s LEFT JOIN pins p ON p.state_id = s.id"
            f" WHERE s.node = $1 {where}",
            self.node, *args,
        )  # fmt: skip
        return [_state(r) for r in rows]

    async def add_state(self, row: StateRow) -> None:
        async with self.conn() as c, c.transaction():
            await c.execute(
                "INSERT INTO states VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"
                " ON CONFLICT (node, id) DO UPDATE SET parent = EXCLUDED.parent,"
                " kind = EXCLUDED.kind, alias = EXCLUDED.alias, label = EXCLUDED.label,"
                " backend = EXCLUDED.backend, engine = EXCLUDED.engine,"
                " created = EXCLUDED.created, last_used = EXCLUDED.last_used,"
                " use_count = EXCLUDED.use_count, build_seconds = EXCLUDED.build_seconds,"
                " size_bytes = EXCLUDED.size_bytes, clean = EXCLUDED.clean",
                self.node, row.id, row.parent, row.kind, row.alias, row.label, row.backend,
                row.engine, row.created, row.last_used, row.use_count, row.build_seconds,
                row.size_bytes, row.clean,
            )  # fmt: skip
            if row.pinned:  # never unpins: another gateway's pin of the id stays
                await self._pin(c, row.id, True)

    async def set_size(self, state_id: str, size: int) -> None:
        await self.execute(
            "UPDATE states SET size_bytes = $3 WHERE node = $1 AND id = $2",
            self.node, state_id, size,
        )  # fmt: skip

    async def touch_state(self, state_id: str) -> None:
        await self.execute(
            "UPDATE states SET last_used = $3, use_count = use_count + 1"
            " WHERE node = $1 AND id = $2",
            self.node, state_id, time.time(),
        )  # fmt: skip

    async def remove_state(self, state_id: str) -> None:
        """This gateway's row goes; the id's names and pin go with the last gateway's row."""
        async with self.conn() as c, c.transaction():
            await c.execute(
                "DELETE FROM fingerprints WHERE node = $1 AND state_id = $2", self.node, state_id
            )
            await c.execute("DELETE FROM states WHERE node = $1 AND id = $2", self.node, state_id)
            if await c.fetchval("SELECT count(*) FROM states WHERE id = $1", state_id) == 0:
                await c.execute("DELETE FROM names WHERE state_id = $1", state_id)
                await c.execute("DELETE FROM pins WHERE state_id = $1", state_id)

    async def children(self, state_id: str) -> list[str]:
        rows = await self.fetch(
            "SELECT id FROM states WHERE node = $1 AND parent = $2", self.node, state_id
        )
        return [str(r[0]) for r in rows]

    async def set_pinned(self, state_id: str, pinned: bool) -> None:
        async with self.conn() as c:
            await self._pin(c, state_id, pinned)

    @staticmethod
    async def _pin(c: asyncpg.Connection, state_id: str, pinned: bool) -> None:
        if pinned:
            await c.execute(
                "INSERT INTO pins VALUES ($1, $2) ON CONFLICT DO NOTHING", state_id, time.time()
            )
        else:
            await c.execute("DELETE FROM pins WHERE state_id = $1", state_id)

    # --- links (how ids were derived) ------------------------------------------------------

    async def add_links(self, links: Sequence[StateLink]) -> None:
        async with self.conn() as c:
            await c.executemany(
                "INSERT INTO links (id, parent, kind, step_hash, label)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                [(k.id, k.parent, k.kind, k.step_hash, k.label) for k in links],
            )

    async def add_provenance(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        async with self.conn() as c:
            await c.executemany(
                "INSERT INTO provenance (id, record) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(k, json.dumps(v, sort_keys=True)) for k, v in records.items()],
            )

    async def provenance(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = await self.fetch(
            "SELECT id, record FROM provenance WHERE id = ANY($1::text[])", list(ids)
        )
        return {str(r[0]): json.loads(r[1]) for r in rows}

    async def link(self, state_id: str) -> StateLink | None:
        row = await self.fetchrow(
            "SELECT id, parent, kind, step_hash, label FROM links WHERE id = $1", state_id
        )
        return StateLink(*row) if row else None

    async def child_links(self, parent: str) -> list[StateLink]:
        """Every id ever derived from `parent` (states kept or gone), oldest rows first."""
        rows = await self.fetch(
            "SELECT id, parent, kind, step_hash, label FROM links WHERE parent = $1 ORDER BY pos",
            parent,
        )
        return [StateLink(*r) for r in rows]

    # --- shared instances (their clones outlive servers and restarts) -----------------------

    async def put_shared(self, rec: SharedRecord) -> None:
        await self.execute(
            f"INSERT INTO shared_instances (node, {_SHARED_COLUMNS})"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT (node, key) DO UPDATE SET"
            " alias = EXCLUDED.alias, label = EXCLUDED.label, state_ref = EXCLUDED.state_ref,"
            " state_id = EXCLUDED.state_id, clone_id = EXCLUDED.clone_id, path = EXCLUDED.path,"
            " created = EXCLUDED.created, last_used = EXCLUDED.last_used,"
            " status = EXCLUDED.status",
            self.node, rec.key, rec.alias, rec.label, rec.state_ref, rec.state_id, rec.clone_id,
            rec.path, rec.created, rec.last_used, rec.status,
        )  # fmt: skip

    async def shared_instances(self) -> list[SharedRecord]:
        """This gateway's records (their clones are in its store)."""
        rows = await self.fetch(
            f"SELECT {_SHARED_COLUMNS} FROM shared_instances WHERE node = $1 ORDER BY created",
            self.node,
        )
        return [SharedRecord(*r) for r in rows]

    async def all_shared_instances(self) -> list[tuple[str, SharedRecord]]:
        """(node, record) of every gateway's shared instances: who holds which instance."""
        rows = await self.fetch(
            f"SELECT node, {_SHARED_COLUMNS} FROM shared_instances ORDER BY node, created"
        )
        return [(str(r[0]), SharedRecord(*list(r)[1:])) for r in rows]

    async def remove_shared(self, key: str, clone_id: str) -> None:
        """Forget a record, only if it still names that clone (a newer one may have replaced it)."""
        await self.execute(
            "DELETE FROM shared_instances WHERE node = $1 AND key = $2 AND clone_id = $3",
            self.node, key, clone_id,
        )  # fmt: skip

    # --- names ------------------------------------------------------------------------------

    async def set_name(self, name: str, state_id: str) -> None:
        await self.execute(
            "INSERT INTO names VALUES ($1, $2) ON CONFLICT (name) DO UPDATE"
            " SET state_id = EXCLUDED.state_id",
            name, state_id,
        )  # fmt: skip

    async def names(self) -> dict[str, str]:
        return {str(r[0]): str(r[1]) for r in await self.fetch("SELECT name, state_id FROM names")}

    async def resolve_state(self, ref: str) -> list[str]:
        """State ids matching a name exactly, else an id prefix (may be several: ambiguous)."""
        row = await self.fetchrow("SELECT state_id FROM names WHERE name = $1", ref)
        if row:
            return [str(row[0])]
        if not ref or any(c not in "0123456789abcdef" for c in ref.lower()):
            return []
        rows = await self.fetch(
            "SELECT id FROM states WHERE node = $1 AND id LIKE $2 ORDER BY id LIMIT 10",
            self.node, ref.lower() + "%",
        )  # fmt: skip
        return [str(r[0]) for r in rows]

    # --- fingerprints (fast path) -----------------------------------------------------------

    async def fingerprint(self, recipe_key: str) -> tuple[str, str, list[str]] | None:
        """(fingerprint, final state id, input files) remembered for a recipe, if any."""
        row = await self.fetchrow(
            "SELECT fingerprint, state_id, inputs FROM fingerprints"
            " WHERE node = $1 AND recipe_key = $2",
            self.node, recipe_key,
        )  # fmt: skip
        return (str(row[0]), str(row[1]), list(json.loads(row[2]))) if row else None

    async def set_fingerprint(
        self, recipe_key: str, fingerprint: str, state_id: str, inputs: list[str]
    ) -> None:
        await self.execute(
            "INSERT INTO fingerprints VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (node, recipe_key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,"
            " state_id = EXCLUDED.state_id, inputs = EXCLUDED.inputs, updated = EXCLUDED.updated",
            self.node, recipe_key, fingerprint, state_id, json.dumps(inputs), time.time(),
        )  # fmt: skip

    # --- jobs -------------------------------------------------------------------------------

    async def add_job(self, job_id: str, alias: str | None, started: float) -> None:
        await self.execute(
            "INSERT INTO jobs (id, node, alias, status, started)"
            " VALUES ($1, $2, $3, 'running', $4)",
            job_id, self.node, alias, started,
        )  # fmt: skip

    async def finish_job(
        self, job_id: str, status: str, target: str | None, error: str | None
    ) -> None:
        await self.execute(
            "UPDATE jobs SET status = $2, finished = $3, target = $4, error = $5 WHERE id = $1",
            job_id, status, time.time(), target, error,
        )  # fmt: skip

    async def fail_running_jobs(self, error: str) -> int:
        """After a restart: this gateway's jobs still marked running were cut off; say so."""
        done = await self.execute(
            "UPDATE jobs SET status = 'failed', finished = $2, error = $3"
            " WHERE node = $1 AND status = 'running'",
            self.node, time.time(), error,
        )  # fmt: skip
        return int(done.rsplit(" ", 1)[-1])

    async def add_job_events(self, job_id: str, events: list[tuple[int, float, str, str]]) -> None:
        async with self.conn() as c:
            await c.executemany(
                "INSERT INTO job_events VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                [(job_id, *e) for e in events],
            )

    async def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.fetch(
            "SELECT id, alias, status, started, finished, target, error FROM jobs"
            " ORDER BY started DESC LIMIT $1",
            limit,
        )
        return [dict(r.items()) for r in rows]

    async def job_events(self, job_id: str, after: int = -1) -> list[tuple[int, float, str, str]]:
        rows = await self.fetch(
            "SELECT seq, ts, kind, message FROM job_events WHERE job_id = $1 AND seq > $2"
            " ORDER BY seq",
            job_id, after,
        )  # fmt: skip
        return [(int(r[0]), float(r[1]), str(r[2]), str(r[3])) for r in rows]
