"""The audit chain: hashes, batches, verification naming the first broken seq, a restart."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taidon_proxy.services.audit import Audit, parse_time
from taidon_proxy.services.errors import Refusal
from taidon_proxy.store.audit import GENESIS, AuditLog, _chain, canonical, record_hash
from taidon_proxy.store.metadata import Metadata

pytestmark = pytest.mark.unit


async def opened(store: Path) -> tuple[Metadata, AuditLog, Audit]:
    meta = Metadata(store / "meta.sqlite")
    await meta.open()
    log = AuditLog(meta, store / "audit.head")
    await log.open()
    return meta, log, Audit(log, clock=lambda: 1_700_000_000.25)


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[tuple[Metadata, AuditLog, Audit]]:
    meta, log, audit = await opened(tmp_path)
    try:
        yield meta, log, audit
    finally:
        await log.close()
        await meta.close()


def tamper(path: Path, *sql: str) -> None:
    """What anyone with write access to the file can do: drop the guards, change rows."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
        for statements in sql:
            for statement in statements.split(";"):
                db.execute(statement)
    finally:
        db.close()


async def fill(audit: Audit, n: int) -> None:
    for i in range(n):
        audit.record("connection", actor=f"u{i % 3}", alias="shop", bytes_in=i)


def test_hash_is_sha256_of_prev_and_canonical_record() -> None:
    fields = {"b": 1, "a": "x"}
    body = {"seq": 1, "time": 1.5, "kind": "reset", "actor": "admin", "fields": fields,
            "prev_hash": GENESIS}  # fmt: skip
    expected = hashlib.sha256(
        GENESIS.encode()
        + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert record_hash(1, 1.5, "reset", "admin", fields, GENESIS) == expected
    assert record_hash(1, 1.5, "reset", "admin", {"a": "x", "b": 1}, GENESIS) == expected
    assert record_hash(1, 1.5, "reset", "admin", {"a": "y", "b": 1}, GENESIS) != expected
    assert record_hash(2, 1.5, "reset", "admin", fields, GENESIS) != expected
    assert canonical({"é": 1}) == '{"é":1}'


async def test_records_chain_and_verify(chain: tuple[Metadata, AuditLog, Audit]) -> None:
    _, log, audit = chain
    await fill(audit, 1200)  # more than one batch
    result = await audit.verify()
    assert result.ok and result.records == 1200 and result.last_seq == 1200
    assert result.head_seq == 1200
    rows = await log.chunk(0, 5000)
    assert [r.seq for r in rows] == list(range(1, 1201))
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert result.head_hash == rows[-1].hash


async def test_append_only_guards(chain: tuple[Metadata, AuditLog, Audit]) -> None:
    meta, log, audit = chain
    await fill(audit, 3)
    await log.flush()
    for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            await meta.run(meta.db.execute, sql)


@pytest.mark.parametrize(
    ("sql", "seq", "reason"),
    [
        ("UPDATE audit SET fields = json_set(fields, '$.bytes_in', 999) WHERE seq = 7", 7,
         "edited"),
        ("UPDATE audit SET actor = 'mallory' WHERE seq = 3", 3, "edited"),
        ("DELETE FROM audit WHERE seq = 5", 5, "missing"),
        # Reordered: records 4 and 6 swap places (each keeps its own hashes).
        ("UPDATE audit SET seq = -4 WHERE seq = 4; UPDATE audit SET seq = 4 WHERE seq = 6;"
         " UPDATE audit SET seq = 6 WHERE seq = -4", 4, "prev_hash"),
        ("DELETE FROM audit WHERE seq > 8", 9, "missing from the end"),
        ("UPDATE audit SET hash = 'ab' || substr(hash, 3) WHERE seq = 10", 10, ""),
    ],
)  # fmt: skip
async def test_tampering_names_first_broken_seq(
    tmp_path: Path, sql: str, seq: int, reason: str
) -> None:
    meta, log, audit = await opened(tmp_path)
    await fill(audit, 10)
    await log.close()
    await meta.close()
    tamper(tmp_path / "meta.sqlite", sql)
    meta, log, audit = await opened(tmp_path)
    try:
        result = await audit.verify()
        assert not result.ok
        assert result.broken_seq == seq, result
        assert reason in (result.reason or "")
    finally:
        await log.close()
        await meta.close()


async def test_restart_continues_the_chain(tmp_path: Path) -> None:
    meta, log, audit = await opened(tmp_path)
    await fill(audit, 4)
    await log.close()
    await meta.close()
    meta, log, audit = await opened(tmp_path)
    assert audit.record("reset", actor="admin", alias="shop") == 5
    result = await audit.verify()
    await log.close()
    await meta.close()
    assert result.ok and result.last_seq == 5


async def test_a_cut_tail_stays_visible_after_a_restart(tmp_path: Path) -> None:
    meta, log, audit = await opened(tmp_path)
    await fill(audit, 6)
    await log.close()
    await meta.close()
    tamper(tmp_path / "meta.sqlite", "DELETE FROM audit WHERE seq > 4")
    meta, log, audit = await opened(tmp_path)
    # The chain goes on from the head file: 7 follows the missing 5 and 6.
    assert audit.record("reset", actor="admin") == 7
    result = await audit.verify()
    await log.close()
    await meta.close()
    assert not result.ok and result.broken_seq == 5 and "missing" in (result.reason or "")


async def test_missing_head_file_is_reported(tmp_path: Path) -> None:
    meta, log, audit = await opened(tmp_path)
    await fill(audit, 2)
    await log.flush()
    (tmp_path / "audit.head").unlink()
    result = await audit.verify()
    await log.close()
    await meta.close()
    assert not result.ok and result.broken_seq == 2 and "head file is missing" in str(result.reason)


async def test_query_filters(chain: tuple[Metadata, AuditLog, Audit]) -> None:
    _, _, audit = chain
    await fill(audit, 9)
    audit.record("reset", actor="admin", alias="billing")
    assert [r["seq"] for r in await audit.query(user="u1")] == [2, 5, 8]
    assert [r["seq"] for r in await audit.query(alias="billing")] == [10]
    assert [r["seq"] for r in await audit.query(kind="reset")] == [10]
    assert [r["seq"] for r in await audit.query(limit=2)] == [9, 10]
    assert await audit.query(since="1700000001") == []
    assert len(await audit.query(until="2030-01-01T00:00:00")) == 10
    with pytest.raises(Refusal, match="kind: unknown kind 'nope'"):
        await audit.query(kind="nope")
    with pytest.raises(Refusal, match="limit"):
        await audit.query(limit=0)
    with pytest.raises(Refusal, match="since: not a time"):
        await audit.query(since="yesterday")


async def test_export_pages_in_order(chain: tuple[Metadata, AuditLog, Audit]) -> None:
    _, _, audit = chain
    await fill(audit, 2500)
    seqs = [r["seq"] async for page in audit.export() for r in page]
    assert seqs == list(range(1, 2501))


async def test_secret_fields_and_unknown_kinds_are_refused(
    chain: tuple[Metadata, AuditLog, Audit],
) -> None:
    _, _, audit = chain
    for name in ("password", "token", "scram_proof", "client_secret"):
        with pytest.raises(ValueError, match="secrets"):
            audit.record("connection", actor="u", **{name: "x"})
    with pytest.raises(ValueError, match="unknown audit kind"):
        audit.record("whatever", actor="u")
    assert (await audit.verify()).records == 0


def test_parse_time_forms() -> None:
    assert parse_time("since", "90s", 1000.0) == 910.0
    assert parse_time("since", "2h", 10_000.0) == 2800.0
    assert parse_time("since", "1700000000.5", 0) == 1700000000.5
    assert parse_time("since", "2023-11-14T22:13:20", 0) == 1700000000.0
    assert parse_time("since", "2023-11-14T23:13:20+01:00", 0) == 1700000000.0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@given(
    fields=st.dictionaries(st.text(), _json, max_size=5),
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    actor=st.text(),
    seq=st.integers(min_value=1, max_value=2**53),
)
def test_writer_side_chain_equals_the_documented_hash(
    fields: dict[str, object], ts: float, actor: str, seq: int
) -> None:
    # The writer lays out the record around the fields' text; verify re-encodes it whole.
    assert _chain(seq, ts, "connection", actor, canonical(fields), GENESIS) == record_hash(
        seq, ts, "connection", actor, fields, GENESIS
    )
