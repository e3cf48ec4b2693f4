"""psql recipes through the proxy: includes, a chained state per file, prefix reuse, errors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.prepare.jobs import Job
from tests.conftest import ProxyFactory, RunningProxy
from tests.recipe_helpers import builder, jobs

pytestmark = pytest.mark.integration

FILES = ("sql/01_schema.sql", "sql/02_data.sql", "sql/03_views.sql")


def write_recipe(base: Path, tag: str) -> dict[str, Any]:
    """Three files: the first includes with \\ir (file-relative), the second with \\i (cwd)."""
    (base / "sql" / "inc").mkdir(parents=True, exist_ok=True)
    (base / "sql" / "common").mkdir(parents=True, exist_ok=True)
    (base / "sql/inc/types.sql").write_text("create type mood as enum ('ok', 'meh');\n")
    (base / "sql/01_schema.sql").write_text(
        f"-- {tag}\n\\ir inc/types.sql\ncreate table a (x int, m mood default 'ok');\n"
    )
    (base / "sql/common/rows.sql").write_text("insert into a (x) values (1), (2);\n")
    (base / "sql/02_data.sql").write_text("\\i sql/common/rows.sql\n")
    (base / "sql/03_views.sql").write_text("create view v as select sum(x) s from a;\n")
    return {"prepare": {"kind": "psql", "files": [str(base / f) for f in FILES]}}


def steps_run(job: Job) -> list[str]:
    return [e.message for e in job.events if e.kind == "step.start"]


async def fetchval(p: RunningProxy, database: str, sql: str) -> Any:
    conn = await asyncpg.connect(p.dsn(database))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_one_state_per_file_chained_with_includes(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"r": write_recipe(pg_dir, "chain")}, store=store)
    assert await fetchval(p, "r", "select s from v") == 3
    assert await fetchval(p, "r", "select count(*) from a where m = 'ok'") == 2
    [job] = jobs(p, "r")
    assert steps_run(job) == [
        "applying sql/01_schema.sql (1/3)",
        "applying sql/02_data.sql (2/3)",
        "applying sql/03_views.sql (3/3)",
    ]
    plan = await builder(p).plan("r")
    assert [s.label for s in plan] == list(FILES)
    assert all(s.cached for s in plan)
    assert p.proxy.store is not None
    parent = await builder(p).root_id("r")
    for step in plan:
        row = await p.proxy.store.get(step.state_id)
        assert row is not None
        assert (row.parent, row.label, row.alias) == (parent, step.label, "r")
        parent = step.state_id
        # Stopped-server states leave out the relcache init files every start rebuilds.
        pgdata = await p.proxy.store.backend.snapshot_path(step.state_id) / "pgdata"
        assert (pgdata / "PG_VERSION").is_file()
        assert list(pgdata.rglob("pg_internal.init")) == []
    assert job.target == plan[-1].state_id
    # The step hash covers included content: editing an \ir file changes step 1 and all after.
    (pg_dir / "sql/inc/types.sql").write_text("create type mood as enum ('ok', 'meh', 'wow');\n")
    replanned = await builder(p).plan("r")
    assert all(a.state_id != b.state_id for a, b in zip(plan, replanned, strict=True))
    assert not any(s.cached for s in replanned)


async def test_changing_a_file_rebuilds_from_the_state_before_it(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"r": write_recipe(pg_dir, "prefix")}, store=store)
    assert await fetchval(p, "r:one", "select s from v") == 3
    before = await builder(p).plan("r")
    (pg_dir / "sql/03_views.sql").write_text("create view v as select sum(x) * 10 s from a;\n")
    assert await fetchval(p, "r:two", "select s from v") == 30
    first, second = jobs(p, "r")
    assert steps_run(second) == ["applying sql/03_views.sql (3/3)"]
    after = await builder(p).plan("r")
    assert [s.state_id for s in after[:2]] == [s.state_id for s in before[:2]]
    assert after[2].state_id != before[2].state_id
    assert p.proxy.store is not None
    row = await p.proxy.store.get(after[2].state_id)
    assert row is not None and row.parent == before[1].state_id
    # The job log was stored too: the metadata rows say the same.
    events = await p.proxy.store.meta.job_events(second.id)
    assert [m for _, _, kind, m in events if kind == "step.start"] == steps_run(second)
    # An edit to a file that step 2 includes (via \i) reruns steps 2 and 3 only.
    (pg_dir / "sql/common/rows.sql").write_text("insert into a (x) values (5);\n")
    assert await fetchval(p, "r:three", "select s from v") == 50
    third = jobs(p, "r")[-1]
    assert steps_run(third) == [
        "applying sql/02_data.sql (2/3)",
        "applying sql/03_views.sql (3/3)",
    ]
    # The first instance still serves the state it started from.
    assert await fetchval(p, "r:one", "select s from v") == 3
    assert first.status == "succeeded"


async def test_concurrent_connections_share_one_build(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"r": write_recipe(pg_dir, "flight")}, store=store)
    n = 5
    results = await asyncio.gather(
        *(fetchval(p, f"r:w{i}", "select s from v") for i in range(n)),
        fetchval(p, "r", "select s from v"),
    )
    assert results == [3] * (n + 1)
    [job] = jobs(p, "r")
    assert len(steps_run(job)) == 3
    assert p.proxy.instances is not None and len(p.proxy.instances.instances) == n + 1
    rows = await p.proxy.store.meta.jobs()  # type: ignore[union-attr]
    # The store is shared by this module's tests: count the jobs of this proxy only.
    mine = [r["id"] for r in rows if r["alias"] == "r" and r["started"] >= p.proxy.started_at]
    assert mine == [job.id]


async def test_psql_prints_build_progress_notices(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"r": write_recipe(pg_dir, "notices")}, store=store)
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-U", "postgres", "-d", "r", "-c", "select s from v",
        env=p.libpq_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "3"
    lines = [ln for ln in err.decode().splitlines() if ln.startswith("NOTICE:")]
    assert lines[0] == "NOTICE:  preparing r"
    for i, f in enumerate(FILES, 1):
        assert f"NOTICE:  applying {f} ({i}/3)" in lines
    # Nothing about the host's layout reaches the client.
    assert str(pg_dir) not in err.decode()
    # A second connection is a cache hit: no notices at all.
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-U", "postgres", "-d", "r:again", "-c", "select 1",
        env=p.libpq_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"NOTICE" not in err


async def test_failing_file_error_is_remembered_and_a_fix_builds_again(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    recipe = write_recipe(pg_dir, "failing")
    (pg_dir / "sql/02_data.sql").write_text(
        "insert into a (x) values (1);\n-- next line fails\nselect * from nonexistent;\n"
    )
    p = await make_proxy({"r": recipe}, store=store, cache={"failure_ttl": "60s"})
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("r"))
    assert e.value.sqlstate == "58000"
    message = str(e.value)
    assert 'relation "nonexistent" does not exist' in message
    assert "sql/02_data.sql:3" in message
    assert str(pg_dir) not in message + (e.value.detail or "")
    [failed] = jobs(p, "r")
    assert failed.status == "failed"
    plan = await builder(p).plan("r")
    assert [s.cached for s in plan] == [True, False, False]  # nothing stored for the failure
    # An immediate retry gets the remembered error at once, without another build.
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as again:
        await asyncpg.connect(p.dsn("r:retry"))
    assert time.monotonic() - started < 2
    assert str(again.value) == message
    assert len(jobs(p, "r")) == 1
    # Fixing the file ends the memory early and builds from step 1's state.
    (pg_dir / "sql/02_data.sql").write_text("insert into a (x) values (1);\n")
    assert await fetchval(p, "r", "select s from v") == 1
    fixed = jobs(p, "r")[-1]
    assert fixed is not failed and fixed.status == "succeeded"
    assert steps_run(fixed) == [
        "applying sql/02_data.sql (2/3)",
        "applying sql/03_views.sql (3/3)",
    ]
