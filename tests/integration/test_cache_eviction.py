"""Cache capacity with a real proxy and real builds: eviction order, protection, fast path."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.app import Proxy
from taidon_proxy.config import CacheConfig
from taidon_proxy.errors import ConfigError
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.store.eviction import Evictor
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

NO_LIMIT = {"max_size": "1TiB", "min_free": "0%"}


def sql_recipe(pg_dir: Path, alias: str, *steps: str, **extra: Any) -> dict[str, Any]:
    """A psql recipe of one file per step, written under pg_dir/alias."""
    d = pg_dir / "recipes" / alias
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i, text in enumerate(steps):
        f = d / f"{i:02d}.sql"
        f.write_text(text)
        files.append(str(f))
    return {"prepare": {"kind": "psql", "files": files}, **extra}


def table_step(name: str, rows: int = 3) -> str:
    return f"create table {name} (id int); insert into {name} select generate_series(1, {rows});\n"


async def count(p: RunningProxy, database: str, table: str) -> int:
    conn = await asyncpg.connect(p.dsn(database), timeout=60)
    try:
        return int(await conn.fetchval(f"select count(*) from {table}"))
    finally:
        await conn.close()


def parts(p: RunningProxy) -> tuple[Proxy, Evictor]:
    assert p.proxy.evictor is not None and p.proxy.builder is not None
    return p.proxy, p.proxy.evictor


async def leaf_of(proxy: Proxy, alias: str) -> str:
    """Build (or find) an alias's state; sizes are measured in the background: wait for them."""
    assert proxy.builder is not None and proxy.store is not None
    sid = await proxy.builder.resolve(alias)
    await proxy.store.settle()
    return sid


async def age(proxy: Proxy, state_id: str, *, hours: float, uses: int = 0) -> None:
    """Make a state look last used `hours` ago with `uses` uses (what days of traffic do)."""
    when = time.time() - hours * 3600
    await proxy.meta.run(
        lambda: proxy.meta.db.execute(
            "UPDATE states SET last_used = ?, use_count = ? WHERE id = ?", (when, uses, state_id)
        )
    )


async def state_ids(proxy: Proxy) -> set[str]:
    return {r.id for r in await proxy.meta.states()}


def limit(evictor: Evictor, max_size: int) -> None:
    evictor.cfg = CacheConfig(max_size=max_size, min_free="0%")


def squeeze(evictor: Evictor, path: Path) -> None:
    """Ask for more free space than the filesystem has: everything evictable must go."""
    st = os.statvfs(path)
    evictor.cfg = CacheConfig(max_size=2**40, min_free=str(st.f_blocks * st.f_frsize))


async def wait_no_instances(proxy: Proxy) -> None:
    assert proxy.instances is not None
    async with asyncio.timeout(30):
        while proxy.instances.instances:
            await asyncio.sleep(0.05)


