"""A proxy restart reconciles the store with the disk: leftovers go, only whole states serve."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from snapshots.registry import open_backend
from taidon_proxy.app import Proxy
from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import BuildFailed, ConfigError
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.prepare.liquibase.launcher import find_launcher
from tests.conftest import REPO, free_port, processes_under
from tests.contract.snapshot_fixtures import loop_fs, mounts_under, unmount_all

pytestmark = pytest.mark.integration

SQLRS = REPO / ".venv" / "bin" / "sqlrs"


def write_config(pg_dir: Path, databases: dict[str, Any], **settings: Any) -> Path:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": None},
        "store": str(pg_dir / "store"),
        "snapshot": {"backend": "copy"},
        "runtime": {"kind": "process", "run_dir": str(pg_dir / "run")},
        "cache": {"max_size": "1TiB", "min_free": "0%"},
        "databases": databases,
        **settings,
    }
    path = pg_dir / "taidon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[tuple[Proxy, str]]:
    """An in-process proxy on the config at path; yields it and a DSN prefix."""
    proxy = await Proxy.open(parse_config(path.read_text(), source=path))
    try:
        await proxy.start()
        assert proxy.server is not None
        yield proxy, f"postgresql://postgres@{proxy.server.addresses[0]}"
    finally:
        await proxy.close()


def steps(pg_dir: Path, *texts: str) -> list[str]:
    d = pg_dir / "sql"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, t in enumerate(texts):
        f = d / f"{i:02d}.sql"
        f.write_text(t)
        out.append(str(f))
    return out


async def fetch(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn, timeout=60)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def store_dirs(pg_dir: Path) -> dict[str, set[str]]:
    data = pg_dir / "store" / "data"
    return {
        "snaps": set(os.listdir(data / "snaps")),
        "snap_records": {f.removesuffix(".json") for f in os.listdir(data / "meta" / "snap")},
        "clones": set(os.listdir(data / "clones")),
        "clone_records": {f.removesuffix(".json") for f in os.listdir(data / "meta" / "clone")},
        "tmp": set(os.listdir(data / "tmp")),
    }


async def test_restart_repairs_leftovers_and_rebuilds_what_is_missing(pg_dir: Path) -> None:
    files = steps(pg_dir, "create table t1 as select generate_series(1, 4) id;\n",
                  "create table t2 as select generate_series(1, 9) id;\n")  # fmt: skip
    # Per-connection: no shared instance keeps a clone of the states across the restart.
    recipe = {"prepare": {"kind": "psql", "files": files}, "isolation": "connection"}
    path = write_config(pg_dir, {"a": recipe})
    async with running(path) as (proxy, dsn):
        assert await fetch(f"{dsn}/a", "select count(*) from t2") == 9
        assert proxy.builder is not None
        key = await proxy.builder.recipe_key("a")
        final = await proxy.builder.resolve("a")
        mid = (await proxy.meta.get_state(final)).parent  # type: ignore[union-attr]
        assert mid is not None

    # What a crash can leave: a clone, a half-made clone and snapshot, a snapshot with no
    # row, a row with no snapshot (and a fingerprint pointing at it), a job never finished.
    backend = open_backend("copy", pg_dir / "store" / "data", {})
    await backend.clone(mid, "i-leftover")
    (backend.root / "clones" / "i-halfmade").mkdir()
    (backend.root / "clones" / "i-halfmade" / "junk").write_text("x")
    orphan = "f" * 64
    await backend.create("b-orphan")
    (backend.root / "clones" / "b-orphan" / "pgdata").mkdir()
    await backend.snapshot("b-orphan", orphan)
    await backend.remove_clone("b-orphan")
    (backend.root / "snaps" / ("e" * 64)).mkdir()
    await backend.remove_snapshot(final)
    await backend.close()
    db = sqlite3.connect(pg_dir / "store" / "meta.sqlite")
    db.execute("INSERT INTO jobs (id, alias, status, started) VALUES ('j-cut', 'a', 'running', 1)")
    db.commit()
    db.close()

    async with running(path) as (proxy, dsn):
        ids = {r.id for r in await proxy.meta.states()}
        assert final not in ids and mid in ids and orphan not in ids
        assert await proxy.meta.fingerprint(key) is None
        left = store_dirs(pg_dir)
        assert left["snaps"] == left["snap_records"] == ids
        assert left["clones"] == left["clone_records"] == set()
        assert left["tmp"] == set()
        jobs = {j["id"]: j for j in await proxy.meta.jobs()}
        assert jobs["j-cut"]["status"] == "failed" and "interrupted" in jobs["j-cut"]["error"]
        # The state is made again, from its surviving parent, and serves the right data.
        assert await fetch(f"{dsn}/a", "select count(*) from t2") == 9
        assert proxy.builder is not None
        job = list(proxy.builder.jobs.values())[-1]
        assert [e.kind for e in job.events].count("snapshot") == 1
        assert await proxy.meta.get_state(final) is not None


@pytest.fixture(
    params=["copy", pytest.param("overlayfs", marks=pytest.mark.root),
            pytest.param("btrfs", marks=pytest.mark.root)],
)  # fmt: skip
def backend_store(request: pytest.FixtureRequest, pg_dir: Path) -> Iterator[tuple[str, Path]]:
    """(backend, store dir): copy and overlayfs on /tmp, btrfs on a loop-mounted image."""
    kind: str = request.param
    if kind != "copy" and os.geteuid() != 0:
        pytest.skip(f"needs root: {kind} mounts")
    if kind == "btrfs":
        with loop_fs("btrfs", "1G") as mnt:
            yield kind, mnt / "store"
        return
    try:
        yield kind, pg_dir / "store"
    finally:
        unmount_all(pg_dir / "store")


def wait_listening(serve: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert serve.poll() is None, "sqlrs serve exited"
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        assert time.monotonic() < deadline, "sqlrs serve did not listen"
        time.sleep(0.1)


def start_serve(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`sqlrs serve` in its own session (a SIGKILL of it leaves its children, as in life)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(SQLRS), "--config", str(config), "serve", "--loop", "asyncio"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def state_kinds(store: Path) -> list[str]:
    db = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT kind FROM states WHERE alias = 'a'")]
    finally:
        db.close()


def forget_queued_builds(store: Path) -> None:
    """These tests are about the store: the cut build is not resumed (its queue row goes), so
    its job stays marked cut. Resumed builds: tests/integration/test_build_queue.py."""
    db = sqlite3.connect(store / "meta.sqlite")
    with db:
        db.execute("DELETE FROM build_queue")
    db.close()


async def test_kill_9_mid_build_then_restart(pg_dir: Path, backend_store: tuple[str, Path]) -> None:
    backend, store = backend_store
    marker = pg_dir / "slow"
    marker.write_text("")
    marker.chmod(0o644)
    slow = (
        "create table t2 as select generate_series(1, 5) id;\n"
        f"select pg_sleep(case when pg_stat_file('{marker}', true) is null then 0 else 60 end);\n"
    )
    files = steps(pg_dir, "create table t1 as select generate_series(1, 3) id;\n", slow)
    ready = steps(pg_dir / "sql", "create table r as select generate_series(1, 8) id;\n")
    port = free_port()
    path = write_config(
        pg_dir,
        {
            "a": {"prepare": {"kind": "psql", "files": files}},
            "ready": {"prepare": {"kind": "psql", "files": ready}},
        },
        listen=f"127.0.0.1:{port}",
        store=str(store),
        snapshot={"backend": backend},
    )
    log_path = pg_dir / "serve.log"
    clones = store / "data" / "clones"
    serve = start_serve(path, log_path)
    client: asyncio.Task[Any] | None = None
    held: asyncpg.Connection | None = None
    try:
        await asyncio.to_thread(wait_listening, serve, port)
        # A live instance (a clone with a server) and a build in its second step.
        held = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/ready", timeout=60)
        assert await held.fetchval("select count(*) from r") == 8
        client = asyncio.create_task(fetch(f"postgresql://postgres@127.0.0.1:{port}/a", "select 1"))
        async with asyncio.timeout(60):
            while "psql" not in state_kinds(store) or len(processes_under(clones)) < 2:
                assert serve.poll() is None, "sqlrs serve exited"
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # inside pg_sleep now
        leftovers = processes_under(clones)
        assert len(leftovers) == 2
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(timeout=10)
        with contextlib.suppress(Exception):
            await client
        marker.unlink()
        forget_queued_builds(store)

        async with running(path) as (proxy, dsn):
            assert proxy.backend_name == backend
            # Servers reaped, the build's clone (and its mount) dropped, the cut job marked;
            # the shared instance's clone is kept (mounted again on overlayfs).
            assert not processes_under(clones) & leftovers
            assert proxy.instances is not None
            kept = proxy.instances.kept[InstanceKey.parse("ready:default")].clone_id
            assert await proxy.backend.list_clones() == [kept]  # type: ignore[union-attr]
            assert mounts_under(clones) == ([str(clones / kept)] if backend == "overlayfs" else [])
            rows = await proxy.meta.states()
            assert sorted(r.kind for r in rows if r.alias == "a") == ["psql", "root"]
            snaps = set(await proxy.backend.list_snapshots())  # type: ignore[union-attr]
            assert snaps == {r.id for r in rows}
            jobs = await proxy.meta.jobs()
            assert jobs and all(j["status"] != "running" for j in jobs)
            assert await fetch(f"{dsn}/a", "select count(*) from t2") == 5
            assert await fetch(f"{dsn}/a", "select count(*) from t1") == 3
            assert await fetch(f"{dsn}/ready", "select count(*) from r") == 8
    except BaseException:
        sys.stderr.write(f"--- sqlrs serve log ---\n{log_path.read_text(errors='replace')}\n")
        raise
    finally:
        if held is not None:
            with contextlib.suppress(Exception):
                await held.close(timeout=5)
        if client is not None and not client.done():
            client.cancel()
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=10)
        for pid in processes_under(clones):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_unusable_backend_is_a_clear_error_and_does_not_bind_the_store(
    pg_dir: Path,
) -> None:
    path = write_config(pg_dir, {}, snapshot={"backend": "btrfs"})
    with pytest.raises(ConfigError, match=r"snapshot\.backend btrfs: .*not btrfs"):
        await Proxy.open(parse_config(path.read_text(), source=path))
    assert not (pg_dir / "store" / "backend").exists()
    # The same store opens with a backend that works there.
    path = write_config(pg_dir, {})
    async with running(path) as (proxy, _):
        assert proxy.backend_name == "copy"


def test_sqlrs_serve_reports_a_missing_tool(pg_dir: Path) -> None:
    path = write_config(pg_dir, {}, snapshot={"backend": "btrfs"})
    proc = subprocess.run(
        [str(SQLRS), "--config", str(path), "serve"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PATH": "/nonexistent"},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "btrfs tool is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_restart_with_a_smaller_cache_evicts_before_listening(pg_dir: Path) -> None:
    dbs = {
        alias: {"prepare": {"kind": "psql", "files": steps(pg_dir / alias, sql)}}
        for alias, sql in (
            ("old", "create table o (id int);\n"),
            ("new", "create table n (id int);\n"),
        )
    }
    path = write_config(pg_dir, dbs)
    async with running(path) as (proxy, _):
        assert proxy.builder is not None and proxy.store is not None
        old, new = await proxy.builder.resolve("old"), await proxy.builder.resolve("new")
        await proxy.store.settle()
        rows = {r.id: r for r in await proxy.meta.states()}
    # Both leaves are past the grace period; old was last used days ago.
    db = sqlite3.connect(pg_dir / "store" / "meta.sqlite")
    db.execute("UPDATE states SET last_used = ? WHERE id = ?", (time.time() - 3 * 86400, old))
    db.execute("UPDATE states SET last_used = ? WHERE id = ?", (time.time() - 3600, new))
    db.commit()
    db.close()
    used = sum(r.size_bytes for r in rows.values())
    path = write_config(pg_dir, dbs, cache={"max_size": used - 1, "min_free": "0%"})
    async with running(path) as (proxy, dsn):
        assert proxy.evictor is not None
        ids = {r.id for r in await proxy.meta.states()}
        assert old not in ids and new in ids
        assert [e.id for e in proxy.evictor.stats.recent] == [old]
        assert await fetch(f"{dsn}/old", "select count(*) from o") == 0


def _liquibase_installed() -> bool:
    try:
        find_launcher(parse_config("{}", source=Path(__file__)))
    except BuildFailed:
        return False
    return True


LB_CHANGELOG = """--liquibase formatted sql
--changeset taidon:1
create table t1 as select generate_series(1, 3) id;
--changeset taidon:2
create table t2 as select generate_series(1, 5) id;
select pg_sleep(case when pg_stat_file('{marker}', true) is null then 0 else 60 end);
"""


@pytest.mark.liquibase
@pytest.mark.skipif(not _liquibase_installed(), reason="Liquibase is not installed")
async def test_kill_9_mid_liquibase_build_then_restart(pg_dir: Path) -> None:
    """Liquibase (a JVM talking to the build server through the proxy) inside its second
    changeset when the proxy is SIGKILLed: the JVM goes too, the restart serves only the
    first changeset's state, and the next connection builds just the second."""
    marker = pg_dir / "slow"
    marker.write_text("")
    marker.chmod(0o644)
    project = pg_dir / "lbproj"
    project.mkdir()
    (project / "changelog.sql").write_text(LB_CHANGELOG.format(marker=marker))
    port = free_port()
    store = pg_dir / "store"
    recipe = {"kind": "lb", "search_path": [str(project)], "changelog": "changelog.sql"}
    # A state after every changeset (plain copy would keep only every 10th by default).
    path = write_config(
        pg_dir, {"a": {"prepare": recipe}}, listen=f"127.0.0.1:{port}", liquibase={"keep_every": 1}
    )
    log_path = pg_dir / "serve.log"
    clones = store / "data" / "clones"
    serve = start_serve(path, log_path)
    client: asyncio.Task[Any] | None = None
    try:
        await asyncio.to_thread(wait_listening, serve, port)
        client = asyncio.create_task(fetch(f"postgresql://postgres@127.0.0.1:{port}/a", "select 1"))
        async with asyncio.timeout(120):  # the JVM starts, changeset 1 is committed
            while state_kinds(store).count("lb") < 1 or not processes_under(project):
                assert serve.poll() is None, "sqlrs serve exited"
                await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # inside changeset 2's pg_sleep now
        assert processes_under(project), "Liquibase is not running"
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(timeout=10)
        with contextlib.suppress(Exception):
            await client
        # The JVM loses its connection (it talked to the build server through the proxy).
        async with asyncio.timeout(30):
            while processes_under(project):
                await asyncio.sleep(0.2)
        marker.unlink()
        forget_queued_builds(store)

        async with running(path) as (proxy, dsn):
            assert not processes_under(clones)  # the build server was reaped
            rows = await proxy.meta.states()
            assert sorted(r.kind for r in rows if r.alias == "a") == ["lb", "root"]
            assert await proxy.backend.list_clones() == []  # type: ignore[union-attr]
            jobs = await proxy.meta.jobs()
            assert jobs and all(j["status"] != "running" for j in jobs)
            assert await fetch(f"{dsn}/a", "select count(*) from t2") == 5
            assert await fetch(f"{dsn}/a", "select count(*) from t1") == 3
            kinds = sorted(r.kind for r in await proxy.meta.states() if r.alias == "a")
            assert kinds == ["lb", "lb", "root"]  # only changeset 2 was built again
            assert (
                await fetch(
                    f"{dsn}/a",
                    "select string_agg(id, ',' order by orderexecuted) from databasechangelog",
                )
                == "1,2"
            )
    except BaseException:
        sys.stderr.write(f"--- sqlrs serve log ---\n{log_path.read_text(errors='replace')}\n")
        raise
    finally:
        if client is not None and not client.done():
            client.cancel()
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=10)
        for pid in processes_under(clones) | processes_under(project):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
