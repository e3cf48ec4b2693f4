"""The tokens and audit tables in the store's SQLite file, through its one metadata thread."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,          -- 12 hex digits, shown in listings
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,           -- SHA-256 (hex) of the whole token text
    verifier TEXT NOT NULL,       -- SCRAM-SHA-256 verifier of the token as a password
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked REAL                  -- when it was revoked (NULL: it was not)
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user);
CREATE TABLE IF NOT EXISTS token_salts (
    user TEXT PRIMARY KEY,
    salt BLOB NOT NULL,           -- every token of the user gets its verifier with this salt
    iterations INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS oidc_grants (
    user TEXT PRIMARY KEY,
    teams TEXT NOT NULL,          -- JSON list: the teams the user's groups mapped to
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,        -- the ID token's sub
    expires REAL NOT NULL         -- the last login's token expiry: the teams count until then
);
"""

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    fields TEXT NOT NULL,        -- canonical JSON object
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);
CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor, seq);
-- The proxy only appends; these keep a stray UPDATE or DELETE of ours from passing silently.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_COLUMNS = "id, user, name, created, expires, revoked"


class SqliteHandle(Protocol):
    """What the tables need of the SQLite metadata: its thread and its connection."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    @property
    def db(self) -> sqlite3.Connection: ...


class SqliteTokens:
    def __init__(self, meta: SqliteHandle) -> None:
        self.meta = meta

    async def open(self) -> None:
        await self.meta.run(lambda: self.meta.db.executescript(TOKENS_SCHEMA))

    async def grants(self) -> list[tuple[str, str, float]]:
        rows = await self.meta.run(
            lambda: self.meta.db.execute("SELECT user, teams, expires FROM oidc_grants").fetchall()
        )
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    async def put_grant(
        self, user: str, teams_json: str, issuer: str, subject: str, expires: float
    ) -> None:
        await self.meta.run(
            lambda: self.meta.db.execute(
                "INSERT OR REPLACE INTO oidc_grants VALUES (?, ?, ?, ?, ?)",
                (user, teams_json, issuer, subject, expires),
            )
        )

    async def salt(self, user: str, new_salt: bytes, iterations: int) -> tuple[bytes, int]:
        def get() -> tuple[bytes, int]:
            db = self.meta.db
            db.execute(
                "INSERT OR IGNORE INTO token_salts VALUES (?, ?, ?)", (user, new_salt, iterations)
            )
            row = db.execute(
                "SELECT salt, iterations FROM token_salts WHERE user = ?", (user,)
            ).fetchone()
            return bytes(row[0]), int(row[1])

        return await self.meta.run(get)

    async def insert(
        self, row: tuple[str, str, str, float, float, float | None], token_hash: str, verifier: str
    ) -> None:
        token_id, user, name, created, expires, _ = row
        await self.meta.run(
            lambda: self.meta.db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (token_id, user, name, token_hash, verifier, created, expires),
            )
        )

    async def listing(self, user: str | None) -> list[Any]:
        where, args = ("WHERE user = ?", (user,)) if user is not None else ("", ())
        return await self.meta.run(
            lambda: self.meta.db.execute(
                f"SELECT {_COLUMNS} FROM tokens {where} ORDER BY created DESC", args
            ).fetchall()
        )

    async def get(self, token_id: str) -> Any:
        return await self.meta.run(
            lambda: self.meta.db.execute(
                f"SELECT {_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        )

    async def with_hash(self, token_id: str) -> Any:
        row = await self.meta.run(
            lambda: self.meta.db.execute(
                f"SELECT {_COLUMNS}, hash FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        )
        return (tuple(row[:6]), str(row[6])) if row else None

    async def revoke(self, token_id: str, when: float) -> None:
        await self.meta.run(
            lambda: self.meta.db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL", (when, token_id)
            )
        )

    async def verifiers(self, user: str, now: float) -> list[tuple[str, str]]:
        rows = await self.meta.run(
            lambda: self.meta.db.execute(
                "SELECT id, verifier FROM tokens WHERE user = ? AND revoked IS NULL"
                " AND expires > ?",
                (user, now),
            ).fetchall()
        )
        return [(str(r[0]), str(r[1])) for r in rows]


def read_head(path: Path) -> tuple[int, str] | None:
    """(seq, hash) from the head file; None when there is none (or it is not readable)."""
    try:
        data = json.loads(path.read_text())
        return int(data["seq"]), str(data["hash"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return (-1, "")  # present but damaged: verification says so


def write_head(path: Path, seq: int, digest: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"seq": seq, "hash": digest}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SqliteAudit:
    """The audit table in the store's file; its head is a file beside it (`audit.head`)."""

    shared = False  # one proxy writes it: the seq `append` returns is final

    def __init__(self, meta: SqliteHandle, head_path: Path) -> None:
        self.meta = meta
        self.head_path = head_path

    async def open(self) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
        def q() -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
            db = self.meta.db
            db.executescript(AUDIT_SCHEMA)
            row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            return ((int(row[0]), str(row[1])) if row else None), read_head(self.head_path)

        return await self.meta.run(q)

    async def write(
        self, batch: list[tuple[int, float, str, str, str, str, str]]
    ) -> tuple[int, str]:
        def w() -> None:
            db = self.meta.db
            # One fsync per batch: FULL makes this commit durable before the head moves past it.
            db.execute("PRAGMA synchronous=FULL")
            try:
                with db:
                    db.execute("BEGIN")
                    db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
            finally:
                db.execute("PRAGMA synchronous=NORMAL")
            write_head(self.head_path, batch[-1][0], batch[-1][6])

        # The metadata thread runs its calls in order, so batches land in seq order.
        await self.meta.run(w)
        return batch[-1][0], batch[-1][6]

    async def head(self) -> tuple[int, str] | None:
        return read_head(self.head_path)

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
            ("actor = ?", actor), ("json_extract(fields, '$.alias') = ?", alias),
            ("kind = ?", kind), ("ts >= ?", since), ("ts < ?", until),
        ):  # fmt: skip
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return await self.meta.run(lambda: self.meta.db.execute(sql, args).fetchall())

    async def chunk(self, after: int, size: int) -> list[Any]:
        return await self.meta.run(
            lambda: self.meta.db.execute(
                "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, size)
            ).fetchall()
        )


