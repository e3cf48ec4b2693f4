"""A store that fills up during a build: a clear error, nothing half-stored, old states serve."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ProxyFactory
from tests.contract.snapshot_fixtures import loop_fs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a loop-mounted XFS store"),
]

MiB = 2**20


@pytest.fixture
def small_xfs() -> Iterator[Path]:
    """Requested before make_proxy in tests, so the proxy is closed before the unmount."""
    with loop_fs("xfs", "600M") as mnt:
        yield mnt


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def recipe(d: Path, name: str, sql: str) -> dict[str, object]:
    f = d / f"{name}.sql"
    f.write_text(sql)
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


async def test_snapshot_that_does_not_fit(
    small_xfs: Path, pg_dir: Path, make_proxy: ProxyFactory
) -> None:
    small = recipe(pg_dir, "small", "create table s as select generate_series(1, 42) id;\n")
    big_file = pg_dir / "big.sql"
    big_file.write_text("-- written once the free space is known\n")
    # Plain copies (no reflinks), so a snapshot costs its full size.
    p = await make_proxy(
        {"small": small, "big": {"prepare": {"kind": "psql", "files": [str(big_file)]}}},
        store=str(small_xfs / "store"),
        snapshot={"backend": "copy", "options": {"reflink": "never"}},
        cache={"max_size": "1TiB", "min_free": "0%"},
    )
    proxy = p.proxy
    assert proxy.backend is not None and proxy.builder is not None
    held = await asyncpg.connect(p.dsn("small"), timeout=60)
    try:
        assert await held.fetchval("select count(*) from s") == 42
        assert proxy.store is not None
        await proxy.store.settle()
        before = {r.id: r for r in await proxy.meta.states()}
        cluster = next(r.size_bytes for r in before.values() if r.kind == "root")
        free = free_bytes(small_xfs)
        # The build needs a root (one cluster), a clone (cluster + data), then a snapshot of
        # the same size again: the clone fits with room to spare, the snapshot cannot.
        data = int(0.75 * (free - 2 * cluster))
        assert data > 50 * MiB, f"loop filesystem too small ({free} free, clusters {cluster})"
        big_file.write_text(
            "create unlogged table big (v text);\n"
            "insert into big select repeat(md5(i::text), 30)"
            f" from generate_series(1, {data // 1000}) i;\n"
        )
        with pytest.raises(asyncpg.PostgresError) as failed:
            await asyncpg.connect(p.dsn("big"), timeout=120)
        err = failed.value
        assert err.sqlstate == "53100", (err.sqlstate, str(err))
        assert "the state store is full" in str(err)
        assert str(small_xfs) not in str(err)  # no host paths to clients
        # A retry gets the remembered error at once.
        with pytest.raises(asyncpg.PostgresError, match="store is full"):
            await asyncpg.connect(p.dsn("big"), timeout=10)
        # Nothing partial: only big's root was added, every row has a whole snapshot, no
        # staging copy and no build clone are left.
        rows = {r.id: r for r in await proxy.meta.states()}
        assert {rows[s].kind for s in rows.keys() - before.keys()} <= {"root"}
        assert set(await proxy.backend.list_snapshots()) == rows.keys()
        data_dir = small_xfs / "store" / "data"
        assert set(os.listdir(data_dir / "snaps")) == rows.keys()
        assert os.listdir(data_dir / "tmp") == []
        assert proxy.instances is not None
        assert set(os.listdir(data_dir / "clones")) == set(proxy.instances.instances)
        assert list(proxy.builder.jobs.values())[-1].status == "failed"
        assert free_bytes(small_xfs) > free - 2 * cluster
        # The proxy still serves what it has, on the held and on new connections.
        assert await held.fetchval("select count(*) from s") == 42
        conn = await asyncpg.connect(p.dsn("small:other"), timeout=60)
        try:
            assert await conn.fetchval("select count(*) from s") == 42
        finally:
            await conn.close()
    finally:
        await held.close()


async def test_clone_and_step_that_do_not_fit(
    small_xfs: Path, pg_dir: Path, make_proxy: ProxyFactory
) -> None:
    small = recipe(pg_dir, "small", "create table s as select generate_series(1, 42) id;\n")
    grow = recipe(
        pg_dir, "grow",
        "create unlogged table big (v text);\n"
        "insert into big select repeat(md5(i::text), 30) from generate_series(1, 2000000) i;\n",
    )  # fmt: skip
    p = await make_proxy(
        {"small": small, "grow": grow},
        store=str(small_xfs / "store"),
        snapshot={"backend": "copy", "options": {"reflink": "never"}},
        cache={"max_size": "1TiB", "min_free": "0%"},
    )
    proxy = p.proxy
    held = await asyncpg.connect(p.dsn("small"), timeout=60)
    filler = small_xfs / "filler"
    try:
        # A step that writes more than the disk holds: Postgres' own error, quoted.
        with pytest.raises(asyncpg.PostgresError) as failed:
            await asyncpg.connect(p.dsn("grow"), timeout=120)
        assert failed.value.sqlstate == "58000", str(failed.value)
        assert "No space left on device" in str(failed.value)
        assert str(small_xfs) not in str(failed.value)
        assert {r.kind for r in await proxy.meta.states() if r.alias == "grow"} <= {"root"}
        # Leave less than one cluster free: a new instance cannot be cloned.
        assert proxy.store is not None
        await proxy.store.settle()
        cluster = max(r.size_bytes for r in await proxy.meta.states())
        with filler.open("wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, max(free_bytes(small_xfs) - cluster // 2, 1))
        with pytest.raises(asyncpg.PostgresError) as failed:
            await asyncpg.connect(p.dsn("small:second"), timeout=60)
        assert failed.value.sqlstate == "53100", str(failed.value)
        assert "no space left to clone a state" in str(failed.value)
        assert proxy.instances is not None
        clones = set(os.listdir(small_xfs / "store" / "data" / "clones"))
        assert clones == set(proxy.instances.instances), "a half-made clone was left"
        assert await held.fetchval("select count(*) from s") == 42
        # Space back: the same request works.
        filler.unlink()
        conn = await asyncpg.connect(p.dsn("small:second"), timeout=60)
        try:
            assert await conn.fetchval("select count(*) from s") == 42
        finally:
            await conn.close()
    finally:
        await held.close()
        filler.unlink(missing_ok=True)


async def test_instance_writes_that_do_not_fit(
    small_xfs: Path, pg_dir: Path, make_proxy: ProxyFactory
) -> None:
    """A client of a per-connection instance fills the filesystem: it gets Postgres's own
    53100, the proxy and other instances go on, and its clone's space comes back when it
    leaves."""
    small = recipe(pg_dir, "small", "create table s as select generate_series(1, 42) id;\n")
    p = await make_proxy(
        {"small": small},
        store=str(small_xfs / "store"),
        snapshot={"backend": "copy", "options": {"reflink": "never"}},
        cache={"max_size": "1TiB", "min_free": "0%"},
    )
    proxy = p.proxy
    assert proxy.store is not None and proxy.instances is not None
    other = await asyncpg.connect(p.dsn("small"), timeout=60)  # a shared instance
    try:
        await proxy.store.settle()
        states = {r.id for r in await proxy.meta.states()}
        free = free_bytes(small_xfs)
        filler = await asyncpg.connect(
            p.dsn("small", options="-c taidon.isolation=connection"), timeout=60
        )
        try:
            # storage external: no compression, so each row takes its full 8 KB.
            await filler.execute(
                "create table fill (v text); alter table fill alter v set storage external"
            )
            with pytest.raises(asyncpg.PostgresError) as full:
                for _ in range(200):  # 8 MB a round: far more than the filesystem holds
                    await filler.execute(
                        "insert into fill select repeat(md5(i::text), 250)"
                        " from generate_series(1, 1000) i"
                    )
            assert full.value.sqlstate == "53100", (full.value.sqlstate, str(full.value))
            assert free_bytes(small_xfs) < 16 * MiB
            # Its own session survives the error, and so does everyone else's.
            assert await filler.fetchval("select count(*) from s") == 42
            assert await other.fetchval("select count(*) from s") == 42
        finally:
            await filler.close()
        # The per-connection clone is removed when its client leaves: the space comes back.
        data_dir = small_xfs / "store" / "data"
        async with asyncio.timeout(30):
            while free_bytes(small_xfs) < free - 16 * MiB or set(
                os.listdir(data_dir / "clones")
            ) != set(proxy.instances.instances):
                await asyncio.sleep(0.1)
        assert {r.id for r in await proxy.meta.states()} == states
        assert await other.fetchval("select count(*) from s") == 42
    finally:
        await other.close()
