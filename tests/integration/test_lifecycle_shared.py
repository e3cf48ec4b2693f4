"""Shared instances are the user's database: their clone outlives the idle TTL, a proxy
restart, a kill -9 of the proxy and a crash of the server, until reset, rm or retention;
per-connection instances stay throwaway; overlayfs leaves no mount behind a stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from taidon_proxy.admin.auth import read_token
from taidon_proxy.app import Proxy
from taidon_proxy.config import CacheConfig
from taidon_proxy.config_load import parse_config
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.instances.manager import InstanceManager
from tests.conftest import ProxyFactory, RunningProxy, free_port, processes_under
from tests.contract.snapshot_fixtures import mounts_under, unmount_all
from tests.integration.test_lifecycle_instances import SQLRS, alive, wait_listening

pytestmark = pytest.mark.integration

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")
ISOLATED = {"options": "-c taidon.isolation=connection"}


def recipe(pg_dir: Path) -> dict[str, Any]:
    """Two steps: on overlayfs the state is a chain of layers (its view is a mount)."""
    d = pg_dir / "sql"
    d.mkdir(exist_ok=True)
    (d / "01.sql").write_text("create table t (x int);\ninsert into t values (42);\n")
    (d / "02.sql").write_text("create table u (y int);\n")
    return {"prepare": {"kind": "psql", "files": [str(d / "01.sql"), str(d / "02.sql")]}}


def manager(p: RunningProxy | Proxy) -> InstanceManager:
    proxy = p.proxy if isinstance(p, RunningProxy) else p
    assert proxy.instances is not None
    return proxy.instances


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


async def fetch(dsn: str, sql: str, **kw: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=60, **kw)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def tables(dsn: str) -> list[str]:
    return list(
        await fetch(
            dsn,
            "select coalesce(array_agg(tablename::text order by tablename), '{}')"
            " from pg_tables where schemaname = 'public'",
        )
    )


async def make_mine(dsn: str) -> None:
    """What a user does to their dev database: a table of their own, with a row."""
    conn = await asyncpg.connect(dsn, timeout=60)
    try:
        await conn.execute("create table mine (v text); insert into mine values ('kept')")
    finally:
        await conn.close()


async def clone_ids(proxy: Proxy) -> set[str]:
    assert proxy.store is not None
    return await proxy.store.list_clones()


async def records(proxy: Proxy) -> dict[str, tuple[str, str]]:
    """key -> (clone id, status) of the shared instances' durable records."""
    return {r.key: (r.clone_id, r.status) for r in await proxy.meta.shared_instances()}


def write_config(pg_dir: Path, **settings: Any) -> Path:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": None},
        "store": str(pg_dir / "store"),
        "snapshot": {"backend": "copy"},
        "runtime": {"kind": "process", "run_dir": str(pg_dir / "run")},
        "databases": {"one": recipe(pg_dir)},
    }
    cfg.update(settings)
    path = pg_dir / "taidon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[tuple[Proxy, str]]:
    """A proxy started from a config file and stopped at the end (a normal stop)."""
    proxy = await Proxy.open(parse_config(path.read_text(), source=path))
    try:
        await proxy.start()
        assert proxy.server is not None
        host, port = proxy.server.addresses[0].rsplit(":", 1)
        yield proxy, f"postgresql://postgres@{host}:{port}"
    finally:
        await proxy.close()


async def test_table_survives_the_idle_ttl_stop_and_the_next_connection_restarts_it(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, instances={"idle_ttl": "0.3s"})
    m = manager(p)
    await make_mine(p.dsn("one:dev"))
    [inst] = m.instances.values()
    pgdata = inst.handle.pgdata
    await wait_until(lambda: InstanceKey.parse("one:dev") in m.kept, 30, "the idle stop")
    # The server is gone, cleanly (no postmaster.pid: the next start needs no recovery);
    # the clone and its record stay.
    assert not m.instances
    await wait_until(lambda: not [q for q in processes_under(pgdata) if alive(q)], 15, "exit")
    assert not (pgdata / "postmaster.pid").exists()
    assert inst.clone_id in await clone_ids(p.proxy)
    assert (await records(p.proxy))["one:dev"] == (inst.clone_id, "stopped")
    # The next connection starts a server on the same clone.
    assert await fetch(p.dsn("one:dev"), "select v from mine") == "kept"
    [again] = m.instances.values()
    assert again.id == inst.id and again.handle.pid != inst.handle.pid
    assert (await records(p.proxy))["one:dev"] == (inst.clone_id, "running")
    assert await clone_ids(p.proxy) == {inst.clone_id}


