"""The audit log's storage: an append-only, hash-chained table in the metadata, and its head.

Each record is (seq, time, kind, actor, fields, prev_hash, hash) with
hash = SHA-256(prev_hash || canonical JSON of the record without its hash). Records are
appended in batches (one transaction, made durable with one fsync, then the head file is
replaced), never one write per record. The head file (`audit.head`, beside the database)
keeps the last seq and hash outside the table, so a cut tail is seen too. The tables are
the metadata backend's (store/sqlite_tables.py; store/pg_tables.py, where gateways share
one chain and the head is a row: docs/kubernetes-metadata.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from taidon_proxy.store.metadata_api import AuditRow, MetadataStore

log = structlog.get_logger("taidon.audit")

GENESIS = "0" * 64  # the prev_hash of record 1
FLUSH_INTERVAL = 0.2  # seconds a record may wait in memory before its batch is written
FLUSH_BATCH = 500  # a batch this large is written at once
EXPORT_CHUNK = 1000


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


def _from_row(r: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(int(r[0]), float(r[1]), str(r[2]), str(r[3]), json.loads(r[4]), r[5], r[6])


def _chain(seq: int, ts: float, kind: str, actor: str, fields_text: str, prev_hash: str) -> str:
    """record_hash from the fields' canonical text, laid out without a second encoding."""
    body = (
        f'{{"actor":{canonical(actor)},"fields":{fields_text},"kind":{canonical(kind)},'
        f'"prev_hash":{canonical(prev_hash)},"seq":{seq},"time":{canonical(ts)}}}'
    )
    return hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()


def rechain(batch: list[AuditRow], after: tuple[int, str]) -> list[AuditRow]:
    """The batch's records numbered and hashed to follow record `after` (seq, hash): how a
    batch is chained before its write, and how a writer sharing the table with others
    places its batch after theirs."""
    seq, prev = after
    out: list[AuditRow] = []
    for _, ts, kind, actor, text, _, _ in batch:
        seq += 1
        digest = _chain(seq, ts, kind, actor, text, prev)
        out.append((seq, ts, kind, actor, text, prev, digest))
        prev = digest
    return out


MAX_PENDING = 100_000  # records held while a shared table cannot be written; older ones go


class AuditLog:
    """Appends from the event loop without waiting; batches go to the metadata's audit table."""

    def __init__(self, meta: MetadataStore, head_path: Path) -> None:
        self.meta = meta
        self.head_path = head_path
        self.table = meta.audit_table(head_path)
        self._seq = 0
        self._hash = GENESIS
        self._pending: list[AuditRow] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._opened = False

    async def open(self) -> None:
        """Create the table; continue the chain from its last record, or from the head file
        when that is further on (a cut tail then stays visible as a gap)."""
        last, head = await self.table.open()
        self._seq, self._hash = last if last is not None else (0, GENESIS)
        if head is not None and head[0] > self._seq:
            log.error("audit.tail_missing", last_seq=self._seq, head_seq=head[0])
            self._seq, self._hash = head
        self._opened = True

    def append(self, kind: str, actor: str, fields: Mapping[str, Any], ts: float) -> int:
        """Chain one record now (its seq is returned); it is written with the next batch.
        On a shared table the seq is provisional: the write places it after the others'."""
        if not self._opened:
            raise RuntimeError("AuditLog.open() first")
        text = canonical(fields)  # raises for what JSON cannot hold: our bug, said at once
        self._seq += 1
        # Hashed once per batch when it is written (a connection's record costs one encoding).
        self._pending.append((self._seq, ts, kind, actor, text, "", ""))
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
        if not batch[-1][5]:  # not chained yet (a shared table chains again as it writes)
            batch = rechain(batch, (batch[0][0] - 1, self._hash))
            self._hash = batch[-1][6]
        task = asyncio.ensure_future(self._write(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _write(self, batch: list[AuditRow]) -> None:
        try:
            last = await self.table.write(batch)
        except Exception as e:
            log.error("audit.write_failed", error=str(e), records=len(batch))
            if self.table.shared and self._opened:
                # Chained again at the next write, after whatever others wrote meanwhile.
                self._pending = (batch + self._pending)[-MAX_PENDING:]
                if self._timer is None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(FLUSH_INTERVAL * 5, self._start_flush)
            return
        if self.table.shared and not self._pending:
            self._seq, self._hash = last  # the chain as written, others' records included

    async def flush(self) -> None:
        """Everything appended so far is written (and durable) when this returns."""
        self._start_flush()
        if self._flushing:
            await asyncio.gather(*list(self._flushing), return_exceptions=True)

    async def close(self) -> None:
        if self._opened:
            await self.flush()
            self._opened = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    @property
    def last_seq(self) -> int:
        return self._seq

    # --- reading ----------------------------------------------------------------------------

    async def query(self, f: AuditFilter) -> list[AuditRecord]:
        """The newest `limit` records that match, oldest first."""
        await self.flush()
        rows = await self.table.query(
            actor=f.actor, alias=f.alias, kind=f.kind, since=f.since, until=f.until,
            limit=f.limit,
        )  # fmt: skip
        return [_from_row(r) for r in reversed(rows)]

    async def chunk(self, after: int, size: int = EXPORT_CHUNK) -> list[AuditRecord]:
        """Records with seq > after, in order, at most `size` (export pages through these)."""
        return [_from_row(r) for r in await self.table.chunk(after, size)]

    async def verify(self) -> Verification:
        await self.flush()
        head = await self.table.head()
        head_seq, head_hash = head if head is not None else (None, None)
        expected, prev, count = 1, GENESIS, 0
        hashes: dict[int, str] = {}
        broken: tuple[int, str] | None = None
        after: int | None = None
        while True:
            raws = await self.table.chunk(-(2**62) if after is None else after, EXPORT_CHUNK)
            if not raws:
                break
            after = int(raws[-1][0])
            for raw in raws:
                count += 1
                if broken is not None:
                    continue  # count the rest; the first break is the one named
                broken = self._check(raw, expected, prev)
                if broken is None:
                    prev = str(raw[6])
                    if head_seq is not None and expected == head_seq:
                        hashes[expected] = prev
                    expected += 1
        last = expected - 1
        if broken is None:
            broken = self._check_head(last, head, hashes)
        return Verification(
            ok=broken is None, records=count, last_seq=last, head_seq=head_seq,
            head_hash=head_hash, broken_seq=broken[0] if broken else None,
            reason=broken[1] if broken else None,
        )  # fmt: skip

    @staticmethod
    def _check(raw: tuple[Any, ...], expected: int, prev: str) -> tuple[int, str] | None:
        try:
            rec = _from_row(raw)
        except (ValueError, TypeError):
            return (int(raw[0]), "its fields are not valid JSON")
        if rec.seq != expected:  # seq is the key: only a gap can show here
            return (expected, f"record {expected} is missing (the next one is {rec.seq})")
        if rec.prev_hash != prev:
            return (rec.seq, "its prev_hash is not the hash of the record before it")
        if record_hash(rec.seq, rec.time, rec.kind, rec.actor, rec.fields, prev) != rec.hash:
            return (rec.seq, "its content does not match its hash (edited)")
        return None

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
