"""Gateways sharing one Postgres metadata database (a real Postgres 15): migrations, two
proxies with their own stores seeing each other's names, pins, tokens, audit records and
shared instances, and two audit writers keeping one chain. A restart and an outage:
test_metadata_restart.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from taidon_proxy.errors import ConfigError
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.states import set_pinned
from taidon_proxy.store.audit import AuditFilter, AuditLog
from taidon_proxy.store.metadata_api import MetadataOpenError
from taidon_proxy.store.metadata_pg import PgMetadata
from taidon_proxy.store.pg_migrate import migrations
from taidon_proxy.store.tokens import TokenStore
from tests.conftest import ProxyFactory, RunningProxy, free_port
from tests.metadata_pg_server import gateway, metadata_dsn, metadata_server, one

pytestmark = pytest.mark.integration
__all__ = ["metadata_dsn", "metadata_server"]  # fixtures


def pg(p: RunningProxy) -> PgMetadata:
    assert isinstance(p.proxy.meta, PgMetadata)
    return p.proxy.meta


# --- migrations ---------------------------------------------------------------------------


async def versions(dsn: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(int(r[0]), str(r[1])) for r in rows]
    finally:
        await conn.close()


async def test_migrations_fresh_reopen_concurrent_and_a_newer_schema(metadata_dsn: str) -> None:
    known = [(m.version, m.name) for m in migrations()]
    assert known[:3] == [(1, "states"), (2, "tokens"), (3, "audit")]
    # Two gateways starting at once on an empty database: each migration runs once.
    a, b = PgMetadata(metadata_dsn, "a"), PgMetadata(metadata_dsn, "b")
    await asyncio.gather(a.open(), b.open())
    assert await versions(metadata_dsn) == known
    assert a.schema_version == b.schema_version == known[-1][0]
    await a.close()
    await b.close()
    again = PgMetadata(metadata_dsn, "a")  # a re-open finds nothing to do
    await again.open()
    assert await versions(metadata_dsn) == known
    await again.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
    await again.close()
    newer = PgMetadata(metadata_dsn, "a")
    with pytest.raises(MetadataOpenError, match=r"schema version 999, newer than .* upgrade"):
        await newer.open()
    assert not newer.is_open


async def test_unreachable_database_at_start(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    dsn = f"postgresql://postgres:never-logged-pw@127.0.0.1:{free_port()}/meta"
    with pytest.raises(ConfigError) as e:
        await gateway(make_proxy, pg_dir, dsn, "gone")
    assert "cannot reach the Postgres metadata database postgres@127.0.0.1:" in e.value.message
    assert "never-logged-pw" not in e.value.message


# --- two gateways, one database -------------------------------------------------------------


async def test_two_gateways_see_each_others_rows(
    make_proxy: ProxyFactory, pg_dir: Path, metadata_dsn: str
) -> None:
    a = await gateway(make_proxy, pg_dir, metadata_dsn, "gw-a")
    assert await one(a, "shop:x", "select count(*) from items") == 2
    states_a = {r.id for r in await a.proxy.meta.states()}
    final = next(r.id for r in await a.proxy.meta.states() if r.kind == "psql")
    await a.proxy.meta.set_name("release-1", final)
    audit_a = a.proxy.audit
    await set_pinned(a.proxy.meta, "release-1", True, audit=audit_a, actor="admin")
    token = await TokenStore(a.proxy.meta).create(
        "ana", "laptop", time.time() + 60, b"s" * 16, 4096
    )

    # B opens on its own store: its start-up reconcile leaves A's rows alone.
    b = await gateway(make_proxy, pg_dir, metadata_dsn, "gw-b")
    assert {r.id for r in await a.proxy.meta.states()} == states_a
    assert await b.proxy.meta.states() == []  # none of those files are in B's store
    assert await b.proxy.meta.names() == {"release-1": final}
    assert await TokenStore(b.proxy.meta).check(token.token) == token.row
    # B builds the same recipe: the same state ids, and A's pin holds there too.
    assert await one(b, "shop:y", "select sum(x) from items") == 3
    b_final = await b.proxy.meta.get_state(final)
    assert b_final is not None and b_final.pinned
    # Shared instances: each gateway restores its own, and sees who holds the others.
    held = {(node, rec.key) for node, rec in await pg(b).all_shared_instances()}
    assert held == {("gw-a", "shop:x"), ("gw-b", "shop:y")}
    assert [r.key for r in await b.proxy.meta.shared_instances()] == ["shop:y"]
    # One audit chain: both gateways' records, in one verified sequence.
    await a.proxy.audit_log.flush()
    await b.proxy.audit_log.flush()
    records = await b.proxy.audit_log.query(AuditFilter(kind="connection"))
    assert {r.fields["label"] for r in records} == {"x", "y"}
    assert [r.kind for r in await b.proxy.audit_log.query(AuditFilter(kind="pin"))] == ["pin"]
    result = await b.proxy.audit.verify()
    assert result.ok and result.last_seq == result.records == result.head_seq
    assert result.records >= 3


async def test_concurrent_audit_writers_keep_one_chain(metadata_dsn: str, pg_dir: Path) -> None:
    """Two gateways' audit logs writing batches at once: one chain, each one's order kept."""
    metas = [PgMetadata(metadata_dsn, "a"), PgMetadata(metadata_dsn, "b")]
    await asyncio.gather(*(m.open() for m in metas))
    logs = [AuditLog(m, pg_dir / "unused.head") for m in metas]
    for log in logs:
        await log.open()
    audits = [Audit(log) for log in logs]
    try:
        for i in range(1200):  # batches of up to 500 from each, interleaved
            for who, audit in zip("ab", audits, strict=True):
                audit.record("drain", actor=who, n=i)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*(log.flush() for log in logs))
        rows = await logs[0].chunk(0, 10_000)
        assert [r.seq for r in rows] == list(range(1, 2401))
        for who in "ab":
            assert [r.fields["n"] for r in rows if r.actor == who] == list(range(1200))
        assert (await audits[1].verify()).ok
        assert not (pg_dir / "unused.head").exists()  # the head is a row of the database
    finally:
        for log in logs:
            await log.close()
        for m in metas:
            await m.close()
