"""Routing through real clients: alias, alias:label, state:<ref>, taidon.* switches stripped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import ProxyFactory

pytestmark = pytest.mark.integration

TINY_SQL = """
create table t (x int);
insert into t values (1);
create schema s1;
create table s1.marker (v text);
insert into s1.marker values ('s1');
"""


def tiny_recipe(pg_dir: Path, **extra: Any) -> dict[str, Any]:
    f = pg_dir / "tiny.sql"
    f.write_text(TINY_SQL)
    return {"prepare": {"kind": "psql", "files": [str(f)]}, **extra}


async def test_switches_stripped_every_other_parameter_forwarded(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"tiny": tiny_recipe(pg_dir)}, store=store)
    options = (
        "-c search_path=s1,public -c taidon.instance=fwd -c work_mem=7MB"
        " -c taidon.isolation=shared --statement_timeout=12345 -c taidon.ttl=30s"
    )
    conn = await asyncpg.connect(
        p.dsn("tiny"),
        server_settings={
            "options": options,
            "application_name": "route-test",
            "extra_float_digits": "2",
        },
    )
    try:
        row = await conn.fetchrow(
            "select current_setting('search_path') sp, current_setting('application_name') app,"
            " current_setting('work_mem') wm, current_setting('statement_timeout') st,"
            " current_setting('extra_float_digits') efd, current_database() db,"
            " current_setting('taidon.instance', true) ti,"
            " current_setting('taidon.isolation', true) tiso,"
            " current_setting('taidon.ttl', true) tttl"
        )
        assert row["sp"] == "s1,public"
        assert row["app"] == "route-test"
        assert row["wm"] == "7MB"
        assert row["st"] == "12345ms"
        assert row["efd"] == "2"
        assert row["db"] == "tiny"
        # Postgres accepts any dotted name as a placeholder GUC: had the proxy forwarded the
        # switches, these would be set inside the instance.
        assert (row["ti"], row["tiso"], row["tttl"]) == (None, None, None)
        # search_path from options took effect: the unqualified name resolves into s1.
        assert await conn.fetchval("select v from marker") == "s1"
        # The switch chose the label: the instance is the shared "tiny:fwd".
        keys = {str(i.key) for i in p.proxy.instances.instances.values()}  # type: ignore[union-attr]
        assert keys == {"tiny:fwd"}
    finally:
        await conn.close()


async def test_psycopg_options_and_psql_application_name(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"tiny": tiny_recipe(pg_dir)}, store=store)
    async with await psycopg.AsyncConnection.connect(
        p.dsn("tiny"),
        options=r"-c taidon.instance=ps -c search_path=s1 -c my.custom=a\ b",
        application_name="psy",
    ) as conn:
        cur = await conn.execute(
            "select current_setting('search_path'), current_setting('my.custom'),"
            " current_setting('application_name'), current_setting('taidon.instance', true)"
        )
        # The escaped space survives the strip-and-rejoin of the options string.
        assert await cur.fetchone() == ("s1", "a b", "psy", None)


async def test_switch_only_options_are_dropped_entirely(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"tiny": tiny_recipe(pg_dir)}, store=store)
    conn = await asyncpg.connect(
        p.dsn("tiny"), server_settings={"options": "-c taidon.instance=only"}
    )
    try:
        assert await conn.fetchval("select count(*) from t") == 1
        assert await conn.fetchval("select current_setting('taidon.instance', true)") is None
    finally:
        await conn.close()


async def test_state_routes_by_prefix_name_and_switch(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"tiny": tiny_recipe(pg_dir)}, store=store)
    assert p.proxy.builder is not None and p.proxy.store is not None
    sid = await p.proxy.builder.resolve("tiny")
    await p.proxy.store.meta.set_name("golden", sid)
    for database, options in (
        (f"state:{sid[:12]}", None),
        ("state:golden", None),
        ("tiny", f"-c taidon.state={sid[:10]}"),
    ):
        settings = {"options": options} if options else {}
        conn = await asyncpg.connect(p.dsn(database), server_settings=settings)
        try:
            assert await conn.fetchval("select current_database()") == "tiny"
            assert await conn.fetchval("select count(*) from t") == 1
        finally:
            await conn.close()
    keys = {str(i.key) for i in p.proxy.instances.instances.values()}  # type: ignore[union-attr]
    assert f"state:{sid}:default" in keys
    with pytest.raises(asyncpg.InvalidCatalogNameError, match='state "ffff0000" does not exist'):
        await asyncpg.connect(p.dsn("state:ffff0000"))
    with pytest.raises(asyncpg.InvalidCatalogNameError, match='state "nosuch" does not exist'):
        await asyncpg.connect(p.dsn("state:nosuch"))


BAD_ROUTES = [
    ("tiny:bad label", None, "42602", 'invalid instance label "bad label"'),
    ("tiny:" + "x" * 64, None, "42602", "invalid instance label"),
    ("tiny", "-c taidon.bogus=1", "42602", 'unrecognized configuration parameter "taidon.bogus"'),
    ("tiny", "-c taidon.isolation=private", "42602", "invalid value for taidon.isolation"),
    ("tiny", "-c taidon.ttl=soon", "42602", "invalid value for taidon.ttl"),
    ("tiny", "-c taidon.instance=a/b", "42602", 'invalid instance label "a/b"'),
    ("tiny", "-c taidon.instance", "42602", "needs a value"),
    ("state:", None, "42602", "needs a state id prefix or name"),
    ("nosuch", None, "3D000", 'database "nosuch" does not exist'),
    (":ci", None, "42602", 'database ":ci" names no recipe alias'),
]


async def test_bad_routes_are_clear_errors(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"tiny": tiny_recipe(pg_dir)}, store=store)
    for database, options, sqlstate, needle in BAD_ROUTES:
        settings = {"options": options} if options else {}
        with pytest.raises(asyncpg.PostgresError) as e:
            await asyncpg.connect(p.dsn(database), server_settings=settings)
        assert (e.value.sqlstate, database, options) == (sqlstate, database, options)
        assert needle in str(e.value)
        if "bogus" in needle:
            assert "taidon.instance" in (e.value.hint or "")
    # Nothing was built or started for a refused route, and the proxy still serves.
    assert p.proxy.builder is not None and not p.proxy.builder.jobs
    assert p.proxy.instances is not None and not p.proxy.instances.instances
    conn = await asyncpg.connect(p.dsn("tiny"))
    await conn.close()
