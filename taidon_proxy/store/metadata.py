"""State metadata in SQLite (WAL), accessed through one thread so the loop never blocks."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from taidon_proxy.store.sqlite_tables import SqliteAudit, SqliteQueue, SqliteTokens

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    id TEXT PRIMARY KEY,
    parent TEXT,
    kind TEXT NOT NULL,          -- initdb | root | psql | lb | snapshot
    alias TEXT,
    label TEXT NOT NULL,         -- what the step was, for people (file name, changeset id)
    backend TEXT NOT NULL,
    engine TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    use_count INTEGER NOT NULL DEFAULT 0,
    build_seconds REAL NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    clean INTEGER NOT NULL DEFAULT 1   -- taken from a cleanly stopped server
);
CREATE INDEX IF NOT EXISTS states_parent ON states(parent);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    state_id TEXT NOT NULL REFERENCES states(id)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    recipe_key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state_id TEXT NOT NULL,
    inputs TEXT NOT NULL,        -- JSON list of the input files that fingerprint covers
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    alias TEXT,
    status TEXT NOT NULL,        -- running | succeeded | failed
    started REAL NOT NULL,
    finished REAL,
    target TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS shared_instances (
    key TEXT PRIMARY KEY,        -- ALIAS:LABEL, or state:STATE_ID:LABEL
    alias TEXT,
    label TEXT NOT NULL,
    state_ref TEXT,              -- the state a state: route named (NULL for an alias route)
    state_id TEXT NOT NULL,      -- the state the clone was made from
    clone_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,          -- the clone's directory (the data directory is pgdata/ in it)
    created REAL NOT NULL,
    last_used REAL NOT NULL,     -- when its last connection closed (or it was started)
    status TEXT NOT NULL         -- running | stopped
);
-- How each state id was derived (DESIGN §5): facts about ids, true forever, so kept when the
-- state goes. A bundle's manifest lists its state's chain from these; an import adds the chain.
CREATE TABLE IF NOT EXISTS links (
    id TEXT PRIMARY KEY,
    parent TEXT,                 -- NULL for an initdb state (its id comes from engine + settings)
    kind TEXT NOT NULL,
    step_hash TEXT,
    label TEXT NOT NULL
);
-- What made each state (docs/provenance.md): a JSON record per state id, the first build's
-- (ids are content-addressed), kept like links when the state goes; bundles carry them.
CREATE TABLE IF NOT EXISTS provenance (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


@dataclass(frozen=True)
class StateRow:
    id: str
    parent: str | None
    kind: str
    alias: str | None
    label: str
    backend: str
    engine: str
    created: float
    last_used: float
    use_count: int
    build_seconds: float
    size_bytes: int
    pinned: bool
    clean: bool


@dataclass(frozen=True)
class StateLink:
    """id = step_state_id(parent, kind, step_hash); an initdb state has no parent."""

    id: str
    parent: str | None
    kind: str
    step_hash: str | None
    label: str


@dataclass(frozen=True)
class SharedRecord:
    """A shared instance's clone, kept across idle periods and restarts until reset or rm."""

    key: str
    alias: str | None
    label: str
    state_ref: str | None
    state_id: str
    clone_id: str
    path: str
    created: float
    last_used: float
    status: str  # running | stopped


def _row(r: tuple[Any, ...]) -> StateRow:
    return StateRow(
        id=r[0], parent=r[1], kind=r[2], alias=r[3], label=r[4], backend=r[5], engine=r[6],
        created=r[7], last_used=r[8], use_count=r[9], build_seconds=r[10], size_bytes=r[11],
        pinned=bool(r[12]), clean=bool(r[13]),
    )  # fmt: skip


def _owned(fn: Callable[..., T], *args: Any) -> T:
    """Call fn on the SQLite thread; a cursor it returns is closed there, never handed out.

    A cursor freed on another thread resets its cached statement from that thread, racing
    the next use of the same statement here (SQLite answers "bad parameter or other API
    misuse").
    """
    out = fn(*args)
    if isinstance(out, sqlite3.Cursor):
        out.close()
        return cast(T, None)
    return out


