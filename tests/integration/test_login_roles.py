"""A role the state does not have: refused with a hint naming the roles that exist, and once
known, refused before anything is cloned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import ProxyFactory

pytestmark = pytest.mark.integration


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "r.sql"
    f.write_text("create role made_by_sql login;\ncreate table t as select 1 x;\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": ["app"]}


async def test_unknown_role_gets_a_hint_and_later_no_clone(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"r": recipe(pg_dir)})
    manager = p.proxy.instances
    assert manager is not None
    starts = 0
    start = manager.runtime.start

    async def counting_start(*args: Any, **kw: Any) -> Any:
        nonlocal starts
        starts += 1
        return await start(*args, **kw)

    manager.runtime.start = counting_start  # type: ignore[method-assign]
    isolated = {"options": "-c taidon.isolation=connection"}
    for attempt in range(2):
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as err:
            await asyncpg.connect(p.dsn("r", user="root"), server_settings=isolated)
        assert 'role "root" does not exist' in str(err.value)
        assert err.value.hint == "roles that can log in here: app, made_by_sql, postgres"
        if attempt == 0:
            first = starts
    assert starts == first  # the second refusal started no instance
    # Roles the recipe declares, the superuser and roles its own SQL made all get in.
    for user in ("app", "postgres", "made_by_sql"):
        conn = await asyncpg.connect(p.dsn("r", user=user))
        try:
            assert await conn.fetchval("select current_user") == user
        finally:
            await conn.close()
