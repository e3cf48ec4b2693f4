"""Liquibase recipes through the proxy: a plain run's changelog table, a state per changeset."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare.liquibase.launcher import find_launcher
from tests.conftest import SHARED_TESTDATA, ProxyFactory, RunningProxy, free_port

DATA = Path(__file__).resolve().parent.parent / "data" / "liquibase"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# A state after every changeset even on the plain-copy store the tests use (its default keeps
# every 10th: test_liquibase_keep_every.py).
EVERY_CHANGESET = {"keep_every": 1}
ITEMS = "select string_agg(name, ',' order by id) from item"
CHANGELOG_COLS = (
    "id, author, filename, orderexecuted, md5sum, exectype, description, contexts, labels"
)


def _launcher() -> Path | None:
    try:
        return find_launcher(parse_config("{}", source=Path(__file__)))
    except BuildFailed:
        return None


LAUNCHER = _launcher()
needs_liquibase = pytest.mark.skipif(
    LAUNCHER is None, reason="Liquibase is not installed (run scripts/setup --full)"
)
pytestmark = [pytest.mark.integration, pytest.mark.liquibase, needs_liquibase]


def copy_project(pg_dir: Path, name: str = "basic") -> Path:
    dest = pg_dir / "proj"
    shutil.copytree(DATA / name, dest)
    return dest


def lb_recipe(project: Path, **prepare: Any) -> dict[str, Any]:
    prep: dict[str, Any] = {
        "kind": "lb",
        "search_path": str(project),
        "changelog": "db/master.xml",
        "contexts": "dev",
        "parameters": {"greeting": "hello"},
    }
    prep.update(prepare)
    return {"prepare": prep}


def jobs_of(p: RunningProxy, alias: str) -> list[Any]:
    assert p.proxy.builder is not None
    return [j for j in p.proxy.builder.jobs.values() if j.alias == alias]


def events(job: Any, kind: str) -> list[str]:
    return [e.message for e in job.events if e.kind == kind]


async def fetch_changelog(dsn: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn, timeout=120)
    try:
        rows = await conn.fetch(f"SELECT {CHANGELOG_COLS} FROM databasechangelog ORDER BY 4")
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


@pytest.fixture
def plain_pg(pg_dir: Path) -> Iterator[tuple[int, Path]]:
    """A plain Postgres on loopback TCP for a plain Liquibase run; its log printed at teardown."""
    data = pg_dir / "plain"
    sock = pg_dir / "plainsock"
    sock.mkdir()
    shutil.chown(pg_dir, "postgres")
    shutil.chown(sock, "postgres")
    log = pg_dir / "plain.log"
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres"], check=True, capture_output=True, timeout=120)  # fmt: skip
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*run, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (sock / f".s.PGSQL.{port}").exists():
            assert time.monotonic() < deadline, "plain postgres did not start"
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(0.2)
        subprocess.run(
            ["psql", "-h", str(sock), "-p", str(port), "-U", "postgres",
             "-c", "create database shop"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        yield port, sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        print("--- plain postgres log ---\n" + log.read_text(errors="replace"))


async def test_psql_sees_progress_and_changelog_matches_plain_update(
    make_proxy: ProxyFactory, pg_dir: Path, plain_pg: tuple[int, Path]
) -> None:
    project = copy_project(pg_dir)
    p = await make_proxy({"shop": lb_recipe(project)}, liquibase=EVERY_CHANGESET)
    # psql prints the build's progress notices while it waits for the state.
    res = await asyncio.to_thread(
        subprocess.run,
        ["psql", "-X", "-At", "-d", p.dsn("shop"), "-c", ITEMS],
        capture_output=True, text=True, timeout=180, env=p.libpq_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "hello,two"
    assert "changeset 1/4 1::ann" in res.stderr
    assert "changeset 4/4 4::bob" in res.stderr
    ours = await fetch_changelog(p.dsn("shop"))

    # The same changelog applied by a plain `liquibase update` on an empty database.
    port, _ = plain_pg
    assert LAUNCHER is not None
    plain = await asyncio.to_thread(
        subprocess.run,
        [str(LAUNCHER), f"--search-path={project}", "update",
         f"--url=jdbc:postgresql://127.0.0.1:{port}/shop", "--username=postgres",
         "--changelog-file=db/master.xml", "--contexts=dev", "-Dgreeting=hello"],
        capture_output=True, text=True, timeout=180, cwd=pg_dir,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    theirs = await fetch_changelog(f"postgresql://postgres@127.0.0.1:{port}/shop")
    assert ours == theirs
    assert len(ours) == 4

    # The lock row is released in the served state, as a finished run leaves it.
    conn = await asyncpg.connect(p.dsn("shop"))
    try:
        assert await conn.fetchval("select locked from databasechangeloglock") is False
    finally:
        await conn.close()
    (job,) = jobs_of(p, "shop")
    assert job.status == "succeeded"
    assert any("Running Changeset: db/more.sql::4::bob" in m for m in events(job, "log"))
    taken = [m.split(" -> ")[0] for m in events(job, "snapshot")]
    assert taken[-4:] == ["1::ann", "2::ann", "3::bob", "4::bob"]


async def test_state_per_changeset_append_and_fast_path(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    project = copy_project(pg_dir)
    p = await make_proxy({"shop": lb_recipe(project)}, liquibase=EVERY_CHANGESET)
    builder = p.proxy.builder
    assert builder is not None
    final = await builder.resolve("shop")
    planned = await builder.plan("shop")
    assert [s.label for s in planned] == ["1::ann", "2::ann", "3::bob", "4::bob"]
    assert all(s.cached for s in planned)
    assert planned[-1].state_id == final

    # Every boundary state was taken from a frozen server: it starts (crash recovery) and holds
    # exactly the work up to its changeset.
    conn = await asyncpg.connect(p.dsn(f"state:{planned[1].state_id}"), timeout=60)
    try:
        assert await conn.fetchval("select count(*) from item") == 1
        assert await conn.fetchval("select count(*) from databasechangelog") == 2
        assert await conn.fetchval("select locked from databasechangeloglock") is False
    finally:
        await conn.close()

    # Unchanged inputs: no JVM, no job, milliseconds.
    jobs_before = len(builder.jobs)
    t = time.perf_counter()
    assert await builder.resolve("shop") == final
    elapsed = time.perf_counter() - t
    assert len(builder.jobs) == jobs_before
    assert elapsed < 0.05, elapsed

    # Append a changeset: one run applies only it; every earlier state is reused.
    with (project / "db" / "more.sql").open("a") as f:
        f.write("\n--changeset bob:5\ninsert into item values (5, 'five');\n")
    new_final = await builder.resolve("shop")
    job = list(builder.jobs.values())[-1]
    assert events(job, "step.start") == ["changeset 5/5 5::bob"]
    replanned = await builder.plan("shop")
    assert [s.state_id for s in replanned[:4]] == [s.state_id for s in planned]
    assert replanned[-1].state_id == new_final
    conn = await asyncpg.connect(p.dsn("shop:fresh"), timeout=60)
    try:
        assert await conn.fetchval("select count(*) from item") == 3
        assert await conn.fetchval("select count(*) from databasechangelog") == 5
    finally:
        await conn.close()


async def test_plan_run_leaves_a_class_archive_later_runs_map(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy(
        {"shop": lb_recipe(copy_project(pg_dir)), "shop2": lb_recipe(pg_dir / "proj", contexts="")}
    )
    builder = p.proxy.builder
    assert builder is not None
    await builder.resolve("shop")
    archives = list((p.proxy.config.store / "liquibase").glob("*.jsa"))
    assert len(archives) == 1 and archives[0].stat().st_size > 0
    assert not list((p.proxy.config.store / "liquibase").glob(".*"))  # no leftover temp
    # A second recipe: both its runs start with the archive and build correctly.
    await builder.resolve("shop2")
    conn = await asyncpg.connect(p.dsn("shop2"), timeout=60)
    try:
        assert await conn.fetchval("select count(*) from databasechangelog") > 0
    finally:
        await conn.close()


async def test_edited_changeset_rebuilds_from_it(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    project = copy_project(pg_dir)
    p = await make_proxy({"shop": lb_recipe(project)}, liquibase=EVERY_CHANGESET)
    builder = p.proxy.builder
    assert builder is not None
    await builder.resolve("shop")
    before = await builder.plan("shop")
    sql = project / "db" / "more.sql"
    sql.write_text(sql.read_text().replace("(2, 'two')", "(2, 'deux')"))
    await builder.resolve("shop")
    job = list(builder.jobs.values())[-1]
    # The speculative run from the old final state is refused by Liquibase (checksum), the plan
    # shows changeset 3 changed, and the build runs again from state 2.
    assert "changelog changed: applying from changeset 3" in events(job, "progress")
    assert events(job, "step.start")[-2:] == ["changeset 3/4 3::bob", "changeset 4/4 4::bob"]
    after = await builder.plan("shop")
    assert [s.state_id for s in after[:2]] == [s.state_id for s in before[:2]]
    assert after[2].state_id != before[2].state_id
    assert after[3].state_id != before[3].state_id
    conn = await asyncpg.connect(p.dsn("shop"), timeout=60)
    try:
        assert await conn.fetchval("select name from item where id = 2") == "deux"
    finally:
        await conn.close()


async def test_contexts_change_the_plan_and_ids(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    project = copy_project(pg_dir)
    p = await make_proxy(
        {"dev": lb_recipe(project, contexts="dev"), "prod": lb_recipe(project, contexts="prod")}
    )
    assert p.proxy.builder is not None
    dev, prod = await asyncio.gather(p.proxy.builder.plan("dev"), p.proxy.builder.plan("prod"))
    assert [s.label for s in dev] == ["1::ann", "2::ann", "3::bob", "4::bob"]
    assert [s.label for s in prod] == ["1::ann", "3::bob", "4::bob"]  # 2 is context dev
    assert not set(s.state_id for s in dev) & set(s.state_id for s in prod)


@pytest.mark.skipif(
    not (SHARED_TESTDATA / "jhipster-liquibase").is_dir(), reason="jhipster testdata missing"
)
async def test_jhipster_changelog_end_to_end(make_proxy: ProxyFactory) -> None:
    root = SHARED_TESTDATA / "jhipster-liquibase"
    recipe = {
        "prepare": {
            "kind": "lb", "search_path": str(root), "changelog": "config/liquibase/master.xml",
            "contexts": "faker",
        },
    }  # fmt: skip
    p = await make_proxy({"bank": recipe}, liquibase=EVERY_CHANGESET)
    conn = await asyncpg.connect(p.dsn("bank"), timeout=240)
    try:
        n = await conn.fetchval("select count(*) from databasechangelog")
        assert n == 11
        assert await conn.fetchval("select count(*) from jhi_user") > 0
    finally:
        await conn.close()
    assert p.proxy.builder is not None
    planned = await p.proxy.builder.plan("bank")
    assert len(planned) == 11 and all(s.cached for s in planned)
    assert os.path.isdir(root)  # the shared folder is only read
