"""The tokens and audit tables in the shared Postgres metadata database."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import asyncpg

from taidon_proxy.store.audit import GENESIS, rechain
from taidon_proxy.store.metadata_api import AuditRow, QueueTuple, TokenTuple

# pg_advisory_xact_lock key of the audit chain: the ASCII of "taidonau".
AUDIT_LOCK = 0x746169646F6E6175
_COLUMNS = 'id, "user", name, created, expires, revoked'


class PgHandle(Protocol):
    """What the tables need of the Postgres metadata: its pooled connections."""

    def conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]: ...
    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...
    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None: ...
    async def execute(self, sql: str, *args: Any) -> str: ...


def _token(r: asyncpg.Record) -> TokenTuple:
    return (str(r[0]), str(r[1]), str(r[2]), float(r[3]), float(r[4]), r[5])


class PgTokens:
    def __init__(self, meta: PgHandle) -> None:
        self.meta = meta

    async def open(self) -> None:
        """The tables are made by the migrations."""

    async def grants(self) -> list[tuple[str, str, float]]:
        async with self.meta.conn() as c:
            rows = await c.fetch('SELECT "user", teams, expires FROM oidc_grants')
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    async def put_grant(
        self, user: str, teams_json: str, issuer: str, subject: str, expires: float
    ) -> None:
        async with self.meta.conn() as c:
            await c.execute(
                "INSERT INTO oidc_grants VALUES ($1, $2, $3, $4, $5) ON CONFLICT (\"user\") DO"
                " UPDATE SET teams = $2, issuer = $3, subject = $4, expires = $5",
                user, teams_json, issuer, subject, expires,
            )  # fmt: skip

    async def salt(self, user: str, new_salt: bytes, iterations: int) -> tuple[bytes, int]:
        async with self.meta.conn() as c:
            await c.execute(
                "INSERT INTO token_salts VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                user, new_salt, iterations,
            )  # fmt: skip
            row = await c.fetchrow(
                'SELECT salt, iterations FROM token_salts WHERE "user" = $1', user
            )
        assert row is not None
        return bytes(row[0]), int(row[1])

    async def insert(self, row: TokenTuple, token_hash: str, verifier: str) -> None:
        token_id, user, name, created, expires, _ = row
        await self.meta.execute(
            "INSERT INTO tokens VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
            token_id, user, name, token_hash, verifier, created, expires,
        )  # fmt: skip

    async def listing(self, user: str | None) -> list[TokenTuple]:
        if user is None:
            rows = await self.meta.fetch(f"SELECT {_COLUMNS} FROM tokens ORDER BY created DESC")
        else:
            rows = await self.meta.fetch(
                f'SELECT {_COLUMNS} FROM tokens WHERE "user" = $1 ORDER BY created DESC', user
            )
        return [_token(r) for r in rows]

    async def get(self, token_id: str) -> TokenTuple | None:
        row = await self.meta.fetchrow(f"SELECT {_COLUMNS} FROM tokens WHERE id = $1", token_id)
        return _token(row) if row else None

    async def with_hash(self, token_id: str) -> tuple[TokenTuple, str] | None:
        row = await self.meta.fetchrow(
            f"SELECT {_COLUMNS}, hash FROM tokens WHERE id = $1", token_id
        )
        return (_token(row), str(row[6])) if row else None

    async def revoke(self, token_id: str, when: float) -> None:
        await self.meta.execute(
            "UPDATE tokens SET revoked = $2 WHERE id = $1 AND revoked IS NULL", token_id, when
        )

    async def verifiers(self, user: str, now: float) -> list[tuple[str, str]]:
        rows = await self.meta.fetch(
            'SELECT id, verifier FROM tokens WHERE "user" = $1 AND revoked IS NULL'
            " AND expires > $2",
            user, now,
        )  # fmt: skip
        return [(str(r[0]), str(r[1])) for r in rows]


class PgAudit:
    """One chain for every gateway: a batch is chained after the table's last record, under
    the chain's advisory lock, and the head row moves in the same transaction."""

    shared = True

    def __init__(self, meta: PgHandle) -> None:
        self.meta = meta
        self._lock = asyncio.Lock()  # this gateway's batches go one after the other

    async def open(self) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
        async with self.meta.conn() as c:
            row = await c.fetchrow("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            head = await c.fetchrow("SELECT seq, hash FROM audit_head")
        return (
            (int(row[0]), str(row[1])) if row else None,
            (int(head[0]), str(head[1])) if head else None,
        )

    async def write(self, batch: list[AuditRow]) -> tuple[int, str]:
        async with self._lock, self.meta.conn() as c, c.transaction():
            await c.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)
            row = await c.fetchrow("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            after = (int(row[0]), str(row[1])) if row else (0, GENESIS)
            head = await c.fetchrow("SELECT seq, hash FROM audit_head")
            if head is not None and int(head[0]) > after[0]:
                after = (int(head[0]), str(head[1]))  # a cut tail stays visible as a gap
            if (batch[0][0], batch[0][5]) != (after[0] + 1, after[1]):
                batch = rechain(batch, after)
            await c.executemany("INSERT INTO audit VALUES ($1, $2, $3, $4, $5, $6, $7)", batch)
            last = (batch[-1][0], batch[-1][6])
            await c.execute(
                "INSERT INTO audit_head VALUES (TRUE, $1, $2)"
                " ON CONFLICT (one) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash",
                *last,
            )
        return last

    async def head(self) -> tuple[int, str] | None:
        row = await self.meta.fetchrow("SELECT seq, hash FROM audit_head")
        return (int(row[0]), str(row[1])) if row else None

    async def query(
        self,
        *,
        actor: str | None,
        alias: str | None,
        kind: str | None,
        since: float | None,
        until: float | None,
        limit: int,
    ) -> list[Any]:
        where: list[str] = []
        args: list[object] = []
        for cond, value in (
            ("actor = $%d", actor), ("(fields::jsonb) ->> 'alias' = $%d", alias),
            ("kind = $%d", kind), ("ts >= $%d", since), ("ts < $%d", until),
        ):  # fmt: skip
            if value is not None:
                args.append(value)
                where.append(cond % len(args))
        args.append(limit)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY seq DESC LIMIT ${len(args)}"
        return [tuple(r) for r in await self.meta.fetch(sql, *args)]

    async def chunk(self, after: int, size: int) -> list[Any]:
        rows = await self.meta.fetch(
            "SELECT * FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2", after, size
        )
        return [tuple(r) for r in rows]


class PgQueue:
    """The build queue's rows of one gateway (`node`): each builds on its own store."""

    def __init__(self, meta: PgHandle, node: str) -> None:
        self.meta = meta
        self.node = node

    async def add(self, row: QueueTuple) -> None:
        await self.meta.execute(
            "INSERT INTO build_queue VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT (job_id) DO UPDATE SET priority = EXCLUDED.priority,"
            " running = EXCLUDED.running",
            self.node, *row,
        )  # fmt: skip

    async def started(self, job_id: str) -> None:
        await self.meta.execute(
            "UPDATE build_queue SET running = TRUE WHERE node = $1 AND job_id = $2",
            self.node, job_id,
        )  # fmt: skip

    async def remove(self, job_id: str) -> None:
        await self.meta.execute(
            "DELETE FROM build_queue WHERE node = $1 AND job_id = $2", self.node, job_id
        )

    async def pending(self) -> list[QueueTuple]:
        rows = await self.meta.fetch(
            "SELECT job_id, alias, ref, team, priority, seq, enqueued, running"
            " FROM build_queue WHERE node = $1 ORDER BY seq",
            self.node,
        )
        return [
            (r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), float(r[6]), bool(r[7])) for r in rows
        ]

    async def reopen_job(self, job_id: str) -> None:
        await self.meta.execute(
            "UPDATE jobs SET status = 'running', finished = NULL, error = NULL"
            " WHERE node = $1 AND id = $2",
            self.node, job_id,
        )  # fmt: skip