async def test_per_connection_instances_are_still_thrown_away(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, instances={"idle_ttl": "0.3s"})
    m = manager(p)
    conn = await asyncpg.connect(p.dsn("one"), server_settings=ISOLATED, timeout=60)
    try:
        await conn.execute("create table mine (v text)")
        [inst] = m.instances.values()
        assert inst.isolation == "connection" and inst.record is None
    finally:
        await conn.close()
    await wait_until(lambda: not m.instances, 30, "the instance to go")
    assert inst.clone_id not in await clone_ids(p.proxy)
    assert await records(p.proxy) == {} and m.kept == {}
    assert await tables(p.dsn("one")) == ["t", "u"]


@needs_root
async def test_overlayfs_normal_restart_keeps_shared_clones_and_leaves_no_mount(
    pg_dir: Path,
) -> None:
    path = write_config(pg_dir, snapshot={"backend": "overlayfs"})
    store = pg_dir / "store"
    try:
        async with running(path) as (proxy, dsn):
            await make_mine(f"{dsn}/one")
            isolated = await asyncpg.connect(f"{dsn}/one", server_settings=ISOLATED, timeout=60)
            await isolated.execute("create table gone (v int)")
            m = manager(proxy)
            shared = (
                m.kept.get(InstanceKey.parse("one:default"))
                or m._shared[InstanceKey.parse("one:default")]
            )
            throwaway = next(i for i in m.instances.values() if i.isolation == "connection")
            assert mounts_under(store / "data" / "snaps"), "no layered state was built"
        isolated.terminate()
        # A normal stop: no mount of the store is left (views, clones, anything).
        assert mounts_under(store) == []
        async with running(path) as (proxy, dsn):
            m = manager(proxy)
            assert {str(k) for k in m.kept} == {"one:default"}
            assert await clone_ids(proxy) == {shared.clone_id}  # the throwaway one is gone
            assert throwaway.clone_id not in await clone_ids(proxy)
            assert await fetch(f"{dsn}/one", "select v from mine") == "kept"
            assert m.instances[shared.clone_id].key == InstanceKey.recipe("one")
            assert await tables(f"{dsn}/one") == ["mine", "t", "u"]
        assert mounts_under(store) == []
    finally:
        unmount_all(pg_dir)