async def test_order_follows_value_and_cascades_to_parents(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    dbs = {
        "a": sql_recipe(pg_dir, "a", table_step("t1"), table_step("t2")),
        "b": sql_recipe(pg_dir, "b", table_step("u1")),
        "c": sql_recipe(pg_dir, "c", table_step("v1")),
    }
    p = await make_proxy(dbs, cache=NO_LIMIT)
    proxy, ev = parts(p)
    ev.grace = 0
    leaf = {a: await leaf_of(proxy, a) for a in dbs}
    rows = {r.id: r for r in await proxy.meta.states()}
    a_mid = rows[leaf["a"]].parent
    assert a_mid is not None and rows[a_mid].kind == "psql"
    # b: idle for days, c: used often and recently, a: in between.
    await age(proxy, leaf["b"], hours=72, uses=1)
    await age(proxy, leaf["a"], hours=10, uses=2)
    await age(proxy, a_mid, hours=10, uses=0)
    await age(proxy, leaf["c"], hours=0.1, uses=50)
    usage = await ev.usage()
    assert usage.state_count == len(rows) == 1 + 3 + 4  # initdb, 3 roots, 4 steps
    assert usage.used_bytes == sum(r.size_bytes for r in rows.values()) > 0

    # Room for everything but one leaf: the least valuable (b) goes, nothing else.
    heard: list[str] = []
    ev.listeners.append(lambda e: heard.append(e.id))
    limit(ev, usage.used_bytes - 1)
    plan = await ev.gc(dry_run=True)
    assert plan and plan[0].id == leaf["b"]
    assert await state_ids(proxy) == set(rows), "a dry run removed something"
    assert heard == []
    gone = await ev.gc()
    assert [e.id for e in gone] == [e.id for e in plan] == heard
    assert gone[0].id == leaf["b"] and gone[0].reason == "max_size"
    after = await ev.usage()
    assert after.used_bytes <= after.low_water_bytes
    assert ev.stats.evicted_states == len(gone)

    # No room at all: a's leaf, then its parent (now a leaf), then c; bases stay.
    limit(ev, 0)
    gone2 = [e.id for e in await ev.gc()]
    left = await state_ids(proxy) - {e.id for e in gone}
    assert leaf["a"] in gone2 and a_mid in gone2 and leaf["c"] in gone2
    assert gone2.index(leaf["a"]) < gone2.index(a_mid)
    assert {rows[s].kind for s in await state_ids(proxy)} == {"initdb", "root"}
    assert await state_ids(proxy) == left - set(gone2)
    # The snapshots went with the rows.
    assert proxy.backend is not None
    assert set(await proxy.backend.list_snapshots()) == await state_ids(proxy)


async def test_named_pinned_and_in_use_are_kept(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    dbs = {
        "named": sql_recipe(pg_dir, "named", table_step("n1")),
        "pinned": sql_recipe(pg_dir, "pinned", table_step("p1")),
        "used": sql_recipe(
            pg_dir, "used", table_step("x1"), table_step("x2"), isolation="connection"
        ),
        "free": sql_recipe(pg_dir, "free", table_step("f1")),
    }
    p = await make_proxy(dbs, cache=NO_LIMIT)
    proxy, ev = parts(p)
    ev.grace = 0
    leaf = {a: await leaf_of(proxy, a) for a in dbs}
    await proxy.meta.set_name("keep-me", leaf["named"])
    await proxy.meta.set_pinned(leaf["pinned"], True)
    rows = {r.id: r for r in await proxy.meta.states()}
    used_mid = rows[leaf["used"]].parent
    for sid in leaf.values():
        await age(proxy, sid, hours=100)
    conn = await asyncpg.connect(p.dsn("used"), timeout=60)
    try:
        assert await conn.fetchval("select count(*) from x2") == 3
        limit(ev, 0)
        gone = {e.id for e in await ev.gc()}
        assert gone == {leaf["free"]}
        left = await state_ids(proxy)
        assert {leaf["named"], leaf["pinned"], leaf["used"], used_mid} <= left
        # The live connection is untouched.
        assert await conn.fetchval("select count(*) from x1") == 3
    finally:
        await conn.close()
    # Once its instance is gone, the unused leaf and then its parent may go.
    await wait_no_instances(proxy)
    order = [e.id for e in await ev.gc()]
    assert order == [leaf["used"], used_mid]
    assert {leaf["named"], leaf["pinned"]} <= await state_ids(proxy)


async def test_evicted_state_is_rebuilt_not_served_from_the_fast_path(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    dbs = {"a": sql_recipe(pg_dir, "a", table_step("t1", 5), table_step("t2", 7))}
    p = await make_proxy(dbs, cache=NO_LIMIT)
    proxy, ev = parts(p)
    assert proxy.builder is not None
    ev.grace = 0
    assert await count(p, "a", "t2") == 7
    key = await proxy.builder.recipe_key("a")
    remembered = await proxy.meta.fingerprint(key)
    assert remembered is not None
    final = remembered[1]
    assert proxy.instances is not None
    await proxy.instances.reset(InstanceKey.recipe("a"))
    await age(proxy, final, hours=5)
    # Just enough pressure for one leaf.
    limit(ev, (await ev.usage()).used_bytes - 1)
    gone = [e.id for e in await ev.gc()]
    assert gone == [final]
    assert await proxy.meta.fingerprint(key) is None
    jobs_before = len(proxy.builder.jobs)
    limit(ev, 2**40)
    assert await count(p, "a", "t2") == 7
    assert len(proxy.builder.jobs) == jobs_before + 1, "the evicted state was not rebuilt"
    job = list(proxy.builder.jobs.values())[-1]
    snapshots = [e for e in job.events if e.kind == "snapshot"]
    assert len(snapshots) == 1, "only the evicted step should be built again"
    assert await proxy.meta.get_state(final) is not None


async def test_builds_evict_automatically_above_high_water(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    # Measure one build's states first, on a store without a limit.
    probe = await make_proxy({"a": sql_recipe(pg_dir, "probe", table_step("t1"))}, cache=NO_LIMIT)
    pproxy, _ = parts(probe)
    await leaf_of(pproxy, "a")
    sizes = {r.kind: r.size_bytes for r in await pproxy.meta.states()}
    # Base (initdb) + three roots + two leaves fit under the low-water mark; a third leaf
    # goes above the high-water mark.
    two = sizes["initdb"] + 3 * sizes["root"] + 2 * sizes["psql"]
    cap = int(two / 0.9) + sizes["psql"] // 10
    assert two + sizes["psql"] > cap, "states too small for this test's arithmetic"
    dbs = {a: sql_recipe(pg_dir, a, table_step(f"{a}_t")) for a in ("a", "b", "c")}
    p = await make_proxy(dbs, cache={"max_size": cap, "min_free": "0%"})
    proxy, ev = parts(p)
    # Default grace: c, just built, is protected; a and b are made to look old.
    leaf_a = await leaf_of(proxy, "a")
    await age(proxy, leaf_a, hours=50)
    leaf_b = await leaf_of(proxy, "b")
    await age(proxy, leaf_b, hours=1)
    assert ev.stats.evicted_states == 0
    leaf_c = await leaf_of(proxy, "c")
    async with asyncio.timeout(30):  # eviction runs in the background after the commit
        while leaf_a in await state_ids(proxy):
            await asyncio.sleep(0.05)
    left = await state_ids(proxy)
    assert leaf_b in left and leaf_c in left
    assert ev.stats.evicted_states >= 1
    assert ev.stats.recent[0].id == leaf_a
    usage = await ev.usage()
    assert usage.used_bytes <= usage.high_water_bytes
    # The evicted recipe still serves (rebuilt), with correct data.
    assert await count(p, "a", "a_t") == 3


async def test_grace_protects_a_state_just_built(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    p = await make_proxy({"a": sql_recipe(pg_dir, "a", table_step("t1"))}, cache=NO_LIMIT)
    proxy, ev = parts(p)
    assert ev.grace > 0
    leaf = await leaf_of(proxy, "a")
    limit(ev, 0)
    assert await ev.gc() == []
    assert leaf in await state_ids(proxy)


async def test_backend_refusal_skips_a_state_with_a_clone(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    """A build's clone is not in in_use; the backend's own refusal must keep the state."""
    dbs = {
        "a": sql_recipe(pg_dir, "a", table_step("t1")),
        "b": sql_recipe(pg_dir, "b", table_step("u1")),
    }
    p = await make_proxy(dbs, cache=NO_LIMIT)
    proxy, ev = parts(p)
    ev.grace = 0
    leaf_a, leaf_b = await leaf_of(proxy, "a"), await leaf_of(proxy, "b")
    await age(proxy, leaf_a, hours=99)
    await age(proxy, leaf_b, hours=1)
    assert proxy.store is not None
    clone_id, _ = await proxy.store.clone(leaf_a, "b")
    try:
        limit(ev, 0)
        gone = [e.id for e in await ev.gc()]
        assert gone == [leaf_b]
        assert ev.stats.busy_skipped == 1
        assert leaf_a in await state_ids(proxy)
    finally:
        await proxy.store.remove_clone(clone_id)
    assert [e.id for e in await ev.gc()] == [leaf_a]


async def test_min_free_triggers_eviction(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    p = await make_proxy({"a": sql_recipe(pg_dir, "a", table_step("t1"))}, cache=NO_LIMIT)
    proxy, ev = parts(p)
    ev.grace = 0
    leaf = await leaf_of(proxy, "a")
    usage = await ev.usage()
    assert usage.min_free_bytes == 0 and not usage.above_high_water
    # The background pass (periodic, or requested by a size measurement) would otherwise race
    # this explicit one for the same victim and leave it nothing to report.
    await ev.close()
    squeeze(ev, pg_dir)
    assert (await ev.usage()).above_high_water
    gone = await ev.maybe_evict()
    assert [e.id for e in gone] == [leaf] and gone[0].reason == "min_free"


async def test_bad_min_free_fails_at_start(make_proxy: ProxyFactory) -> None:
    with pytest.raises(ConfigError, match=r"cache\.min_free"):
        await make_proxy({}, cache={"min_free": "lots"})
    p = await make_proxy({}, cache={"max_size": "1GiB", "min_free": "25%"})
    usage = await parts(p)[1].usage()
    assert usage.min_free_bytes == usage.total_bytes // 4
    assert usage.low_water_bytes == int(0.9 * 2**30) and usage.high_water_bytes == 2**30
    assert usage.free_bytes <= usage.total_bytes


@pytest.mark.root
async def test_eviction_on_layered_backends(
    cow_store: tuple[str, Path], pg_dir: Path, make_proxy: ProxyFactory
) -> None:
    backend, store = cow_store
    dbs = {
        "a": sql_recipe(pg_dir, "a", table_step("t1", 4), table_step("t2", 6)),
        "b": sql_recipe(pg_dir, "b", table_step("u1")),
    }
    p = await make_proxy(dbs, cache=NO_LIMIT, store=str(store), snapshot={"backend": backend})
    proxy, ev = parts(p)
    assert proxy.backend_name == backend and proxy.backend is not None
    ev.grace = 0
    leaf_a, leaf_b = await leaf_of(proxy, "a"), await leaf_of(proxy, "b")
    mid_a = (await proxy.meta.get_state(leaf_a)).parent  # type: ignore[union-attr]
    conn = await asyncpg.connect(p.dsn("a"), timeout=60)
    try:
        # Shared blocks make sizes tiny (btrfs counts exclusive bytes): press with free space.
        squeeze(ev, store)
        assert [e.id for e in await ev.gc()] == [leaf_b]
        assert await conn.fetchval("select count(*) from t2") == 6
    finally:
        await conn.close()
    assert proxy.instances is not None
    await proxy.instances.reset(InstanceKey.recipe("a"))
    assert [e.id for e in await ev.gc()] == [leaf_a, mid_a]
    rows = {r.id for r in await proxy.meta.states()}
    assert set(await proxy.backend.list_snapshots()) == rows
    # What is left (initdb, roots) still builds and serves.
    limit(ev, 2**40)
    assert await count(p, "a", "t2") == 6
    assert await count(p, "b", "u1") == 3