# job_id, alias, ref, team, priority, seq, enqueued, running (metadata_api.QueueTuple)
QueueTuple = tuple[str, str | None, str | None, str | None, int, int, float, bool]

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS build_queue (
    job_id TEXT PRIMARY KEY,      -- the job (jobs.id) that builds it
    alias TEXT,
    ref TEXT,                     -- the git ref its files are read at (NULL: the work tree)
    team TEXT,                    -- the team it is counted against (NULL: none)
    priority INTEGER NOT NULL,    -- 0 interactive, 1 prewarm, 2 ci
    seq INTEGER NOT NULL,         -- order of arrival
    enqueued REAL NOT NULL,
    running INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteQueue:
    """The build queue's rows through the metadata's one SQLite thread."""

    def __init__(self, meta: SqliteHandle) -> None:
        self.meta = meta
        self._made = False

    def _db(self) -> sqlite3.Connection:
        """The connection, with the table made on first use (in the metadata's thread)."""
        if not self._made:
            self.meta.db.executescript(QUEUE_SCHEMA)
            self._made = True
        return self.meta.db

    async def add(self, row: QueueTuple) -> None:
        await self.meta.run(
            lambda: self._db().execute(
                "INSERT OR REPLACE INTO build_queue VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row
            )
        )

    async def started(self, job_id: str) -> None:
        await self.meta.run(
            lambda: self._db().execute(
                "UPDATE build_queue SET running = 1 WHERE job_id = ?", (job_id,)
            )
        )

    async def remove(self, job_id: str) -> None:
        await self.meta.run(
            lambda: self._db().execute("DELETE FROM build_queue WHERE job_id = ?", (job_id,))
        )

    async def pending(self) -> list[QueueTuple]:
        rows = await self.meta.run(
            lambda: (
                self._db()
                .execute(
                    "SELECT job_id, alias, ref, team, priority, seq, enqueued, running"
                    " FROM build_queue ORDER BY seq"
                )
                .fetchall()
            )
        )
        return [
            (r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), float(r[6]), bool(r[7])) for r in rows
        ]

    async def reopen_job(self, job_id: str) -> None:
        await self.meta.run(
            lambda: self._db().execute(
                "UPDATE jobs SET status = 'running', finished = NULL, error = NULL WHERE id = ?",
                (job_id,),
            )
        )
