"""The audit log's storage: an append-only, hash-chained table in the metadata, and its head.

Each record is (seq, time, kind, actor, fields, prev_hash, hash) with
hash = SHA-256(prev_hash || canonical JSON of the record without its hash). Records are
appended in batches (one transaction, made durable with one fsync, then the head file is
replaced), never one write per record. The head file (`audit.head`, beside the database)
keeps the last seq and hash outside the table, so a cut tail is seen too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from taidon_proxy.store.metadata import Metadata

log = structlog.get_logger("taidon.audit")

GENESIS = "0" * 64  # the prev_hash of record 1
FLUSH_INTERVAL = 0.2  # seconds a record may wait in memory before its batch is written
FLUSH_BATCH = 500  # a batch this large is written at once
EXPORT_CHUNK = 1000

SCHEMA = """
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


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: float
    kind: str
    actor: str
    fields: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "time": self.time, "kind": self.kind, "actor": self.actor,
            "fields": self.fields, "prev_hash": self.prev_hash, "hash": self.hash,
        }  # fmt: skip


@dataclass(frozen=True)
class Verification:
    """The chain walked from record 1: `broken_seq` is the first record that fails."""

    ok: bool
    records: int
    last_seq: int
    head_seq: int | None  # what the head file says (None: no head file)
    head_hash: str | None
    broken_seq: int | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "records": self.records, "last_seq": self.last_seq,
            "head_seq": self.head_seq, "head_hash": self.head_hash,
            "broken_seq": self.broken_seq, "reason": self.reason,
        }  # fmt: skip


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    alias: str | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


def canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(
    seq: int, ts: float, kind: str, actor: str, fields: Mapping[str, Any], prev_hash: str
) -> str:
    body = canonical(
        {"seq": seq, "time": ts, "kind": kind, "actor": actor, "fields": fields,
         "prev_hash": prev_hash}
    )  # fmt: skip
    return hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()


def _chain(seq: int, ts: float, kind: str, actor: str, fields_text: str, prev_hash: str) -> str:
    """record_hash from the fields' canonical text, laid out without a second encoding."""
    body = (
        f'{{"actor":{canonical(actor)},"fields":{fields_text},"kind":{canonical(kind)},'
        f'"prev_hash":{canonical(prev_hash)},"seq":{seq},"time":{canonical(ts)}}}'
    )
    return hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()