@needs_root
async def test_kill_9_of_the_proxy_keeps_shared_clones_and_a_restart_leaves_no_mount(
    pg_dir: Path,
) -> None:
    port = free_port()
    store, run_dir = pg_dir / "store", pg_dir / "run"
    path = write_config(pg_dir, listen=f"127.0.0.1:{port}", snapshot={"backend": "overlayfs"})
    log = pg_dir / "serve.log"
    procs: list[subprocess.Popen[bytes]] = []

    def serve() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*SQLRS, "--config", str(path), "serve"], stdout=out, stderr=out,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        procs.append(proc)
        wait_listening(proc, port, log)
        return proc

    dsn = f"postgresql://postgres@127.0.0.1:{port}/one"
    held: asyncpg.Connection | None = None
    try:
        first = await asyncio.to_thread(serve)
        await make_mine(f"{dsn}:dev")
        held = await asyncpg.connect(dsn, server_settings=ISOLATED, timeout=60)
        orphans = {q for q in processes_under(run_dir) if alive(q)}
        assert orphans, "no instance process found"
        first.kill()
        first.wait(timeout=10)
        held.terminate()
        assert all(alive(q) for q in orphans)
        second = await asyncio.to_thread(serve)
        # The servers the killed proxy left are reaped; the shared clone is not.
        await wait_until(lambda: not any(alive(q) for q in orphans), 30, "the reap")
        assert await fetch(f"{dsn}:dev", "select v from mine") == "kept"
        assert await tables(f"{dsn}:dev") == ["mine", "t", "u"]
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        assert second.returncode == 0, log.read_text(errors="replace")
        # kill -9, restart, normal stop: nothing of the store stays mounted.
        assert mounts_under(store) == []
        db = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True)
        try:
            kept = db.execute("SELECT key, status FROM shared_instances").fetchall()
        finally:
            db.close()
        assert kept == [("one:dev", "stopped")]
        clone_records = sorted(os.listdir(store / "data" / "meta" / "clone"))
        assert len(clone_records) == 1  # the per-connection clone went at the restart
    except BaseException:
        sys.stderr.write(f"--- sqlrs serve log ---\n{log.read_text(errors='replace')}\n")
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for q in processes_under(pg_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(q, signal.SIGKILL)
        unmount_all(pg_dir)


class Api:
    def __init__(self, p: RunningProxy, http: aiohttp.ClientSession) -> None:
        assert p.proxy.admin is not None and p.proxy.admin.address is not None
        self.base = f"http://{p.proxy.admin.address}"
        self.headers = {"Authorization": f"Bearer {read_token(p.proxy.config.store)}"}
        self.http = http

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, headers=self.headers, **kw) as r:
            return r.status, await r.json()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def test_listing_shows_stopped_instances_and_reset_and_rm_remove_their_clones(
    make_proxy: ProxyFactory, pg_dir: Path, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy(
        {"one": recipe(pg_dir)},
        admin={"listen": "127.0.0.1:0"},
        instances={"idle_ttl": "0.3s", "retention": "3d", "warm": 1},
    )
    m, api = manager(p), Api(p, http)
    for label in ("a", "b"):
        await make_mine(p.dsn(f"one:{label}"))
    await fetch(p.dsn("one"), "select 1", server_settings=ISOLATED)  # the warm pool fills
    await wait_until(lambda: {"one:a", "one:b"} <= {str(k) for k in m.kept}, 30, "the idle stops")
    await wait_until(lambda: any(i.status == "spare" for i in m.instances.values()), 30, "spare")
    # The isolated client's own instance goes away after it left: on a busy machine, later.
    isolated = [i for i in m.instances.values() if i.isolation == "connection"]
    await wait_until(
        lambda: all(i.status == "spare" or i.id not in m.instances for i in isolated),
        30, "the isolated instance's removal",
    )  # fmt: skip
    status, listing = await api.call("GET", "/v1/instances")
    assert status == 200
    by_key = {i["key"]: i for i in listing}
    for label in ("a", "b"):
        view = by_key[f"one:{label}"]
        assert view["status"] == "stopped" and view["isolation"] == "shared"
        assert view["id"] == m.kept[InstanceKey.parse(f"one:{label}")].clone_id
        assert view["retention_seconds"] == 3 * 86400
        assert 3 * 86400 - 60 < view["expires_in_seconds"] <= 3 * 86400
        assert view["recipe_current"] is True and view["recipe_state"] == view["state"]
    assert [i["status"] for i in listing if i["isolation"] == "connection"] == ["spare"]
    # reset of a stopped instance: its clone goes; the next connection gets a fresh one.
    a = m.kept[InstanceKey.parse("one:a")]
    status, out = await api.call("POST", "/v1/aliases/one/reset", json={"label": "a"})
    assert status == 200 and out["instance"]["id"] == a.clone_id
    assert a.clone_id not in await clone_ids(p.proxy) and "one:a" not in await records(p.proxy)
    assert await tables(p.dsn("one:a")) == ["t", "u"]
    # reset of a running one too (its sessions end with 57P01).
    conn = await asyncpg.connect(p.dsn("one:a"), timeout=60)
    running_id = m._shared[InstanceKey.parse("one:a")].clone_id
    status, _ = await api.call("POST", "/v1/aliases/one/reset", json={"label": "a"})
    assert status == 200 and running_id not in await clone_ids(p.proxy)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await conn.fetchval("select 1")
    conn.terminate()
    # rm (DELETE) of a stopped instance, by ALIAS:LABEL, removes its clone.
    b = m.kept[InstanceKey.parse("one:b")]
    status, out = await api.call("DELETE", "/v1/instances/one:b")
    assert status == 200 and out["instance"]["status"] == "stopped"
    assert InstanceKey.parse("one:b") not in m.kept and b.clone_id not in await clone_ids(p.proxy)
    assert "one:b" not in await records(p.proxy)
    status, _ = await api.call("GET", "/v1/instances/one:b")
    assert status == 404


async def test_a_changed_recipe_keeps_serving_the_kept_clone_and_says_so(
    make_proxy: ProxyFactory, pg_dir: Path, http: aiohttp.ClientSession
) -> None:
    dbs = {"one": recipe(pg_dir)}
    p = await make_proxy(dbs, admin={"listen": "127.0.0.1:0"}, instances={"idle_ttl": "0.3s"})
    m, api = manager(p), Api(p, http)
    await make_mine(p.dsn("one"))
    await wait_until(lambda: InstanceKey.parse("one:default") in m.kept, 30, "the idle stop")
    old_state = m.kept[InstanceKey.parse("one:default")].state_id
    Path(dbs["one"]["prepare"]["files"][1]).write_text("create table u2 (y int);\n")
    status, [view] = await api.call("GET", "/v1/instances")
    assert status == 200 and view["state"] == old_state and view["recipe_current"] is False
    # Still the user's database, not the new recipe's.
    assert await tables(p.dsn("one")) == ["mine", "t", "u"]
    status, [view] = await api.call("GET", "/v1/instances")
    assert view["status"] == "running" and view["recipe_current"] is False
    status, _ = await api.call("POST", "/v1/aliases/one/reset", json={"label": "default"})
    assert status == 200
    assert await tables(p.dsn("one")) == ["t", "u2"]
    status, [view] = await api.call("GET", "/v1/instances")
    assert view["state"] != old_state and view["recipe_current"] is True


async def test_retention_removes_a_stopped_clone_while_running_and_at_start(
    pg_dir: Path,
) -> None:
    path = write_config(pg_dir, instances={"idle_ttl": "0.2s", "retention": "2s"})
    async with running(path) as (proxy, dsn):
        m = manager(proxy)
        await make_mine(f"{dsn}/one:old")
        await wait_until(lambda: InstanceKey.parse("one:old") in m.kept, 30, "the idle stop")
        rec = m.kept[InstanceKey.parse("one:old")]
        # Periodically: once the retention has passed since its last use, it goes.
        await wait_until(lambda: InstanceKey.parse("one:old") not in m.kept, 30, "the retention")
        assert time.time() - rec.last_used >= 2
        assert rec.clone_id not in await clone_ids(proxy)
        assert await records(proxy) == {}
        assert await tables(f"{dsn}/one:old") == ["t", "u"]
    # At start: a clone last used longer ago than the retention goes before listening.
    path = write_config(pg_dir, instances={"idle_ttl": "10m", "retention": "never"})
    async with running(path) as (proxy, dsn):
        await make_mine(f"{dsn}/one:old")
        kept = manager(proxy)._shared[InstanceKey.parse("one:old")].clone_id
    db = sqlite3.connect(pg_dir / "store" / "meta.sqlite")
    db.execute("UPDATE shared_instances SET last_used = ?", (time.time() - 7200,))
    db.commit()
    db.close()
    path = write_config(pg_dir, instances={"retention": "1h"})
    async with running(path) as (proxy, dsn):
        assert manager(proxy).kept == {}
        assert kept not in await clone_ids(proxy)
        assert await tables(f"{dsn}/one:old") == ["t", "u"]


async def test_a_kept_clone_keeps_its_state_from_eviction(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy(
        {"one": recipe(pg_dir)},
        instances={"idle_ttl": "0.2s"},
        cache={"max_size": "1TiB", "min_free": "0%"},
    )
    m, ev = manager(p), p.proxy.evictor
    assert ev is not None and p.proxy.store is not None
    ev.grace = 0
    await make_mine(p.dsn("one"))
    await wait_until(lambda: InstanceKey.parse("one:default") in m.kept, 30, "the idle stop")
    state = m.kept[InstanceKey.parse("one:default")].state_id
    await p.proxy.store.settle()
    ev.cfg = CacheConfig(max_size=0, min_free="0%")
    await ev.gc()
    assert await p.proxy.meta.get_state(state) is not None
    assert await fetch(p.dsn("one"), "select v from mine") == "kept"
    assert await m.reset(InstanceKey.recipe("one"))
    assert state in {e.id for e in await ev.gc()}
