"""Live states at changeset boundaries on copy-on-write stores: frozen (overlayfs) and not
frozen (btrfs, whose snapshots are atomic). Each intermediate state holds exactly its work."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare.liquibase import adapter
from taidon_proxy.prepare.liquibase.adapter import CHECKPOINT_AFTER_WAL
from taidon_proxy.prepare.liquibase.plan import ChangeSet
from tests.conftest import ProxyFactory, RunningProxy
from tests.integration.test_liquibase_build import (
    copy_project,
    events,
    lb_recipe,
    needs_liquibase,
)

pytestmark = [pytest.mark.integration, pytest.mark.liquibase, pytest.mark.root, needs_liquibase]


async def check_boundary_states(p: RunningProxy) -> list[str]:
    """Every state of tests/data/liquibase/basic holds exactly its changesets; their ids."""
    builder = p.proxy.builder
    assert builder is not None
    planned = await builder.plan("shop")
    assert len(planned) == 4 and all(s.cached for s in planned)
    items = [0, 1, 2, 2]  # rows in `item` after changesets 1..4
    for n, step in enumerate(planned, start=1):
        conn = await asyncpg.connect(p.dsn(f"state:{step.state_id}"), timeout=60)
        try:
            assert await conn.fetchval("select count(*) from databasechangelog") == n
            assert await conn.fetchval("select count(*) from item") == items[n - 1]
        finally:
            await conn.close()
    return [s.state_id for s in planned]


async def test_every_boundary_state_holds_exactly_its_changesets(
    cow_store: tuple[str, Path], make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    kind, store = cow_store
    p = await make_proxy(
        {"shop": lb_recipe(copy_project(pg_dir))}, store=str(store), snapshot={"backend": kind}
    )
    assert p.proxy.store is not None
    assert p.proxy.store.backend.capabilities.atomic_snapshot is (kind == "btrfs")
    builder = p.proxy.builder
    assert builder is not None
    await builder.resolve("shop")
    await check_boundary_states(p)


def plan_after_boundaries(
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    edit: Callable[[list[ChangeSet]], list[ChangeSet]] = lambda plan: plan,
) -> None:
    """The offline plan arrives only after `count` boundaries (a slow plan JVM), edited."""
    seen = 0
    real_boundary, real_plan = adapter._Run.on_boundary, adapter.liquibase_plan

    async def boundary(run: Any) -> None:
        nonlocal seen
        await real_boundary(run)
        seen += 1

    async def plan(*args: Any, **kwargs: Any) -> list[ChangeSet]:
        result = await real_plan(*args, **kwargs)
        async with asyncio.timeout(120):
            while seen < count:
                await asyncio.sleep(0.01)
        return edit(result)

    monkeypatch.setattr(adapter._Run, "on_boundary", boundary)
    monkeypatch.setattr(adapter, "liquibase_plan", plan)


async def test_states_taken_before_the_plan_are_published_after_it(
    cow_store: tuple[str, Path], make_proxy: ProxyFactory, pg_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    kind, store = cow_store
    plan_after_boundaries(monkeypatch, 4)
    p = await make_proxy(
        {"shop": lb_recipe(copy_project(pg_dir))}, store=str(store), snapshot={"backend": kind}
    )
    builder = p.proxy.builder
    assert builder is not None
    final = await builder.resolve("shop")
    assert (await check_boundary_states(p))[-1] == final
    job = list(builder.jobs.values())[-1]
    labels = ["1::ann", "2::ann", "3::bob", "4::bob"]
    assert events(job, "step.start") == [f"changeset {i}/4 {x}" for i, x in enumerate(labels, 1)]
    assert [e.split(" -> ")[0] for e in events(job, "snapshot")][-4:] == labels


async def test_states_taken_before_a_plan_they_contradict_are_dropped(
    cow_store: tuple[str, Path], make_proxy: ProxyFactory, pg_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    kind, store = cow_store

    def edit(plan: list[ChangeSet]) -> list[ChangeSet]:
        return [plan[0], replace(plan[1], md5sum="9:0000"), *plan[2:]]

    plan_after_boundaries(monkeypatch, 4, edit)
    p = await make_proxy(
        {"shop": lb_recipe(copy_project(pg_dir))}, store=str(store), snapshot={"backend": kind}
    )
    states = p.proxy.store
    assert p.proxy.builder is not None and states is not None
    with pytest.raises(BuildFailed, match="changeset 2/4"):
        await p.proxy.builder.resolve("shop")
    rows = {r.id: r.kind for r in await states.meta.states()}
    assert "lb" not in rows.values(), "nothing of a contradicted run is a state"
    assert set(await states.backend.list_snapshots()) == set(rows), "no snapshot left behind"


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def wal_after_redo(pgdata: Path) -> int:
    """Bytes of WAL a server started on pgdata replays: from the checkpoint's redo to the end."""
    bin_dir = Path("/usr/lib/postgresql/15/bin")
    control = subprocess.run(
        [str(bin_dir / "pg_controldata"), str(pgdata)], capture_output=True, text=True, check=True
    ).stdout
    redo = next(
        line.split(":", 1)[1].strip()
        for line in control.splitlines()
        if line.startswith("Latest checkpoint's REDO location")
    )
    # pg_waldump stops with an error at the end of valid WAL: that end is what we want.
    dump = subprocess.run(
        [str(bin_dir / "pg_waldump"), "-p", str(pgdata / "pg_wal"), "-s", redo],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    lsns = [_lsn(m) for m in re.findall(r"lsn: ([0-9A-F]+/[0-9A-F]+)", dump)]
    return max(lsns, default=_lsn(redo)) - _lsn(redo)


async def test_boundary_states_need_only_a_short_redo(
    cow_store: tuple[str, Path], make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    """States are taken without a CHECKPOINT at every boundary: the last one has one, the others
    replay at most CHECKPOINT_AFTER_WAL (plus one changeset) when a server starts on them."""
    kind, store = cow_store
    p = await make_proxy(
        {"shop": lb_recipe(copy_project(pg_dir))}, store=str(store), snapshot={"backend": kind}
    )
    builder, states = p.proxy.builder, p.proxy.store
    assert builder is not None and states is not None
    await builder.resolve("shop")
    planned = await builder.plan("shop")
    replay = []
    for step in planned:
        clone_id, path = await states.clone(step.state_id, "t")
        try:
            replay.append(await asyncio.to_thread(wal_after_redo, path / "pgdata"))
        finally:
            await states.remove_clone(clone_id)
    assert replay[-1] < 16384, replay  # the checkpoint record and little else
    assert max(replay) < CHECKPOINT_AFTER_WAL + (1 << 20), replay