def _from_row(r: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(int(r[0]), float(r[1]), str(r[2]), str(r[3]), json.loads(r[4]), r[5], r[6])


def read_head(path: Path) -> tuple[int, str] | None:
    """(seq, hash) from the head file; None when there is none (or it is not readable)."""
    try:
        data = json.loads(path.read_text())
        return int(data["seq"]), str(data["hash"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return (-1, "")  # present but damaged: verification says so


def _write_head(path: Path, seq: int, digest: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"seq": seq, "hash": digest}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AuditLog:
    """Appends from the event loop without waiting; batches go through the metadata thread."""

    def __init__(self, meta: Metadata, head_path: Path) -> None:
        self.meta = meta
        self.head_path = head_path
        self._seq = 0
        self._hash = GENESIS
        self._pending: list[tuple[int, float, str, str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._opened = False

    async def open(self) -> None:
        """Create the table; continue the chain from its last record, or from the head file
        when that is further on (a cut tail then stays visible as a gap)."""
        last, head = await self.meta.run(self._open_sync)
        self._seq, self._hash = last
        if head is not None and head[0] > last[0]:
            log.error("audit.tail_missing", last_seq=last[0], head_seq=head[0])
            self._seq, self._hash = head
        self._opened = True

    def _open_sync(self) -> tuple[tuple[int, str], tuple[int, str] | None]:
        db = self.meta.db
        db.executescript(SCHEMA)
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return ((int(row[0]), str(row[1])) if row else (0, GENESIS)), read_head(self.head_path)

    def append(self, kind: str, actor: str, fields: Mapping[str, Any], ts: float) -> int:
        """Chain one record now (its seq is returned); it is written with the next batch."""
        if not self._opened:
            raise RuntimeError("AuditLog.open() first")
        text = canonical(fields)  # raises for what JSON cannot hold: our bug, said at once
        self._seq += 1
        # Chained on the metadata thread, batch by batch in seq order (off the event loop).
        self._pending.append((self._seq, ts, kind, actor, text))
        if len(self._pending) >= FLUSH_BATCH:
            self._start_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._start_flush)
        return self._seq

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        # The metadata thread runs its calls in order, so batches land in seq order.
        task = asyncio.ensure_future(self.meta.run(self._write, batch))
        self._flushing.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("audit.write_failed", error=str(task.exception()))

    def _write(self, pending: list[tuple[int, float, str, str, str]]) -> None:
        batch = []
        prev = self._hash
        for seq, ts, kind, actor, text in pending:
            digest = _chain(seq, ts, kind, actor, text, prev)
            batch.append((seq, ts, kind, actor, text, prev, digest))
            prev = digest
        self._hash = prev
        db = self.meta.db
        # One fsync per batch: FULL makes this commit durable before the head moves past it.
        db.execute("PRAGMA synchronous=FULL")
        try:
            with db:
                db.execute("BEGIN")
                db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
        finally:
            db.execute("PRAGMA synchronous=NORMAL")
        _write_head(self.head_path, batch[-1][0], batch[-1][6])

    async def flush(self) -> None:
        """Everything appended so far is written (and durable) when this returns."""
        self._start_flush()
        if self._flushing:
            await asyncio.gather(*list(self._flushing), return_exceptions=True)

    async def close(self) -> None:
        if self._opened:
            await self.flush()
            self._opened = False

    @property
    def last_seq(self) -> int:
        return self._seq

    # --- reading ----------------------------------------------------------------------------

    async def query(self, f: AuditFilter) -> list[AuditRecord]:
        """The newest `limit` records that match, oldest first."""
        await self.flush()
        where: list[str] = []
        args: list[object] = []
        if f.actor is not None:
            where.append("actor = ?")
            args.append(f.actor)
        if f.alias is not None:
            where.append("json_extract(fields, '$.alias') = ?")
            args.append(f.alias)
        if f.kind is not None:
            where.append("kind = ?")
            args.append(f.kind)
        if f.since is not None:
            where.append("ts >= ?")
            args.append(f.since)
        if f.until is not None:
            where.append("ts < ?")
            args.append(f.until)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(f.limit)
        rows = await self.meta.run(lambda: self.meta.db.execute(sql, args).fetchall())
        return [_from_row(r) for r in reversed(rows)]

    async def chunk(self, after: int, size: int = EXPORT_CHUNK) -> list[AuditRecord]:
        """Records with seq > after, in order, at most `size` (export pages through these)."""
        rows = await self.meta.run(
            lambda: self.meta.db.execute(
                "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, size)
            ).fetchall()
        )
        return [_from_row(r) for r in rows]

    async def verify(self) -> Verification:
        await self.flush()
        return await self.meta.run(self._verify_sync)

    def _verify_sync(self) -> Verification:
        head = read_head(self.head_path)
        head_seq, head_hash = head if head is not None else (None, None)
        expected, prev, count = 1, GENESIS, 0
        hashes: dict[int, str] = {}
        broken: tuple[int, str] | None = None
        cur = self.meta.db.execute("SELECT * FROM audit ORDER BY seq")
        for raw in cur:
            count += 1
            if broken is not None:
                continue  # count the rest; the first break is the one named
            try:
                rec = _from_row(raw)
            except (ValueError, TypeError):
                broken = (int(raw[0]), "its fields are not valid JSON")
                continue
            if rec.seq != expected:  # seq is the key: only a gap can show here
                broken = (expected, f"record {expected} is missing (the next one is {rec.seq})")
            elif rec.prev_hash != prev:
                broken = (rec.seq, "its prev_hash is not the hash of the record before it")
            elif record_hash(rec.seq, rec.time, rec.kind, rec.actor, rec.fields, prev) != rec.hash:
                broken = (rec.seq, "its content does not match its hash (edited)")
            else:
                prev = rec.hash
                expected += 1
                if head_seq is not None and rec.seq == head_seq:
                    hashes[rec.seq] = rec.hash
        last = expected - 1
        if broken is None:
            broken = self._check_head(last, head, hashes)
        return Verification(
            ok=broken is None, records=count, last_seq=last, head_seq=head_seq,
            head_hash=head_hash, broken_seq=broken[0] if broken else None,
            reason=broken[1] if broken else None,
        )  # fmt: skip

    def _check_head(
        self, last: int, head: tuple[int, str] | None, hashes: dict[int, str]
    ) -> tuple[int, str] | None:
        if head is None:
            if last == 0:
                return None
            return (last, "the head file is missing: a cut tail could not be seen")
        seq, digest = head
        if seq < 0:
            return (last, "the head file is damaged")
        if seq > last:
            return (last + 1, f"records {last + 1}..{seq} are missing from the end (head: {seq})")
        if seq > 0 and hashes.get(seq) != digest:
            return (seq, "it does not match the head file's hash")
        # seq < last: the head lags the table (a crash between commit and head): not a break.
        return None
