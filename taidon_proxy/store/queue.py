"""The build queue's rows in the store's metadata: what was waiting or running at a stop."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Protocol

from taidon_proxy.store.metadata import Metadata

SCHEMA = """
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


class Queued(Protocol):
    """What a row is written from (prepare/queue.py's Entry)."""

    @property
    def job_id(self) -> str: ...
    @property
    def alias(self) -> str | None: ...
    @property
    def ref(self) -> str | None: ...
    @property
    def team(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def enqueued(self) -> float: ...


@dataclass(frozen=True)
class QueueRow:
    job_id: str
    alias: str | None
    ref: str | None
    team: str | None
    priority: int
    seq: int
    enqueued: float
    running: bool


class QueueRows:
    """Rows through the metadata's one SQLite thread (the `Durable` of prepare/queue.py)."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self._made = False

    def _db(self) -> sqlite3.Connection:
        """The connection, with the table made on first use (in the metadata's thread)."""
        if not self._made:
            self.meta.db.executescript(SCHEMA)
            self._made = True
        return self.meta.db

    async def add(self, e: Queued) -> None:
        row = (e.job_id, e.alias, e.ref, e.team, int(e.priority), e.seq, e.enqueued)
        await self.meta.run(
            lambda: self._db().execute(
                "INSERT OR REPLACE INTO build_queue VALUES (?, ?, ?, ?, ?, ?, ?, 0)", row
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

    async def pending(self) -> list[QueueRow]:
        """What an earlier proxy left, in order of arrival."""
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
            QueueRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), float(r[6]), bool(r[7]))
            for r in rows
        ]

    async def reopen_job(self, job_id: str) -> None:
        """A resumed job is running again (the restart's reconcile had marked it cut off)."""
        await self.meta.run(
            lambda: self._db().execute(
                "UPDATE jobs SET status = 'running', finished = NULL, error = NULL WHERE id = ?",
                (job_id,),
            )
        )
