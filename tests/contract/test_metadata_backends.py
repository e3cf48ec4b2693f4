"""One suite for every metadata backend: the store's SQLite file and a real Postgres 15.

States, names, pins, links, shared instances, fingerprints, jobs, access tokens and the
audit chain behave the same on both; what only the shared database does (other gateways'
rows) is in tests/integration/test_metadata_shared.py and test_metadata_restart.py.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from taidon_proxy.prepare.queue import Entry, Priority
from taidon_proxy.services.audit import Audit
from taidon_proxy.store.audit import GENESIS, AuditFilter, AuditLog
from taidon_proxy.store.metadata import Metadata, SharedRecord, StateLink, StateRow
from taidon_proxy.store.metadata_api import MetadataStore
from taidon_proxy.store.metadata_pg import PgMetadata
from taidon_proxy.store.queue import QueueRows
from taidon_proxy.store.tokens import TokenStore
from tests.metadata_pg_server import metadata_dsn, metadata_server

pytestmark = pytest.mark.contract
__all__ = ["metadata_dsn", "metadata_server"]  # fixtures


def opener(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> MetadataStore:
    if kind == "sqlite":
        return Metadata(tmp_path / "meta.sqlite")
    return PgMetadata(request.getfixturevalue("metadata_dsn"), "node-a")


@pytest.fixture(params=["sqlite", "postgres"])
async def meta(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    m = opener(request.param, tmp_path, request)
    await m.open()
    try:
        yield m
    finally:
        await m.close()


def row(sid: str, parent: str | None = None, *, created: float = 1.0, **kw: object) -> StateRow:
    base: dict[str, object] = dict(
        id=sid, parent=parent, kind="psql", alias="shop", label=f"{sid}.sql", backend="copy",
        engine="15", created=created, last_used=created, use_count=0, build_seconds=0.5,
        size_bytes=0, pinned=False, clean=True,
    )  # fmt: skip
    base.update(kw)
    return StateRow(**base)  # type: ignore[arg-type]


async def test_states_round_trip(meta: MetadataStore) -> None:
    await meta.add_state(row("aa01", None, created=1.0, kind="initdb", alias=None))
    await meta.add_state(row("bb02", "aa01", created=2.0, clean=False))
    await meta.add_state(row("bb03", "aa01", created=3.0))
    got = await meta.get_state("bb02")
    assert got == row("bb02", "aa01", created=2.0, clean=False)
    assert [r.id for r in await meta.states()] == ["aa01", "bb02", "bb03"]
    assert sorted(await meta.children("aa01")) == ["bb02", "bb03"]
    assert await meta.get_state("ffff") is None
    await meta.set_size("bb02", 12345)
    await meta.touch_state("bb02")
    await meta.touch_state("bb02")
    got = await meta.get_state("bb02")
    assert got is not None and got.size_bytes == 12345 and got.use_count == 2
    assert got.last_used > 1_000_000
    await meta.add_state(row("bb02", "aa01", created=2.0, label="again"))  # replaces
    again = await meta.get_state("bb02")
    assert again is not None and again.label == "again" and again.use_count == 0


async def test_pins_names_and_removal(meta: MetadataStore) -> None:
    await meta.add_state(row("aa01"))
    await meta.add_state(row("ab02", created=2.0))
    await meta.set_pinned("aa01", True)
    pinned = await meta.get_state("aa01")
    assert pinned is not None and pinned.pinned
    await meta.set_pinned("aa01", False)
    unpinned = await meta.get_state("aa01")
    assert unpinned is not None and not unpinned.pinned
    await meta.set_name("release-1", "aa01")
    await meta.set_name("release-1", "ab02")  # a name moves
    await meta.set_name("old", "aa01")
    assert await meta.names() == {"release-1": "ab02", "old": "aa01"}
    assert await meta.resolve_state("release-1") == ["ab02"]
    assert await meta.resolve_state("a") == ["aa01", "ab02"]  # ambiguous prefix
    assert await meta.resolve_state("AA0") == ["aa01"]
    assert await meta.resolve_state("zz") == []
    assert await meta.resolve_state("") == []
    await meta.set_fingerprint("shop", "fp1", "aa01", ["/x.sql"])
    await meta.remove_state("aa01")
    assert await meta.get_state("aa01") is None
    assert await meta.names() == {"release-1": "ab02"}
    assert await meta.fingerprint("shop") is None


async def test_links_keep_their_order(meta: MetadataStore) -> None:
    links = [StateLink(f"c{i}", "p", "psql", f"h{i}", f"{i}.sql") for i in (3, 1, 2)]
    await meta.add_links(links)
    await meta.add_links([StateLink("c1", "p", "psql", "other", "dup")])  # ignored
    await meta.add_links([StateLink("p", None, "initdb", None, "initdb")])
    assert await meta.child_links("p") == links
    assert await meta.link("p") == StateLink("p", None, "initdb", None, "initdb")
    assert await meta.link("nope") is None


async def test_shared_records(meta: MetadataStore) -> None:
    rec = SharedRecord("shop:a", "shop", "a", None, "s1", "c1", "/p/c1", 1.0, 2.0, "running")
    await meta.put_shared(rec)
    newer = SharedRecord("shop:a", "shop", "a", None, "s1", "c2", "/p/c2", 3.0, 3.0, "stopped")
    await meta.put_shared(newer)  # replaces by key
    await meta.remove_shared("shop:a", "c1")  # names the old clone: kept
    assert await meta.shared_instances() == [newer]
    await meta.remove_shared("shop:a", "c2")
    assert await meta.shared_instances() == []


async def test_fingerprints_and_jobs(meta: MetadataStore) -> None:
    await meta.set_fingerprint("shop", "fp1", "s1", ["/a.sql"])
    await meta.set_fingerprint("shop", "fp2", "s2", ["/a.sql", "/b.sql"])
    assert await meta.fingerprint("shop") == ("fp2", "s2", ["/a.sql", "/b.sql"])
    assert await meta.fingerprint("other") is None
    await meta.add_job("j1", "shop", 10.0)
    await meta.add_job("j2", None, 20.0)
    await meta.add_job_events("j1", [(0, 10.0, "job.start", "go"), (1, 10.5, "step", "one")])
    await meta.add_job_events("j1", [(1, 10.5, "step", "dup"), (2, 11.0, "step", "two")])
    assert [e[3] for e in await meta.job_events("j1")] == ["go", "one", "two"]
    assert [e[0] for e in await meta.job_events("j1", after=0)] == [1, 2]
    await meta.finish_job("j1", "succeeded", "s2", None)
    assert await meta.fail_running_jobs("interrupted") == 1
    jobs = await meta.jobs()
    assert [j["id"] for j in jobs] == ["j2", "j1"]
    assert set(jobs[0]) == {"id", "alias", "status", "started", "finished", "target", "error"}
    assert (jobs[0]["status"], jobs[0]["error"]) == ("failed", "interrupted")
    assert (jobs[1]["status"], jobs[1]["target"]) == ("succeeded", "s2")
    assert [j["id"] for j in await meta.jobs(limit=1)] == ["j2"]


async def test_tokens(meta: MetadataStore) -> None:
    tokens = TokenStore(meta)
    await tokens.open()
    salt, iterations = await tokens.salt("ana")
    assert await tokens.salt("ana") == (salt, iterations)  # made once per user
    assert (await tokens.salt("ben"))[0] != salt
    new = await tokens.create("ana", "laptop", time.time() + 3600, salt, iterations)
    old = await tokens.create("ana", "old", time.time() - 1, salt, iterations)
    assert await tokens.check(new.token) == new.row
    assert await tokens.check(old.token) is None  # expired
    assert await tokens.check(new.token[:-1] + ("A" if new.token[-1] != "A" else "B")) is None
    assert await tokens.check("not a token") is None
    assert [t.name for t in await tokens.listing("ana")] == ["old", "laptop"]
    assert await tokens.listing("ben") == []
    assert [v[0] for v in await tokens.verifiers("ana")] == [new.row.id]
    await tokens.revoke(new.row.id)
    revoked = await tokens.get(new.row.id)
    assert revoked is not None and revoked.revoked is not None
    assert await tokens.check(new.token) is None
    assert await tokens.verifiers("ana") == []
    assert await tokens.get("000000000000") is None


async def test_oidc_grants_survive_a_reopen(meta: MetadataStore) -> None:
    tokens = TokenStore(meta)
    await tokens.open()
    until = time.time() + 3600
    await tokens.grant("ana", ("payments",), "http://127.0.0.1:1/", "sub-1", until)
    await tokens.grant("ana", ("payments", "ops"), "http://127.0.0.1:1/", "sub-1", until)
    again = TokenStore(meta)
    await again.open()  # read from the table, as at a restart
    assert again.granted("ana") == ("payments", "ops")  # the last login's teams
    assert again.granted("ana", now=until + 1) == ()
    assert again.granted("ben") == ()


async def test_provenance_first_record_kept(meta: MetadataStore) -> None:
    await meta.add_provenance({"s1": {"files": [{"path": "a.sql", "sha256": "00"}]}})
    await meta.add_provenance({"s1": {"files": []}, "s2": {"tool": "psql 15"}})
    assert await meta.provenance(["s1", "s2", "nope"]) == {
        "s1": {"files": [{"path": "a.sql", "sha256": "00"}]},  # ids are content-addressed
        "s2": {"tool": "psql 15"},
    }


async def test_build_queue_rows(meta: MetadataStore) -> None:
    rows = QueueRows(meta)
    for seq, job in ((2, "j-b"), (1, "j-a")):
        await rows.add(Entry(job, "shop", None, "payments", Priority.INTERACTIVE, seq, float(seq)))
    await rows.started("j-a")
    got = await rows.pending()
    assert [(r.job_id, r.running, r.team) for r in got] == [
        ("j-a", True, "payments"),
        ("j-b", False, "payments"),
    ]
    await rows.remove("j-a")
    assert [r.job_id for r in await rows.pending()] == ["j-b"]


async def test_audit_chain_queries_and_reopen(
    request: pytest.FixtureRequest, tmp_path: Path, meta: MetadataStore
) -> None:
    log = AuditLog(meta, tmp_path / "audit.head")
    await log.open()
    audit = Audit(log, clock=lambda: 1_700_000_000.25)
    for i in range(1100):  # more than one batch, and more than one verification chunk
        audit.record("connection", actor=f"u{i % 3}", alias=("shop" if i % 2 else "crm"), n=i)
    audit.record("reset", actor="admin", alias="shop", label="x", target="shop:x")
    result = await audit.verify()
    assert result.ok and result.records == 1101 and result.last_seq == 1101
    assert result.head_seq == 1101
    rows = await log.chunk(0, 5000)
    assert [r.seq for r in rows] == list(range(1, 1102))
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert result.head_hash == rows[-1].hash
    shop = await log.query(AuditFilter(alias="shop", actor="u1", limit=5))
    assert [r.fields["n"] for r in shop] == [1075, 1081, 1087, 1093, 1099]  # newest, in order
    assert [r.kind for r in await log.query(AuditFilter(kind="reset"))] == ["reset"]
    assert await log.query(AuditFilter(since=1_700_000_001.0)) == []
    assert len(await log.query(AuditFilter(until=1_700_000_001.0, limit=10_000))) == 1101
    await log.close()
    # A new log on the same table continues the chain.
    again = AuditLog(meta, tmp_path / "audit.head")
    await again.open()
    assert again.last_seq == 1101
    Audit(again).record("drain", actor="admin")
    verified = await Audit(again).verify()
    assert verified.ok and verified.last_seq == 1102
    await again.close()


async def test_audit_table_is_append_only(tmp_path: Path, meta: MetadataStore) -> None:
    log = AuditLog(meta, tmp_path / "audit.head")
    await log.open()
    Audit(log).record("drain", actor="admin")
    await log.flush()
    if isinstance(meta, Metadata):
        for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                await meta.run(meta.db.execute, sql)
    else:
        assert isinstance(meta, PgMetadata)
        for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await meta.execute(sql)
    assert (await Audit(log).verify()).ok
    await log.close()