class Metadata:
    """All SQLite access goes through `run`, on one thread that owns the connection."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taidon-sqlite")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self.run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self.run(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _owned, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "Metadata.open() first"
        return self._db

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def token_table(self) -> SqliteTokens:
        return SqliteTokens(self)

    def audit_table(self, head_path: Path) -> SqliteAudit:
        return SqliteAudit(self, head_path)

    def queue_table(self) -> SqliteQueue:
        return SqliteQueue(self)

    # --- states -----------------------------------------------------------------------------

    async def get_state(self, state_id: str) -> StateRow | None:
        rows = await self.run(self._select, "WHERE id = ?", (state_id,))
        return rows[0] if rows else None

    async def states(self) -> list[StateRow]:
        return await self.run(self._select, "ORDER BY created", ())

    def _select(self, where: str, args: Sequence[object]) -> list[StateRow]:
        cur = self.db.execute(f"SELECT * FROM states {where}", args)
        return [_row(r) for r in cur.fetchall()]

    async def add_state(self, row: StateRow) -> None:
        def add() -> None:
            self.db.execute(
                "INSERT OR REPLACE INTO states VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.id, row.parent, row.kind, row.alias, row.label, row.backend, row.engine,
                    row.created, row.last_used, row.use_count, row.build_seconds, row.size_bytes,
                    int(row.pinned), int(row.clean),
                ),
            )  # fmt: skip

        await self.run(add)

    async def set_size(self, state_id: str, size: int) -> None:
        await self.run(
            lambda: self.db.execute(
                "UPDATE states SET size_bytes = ? WHERE id = ?", (size, state_id)
            )
        )

    async def touch_state(self, state_id: str) -> None:
        await self.run(
            lambda: self.db.execute(
                "UPDATE states SET last_used = ?, use_count = use_count + 1 WHERE id = ?",
                (time.time(), state_id),
            )
        )

    async def remove_state(self, state_id: str) -> None:
        def rm() -> None:
            self.db.execute("DELETE FROM names WHERE state_id = ?", (state_id,))
            self.db.execute("DELETE FROM fingerprints WHERE state_id = ?", (state_id,))
            self.db.execute("DELETE FROM states WHERE id = ?", (state_id,))

        await self.run(rm)

    async def children(self, state_id: str) -> list[str]:
        return await self.run(
            lambda: [
                r[0] for r in self.db.execute("SELECT id FROM states WHERE parent = ?", (state_id,))
            ]
        )

    async def set_pinned(self, state_id: str, pinned: bool) -> None:
        await self.run(
            lambda: self.db.execute(
                "UPDATE states SET pinned = ? WHERE id = ?", (int(pinned), state_id)
            )
        )

    # --- links (how ids were derived) ------------------------------------------------------

    async def add_links(self, links: Sequence[StateLink]) -> None:
        await self.run(
            lambda: self.db.executemany(
                "INSERT OR IGNORE INTO links VALUES (?, ?, ?, ?, ?)",
                [(k.id, k.parent, k.kind, k.step_hash, k.label) for k in links],
            )
        )

    async def link(self, state_id: str) -> StateLink | None:
        row = await self.run(
            lambda: self.db.execute(
                "SELECT id, parent, kind, step_hash, label FROM links WHERE id = ?", (state_id,)
            ).fetchone()
        )
        return StateLink(*row) if row else None

    async def child_links(self, parent: str) -> list[StateLink]:
        """Every id ever derived from `parent` (states kept or gone), oldest rows first."""
        rows = await self.run(
            lambda: self.db.execute(
                "SELECT id, parent, kind, step_hash, label FROM links WHERE parent = ?"
                " ORDER BY rowid",
                (parent,),
            ).fetchall()
        )
        return [StateLink(*r) for r in rows]

    # --- provenance (what made each state) -------------------------------------------------

    async def add_provenance(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        await self.run(
            lambda: self.db.executemany(
                "INSERT OR IGNORE INTO provenance VALUES (?, ?)",
                [(k, json.dumps(v, sort_keys=True)) for k, v in records.items()],
            )
        )

    async def provenance(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The records of those state ids that have one."""

        def q() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for i in range(0, len(ids), 500):
                part = list(ids[i : i + 500])
                marks = ",".join("?" * len(part))
                for k, v in self.db.execute(
                    f"SELECT id, record FROM provenance WHERE id IN ({marks})", part
                ):
                    out[str(k)] = json.loads(v)
            return out

        return await self.run(q)

    # --- shared instances (their clones outlive servers and restarts) -----------------------

    async def put_shared(self, rec: SharedRecord) -> None:
        row = (
            rec.key, rec.alias, rec.label, rec.state_ref, rec.state_id, rec.clone_id, rec.path,
            rec.created, rec.last_used, rec.status,
        )  # fmt: skip
        await self.run(
            lambda: self.db.execute(
                "INSERT OR REPLACE INTO shared_instances VALUES (?,?,?,?,?,?,?,?,?,?)", row
            )
        )

    async def shared_instances(self) -> list[SharedRecord]:
        return await self.run(
            lambda: [
                SharedRecord(*r)
                for r in self.db.execute("SELECT * FROM shared_instances ORDER BY created")
            ]
        )

    async def remove_shared(self, key: str, clone_id: str) -> None:
        """Forget a record, only if it still names that clone (a newer one may have replaced it)."""
        await self.run(
            lambda: self.db.execute(
                "DELETE FROM shared_instances WHERE key = ? AND clone_id = ?", (key, clone_id)
            )
        )

    # --- names ------------------------------------------------------------------------------

    async def set_name(self, name: str, state_id: str) -> None:
        await self.run(
            lambda: self.db.execute("INSERT OR REPLACE INTO names VALUES (?, ?)", (name, state_id))
        )

    async def names(self) -> dict[str, str]:
        return await self.run(lambda: dict(self.db.execute("SELECT name, state_id FROM names")))

    async def resolve_state(self, ref: str) -> list[str]:
        """State ids matching a name exactly, else an id prefix (may be several: ambiguous)."""

        def find() -> list[str]:
            row = self.db.execute("SELECT state_id FROM names WHERE name = ?", (ref,)).fetchone()
            if row:
                return [str(row[0])]
            if not ref or any(c not in "0123456789abcdef" for c in ref.lower()):
                return []
            cur = self.db.execute(
                "SELECT id FROM states WHERE id LIKE ? ORDER BY id LIMIT 10", (ref.lower() + "%",)
            )
            return [str(r[0]) for r in cur]

        return await self.run(find)

    # --- fingerprints (fast path) -----------------------------------------------------------

    async def fingerprint(self, recipe_key: str) -> tuple[str, str, list[str]] | None:
        """(fingerprint, final state id, input files) remembered for a recipe, if any."""
        row = await self.run(
            lambda: self.db.execute(
                "SELECT fingerprint, state_id, inputs FROM fingerprints WHERE recipe_key = ?",
                (recipe_key,),
            ).fetchone()
        )
        return (str(row[0]), str(row[1]), list(json.loads(row[2]))) if row else None

    async def set_fingerprint(
        self, recipe_key: str, fingerprint: str, state_id: str, inputs: list[str]
    ) -> None:
        await self.run(
            lambda: self.db.execute(
                "INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?, ?)",
                (recipe_key, fingerprint, state_id, json.dumps(inputs), time.time()),
            )
        )

    # --- jobs -------------------------------------------------------------------------------

    async def add_job(self, job_id: str, alias: str | None, started: float) -> None:
        await self.run(
            lambda: self.db.execute(
                "INSERT INTO jobs (id, alias, status, started) VALUES (?, ?, 'running', ?)",
                (job_id, alias, started),
            )
        )

    async def finish_job(
        self, job_id: str, status: str, target: str | None, error: str | None
    ) -> None:
        await self.run(
            lambda: self.db.execute(
                "UPDATE jobs SET status = ?, finished = ?, target = ?, error = ? WHERE id = ?",
                (status, time.time(), target, error, job_id),
            )
        )

    async def fail_running_jobs(self, error: str) -> int:
        """After a restart: jobs still marked running were cut off; say so."""

        def q() -> int:
            cur = self.db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ?"
                " WHERE status = 'running'",
                (time.time(), error),
            )
            return cur.rowcount

        return await self.run(q)

    async def add_job_events(self, job_id: str, events: list[tuple[int, float, str, str]]) -> None:
        await self.run(
            lambda: self.db.executemany(
                "INSERT OR IGNORE INTO job_events VALUES (?, ?, ?, ?, ?)",
                [(job_id, *e) for e in events],
            )
        )

    async def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        def q() -> list[dict[str, Any]]:
            cur = self.db.execute("SELECT * FROM jobs ORDER BY started DESC LIMIT ?", (limit,))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur]

        return await self.run(q)

    async def job_events(self, job_id: str, after: int = -1) -> list[tuple[int, float, str, str]]:
        return await self.run(
            lambda: [
                (int(r[0]), float(r[1]), str(r[2]), str(r[3]))
                for r in self.db.execute(
                    "SELECT seq, ts, kind, message FROM job_events WHERE job_id = ? AND seq > ?"
                    " ORDER BY seq",
                    (job_id, after),
                )
            ]
        )
