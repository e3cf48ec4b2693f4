"""Live states at changeset boundaries on copy-on-write stores: frozen (overlayfs) and not
frozen (btrfs, whose snapshots are atomic). Each intermediate state holds exactly its work."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ProxyFactory
from tests.integration.test_liquibase_build import copy_project, lb_recipe, needs_liquibase

pytestmark = [pytest.mark.integration, pytest.mark.liquibase, pytest.mark.root, needs_liquibase]


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
    planned = await builder.plan("shop")
    assert len(planned) == 4 and all(s.cached for s in planned)
    items = [0, 1, 2, 2]  # rows in `item` after changesets 1..4 of tests/data/liquibase/basic
    for n, step in enumerate(planned, start=1):
        conn = await asyncpg.connect(p.dsn(f"state:{step.state_id}"), timeout=60)
        try:
            assert await conn.fetchval("select count(*) from databasechangelog") == n
            assert await conn.fetchval("select count(*) from item") == items[n - 1]
        finally:
            await conn.close()
