"""Bad Liquibase input reaches the client as an ErrorResponse; earlier states stay, none partial."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.errors import ConfigError
from tests.conftest import ProxyFactory
from tests.integration.test_liquibase_build import (
    EVERY_CHANGESET,
    events,
    jobs_of,
    needs_liquibase,
)

pytestmark = [pytest.mark.integration, pytest.mark.liquibase]

HEAD = """<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.liquibase.org/xml/ns/dbchangelog
  http://www.liquibase.org/xml/ns/dbchangelog/dbchangelog-4.20.xsd">
"""
OK_CHANGESET = """<changeSet id="1" author="ann"><sql>create table t (id int)</sql></changeSet>
<changeSet id="2" author="ann"><sql>insert into t values (1)</sql></changeSet>
"""


def write_changelog(root: Path, body: str, name: str = "master.xml") -> Path:
    (root / "db").mkdir(parents=True, exist_ok=True)
    path = root / "db" / name
    path.write_text(HEAD + body + "</databaseChangeLog>\n")
    return path


def recipe(root: Path) -> dict[str, Any]:
    return {"prepare": {"kind": "lb", "search_path": str(root), "changelog": "db/master.xml"}}


async def connect_error(dsn: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await asyncpg.connect(dsn, timeout=180)
        await conn.close()
    return info.value


def full_text(e: asyncpg.PostgresError) -> str:
    return f"{e} {getattr(e, 'detail', '') or ''} {getattr(e, 'hint', '') or ''}"


async def test_liquibase_not_installed(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    root = pg_dir / "p"
    write_changelog(root, OK_CHANGESET)
    p = await make_proxy({"shop": recipe(root)}, liquibase={"exec": str(pg_dir / "no-such-lb")})
    e = await connect_error(p.dsn("shop"))
    assert e.sqlstate == "58000"
    assert "Liquibase not found" in str(e)
    assert "scripts/setup --full" in full_text(e)


async def test_connection_parameters_are_refused(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    root = pg_dir / "p"
    write_changelog(root, OK_CHANGESET)
    bad = recipe(root)
    bad["prepare"]["parameters"] = {"liquibase.command.url": "jdbc:postgresql://elsewhere/db"}
    with pytest.raises(ConfigError, match="connection setting"):
        await make_proxy({"shop": bad})


async def test_missing_changelog_file(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    root = pg_dir / "p"
    root.mkdir()
    with pytest.raises(ConfigError, match=r"db/master\.xml is not in the search path"):
        await make_proxy({"shop": recipe(root)})  # found at load
    # Gone after the config was loaded: found at the build, still without host paths.
    path = write_changelog(root, OK_CHANGESET)
    p = await make_proxy({"shop": recipe(root)}, liquibase=EVERY_CHANGESET)
    path.unlink()
    e = await connect_error(p.dsn("shop"))
    assert "changelog db/master.xml not found" in str(e)
    assert str(pg_dir) not in full_text(e)  # no host paths to clients


@needs_liquibase
async def test_unreadable_changelogs_quote_liquibase(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    inc, xml, pre = pg_dir / "inc", pg_dir / "xml", pg_dir / "pre"
    for root in (inc, xml):  # a broken changelog is refused at load: break them afterwards
        write_changelog(root, OK_CHANGESET)
    write_changelog(
        pre,
        OK_CHANGESET + '<changeSet id="3" author="ann"><preConditions onFail="HALT">'
        '<tableExists tableName="no_such_table"/></preConditions><sql>select 1</sql></changeSet>\n',
    )
    p = await make_proxy(
        {"inc": recipe(inc), "xml": recipe(xml), "pre": recipe(pre)}, liquibase=EVERY_CHANGESET
    )
    write_changelog(inc, OK_CHANGESET + '<include file="db/missing.xml"/>\n')
    write_changelog(xml, OK_CHANGESET + '<changeSet id="3" author="ann"><sql>select 1</sql>\n')
    e_inc, e_xml, e_pre = await asyncio.gather(
        connect_error(p.dsn("inc")), connect_error(p.dsn("xml")), connect_error(p.dsn("pre"))
    )
    assert "db/missing.xml" in str(e_inc), full_text(e_inc)
    assert "db/master.xml" in str(e_xml) and "changeSet" in str(e_xml), full_text(e_xml)
    assert "no_such_table" in str(e_pre) and "db/master.xml::3::ann" in str(e_pre), full_text(e_pre)
    for e in (e_inc, e_xml, e_pre):
        assert str(pg_dir) not in full_text(e)
    # The precondition failed after two changesets: their states stay, nothing for the third.
    assert p.proxy.builder is not None
    (job,) = jobs_of(p, "pre")
    changesets = [m.split(" -> ")[0] for m in events(job, "snapshot") if "::" in m]
    assert changesets[-2:] == ["1::ann", "2::ann"]


@needs_liquibase
async def test_failing_changeset_keeps_prefix_remembers_then_rebuilds(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    root = pg_dir / "p"
    bad = '<changeSet id="3" author="bob"><sql>insert into nope values (1)</sql></changeSet>\n'
    path = write_changelog(root, OK_CHANGESET + bad)
    p = await make_proxy(
        {"shop": recipe(root)}, cache={"failure_ttl": "60s"}, liquibase=EVERY_CHANGESET
    )
    builder = p.proxy.builder
    assert builder is not None
    e = await connect_error(p.dsn("shop"))
    assert e.sqlstate == "58000"
    text = str(e)
    assert "db/master.xml::3::bob" in text and 'relation "nope" does not exist' in text, text
    assert "2/3 changesets applied" in text

    # A client that retries at once gets the remembered error, without a second build.
    n_jobs = len(builder.jobs)
    t = time.monotonic()
    again = await connect_error(p.dsn("shop"))
    assert str(again) == text
    assert time.monotonic() - t < 1.0
    assert len(builder.jobs) == n_jobs

    planned = await builder.plan("shop")
    assert [s.cached for s in planned] == [True, True, False]

    # Fixing the changelog ends the memory; the build goes on from state 2.
    path.write_text(path.read_text().replace("insert into nope", "insert into t"))
    conn = await asyncpg.connect(p.dsn("shop"), timeout=180)
    try:
        assert await conn.fetchval("select count(*) from t") == 2
    finally:
        await conn.close()
    assert events(list(builder.jobs.values())[-1], "step.start") == ["changeset 3/3 3::bob"]


@needs_liquibase
async def test_partial_work_outside_a_transaction_is_not_stored(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    root = pg_dir / "p"
    partial = (
        '<changeSet id="3" author="bob" runInTransaction="false">'
        "<sql>create table partial_a (id int)</sql><sql>insert into nope values (1)</sql>"
        "</changeSet>\n"
    )
    write_changelog(root, OK_CHANGESET + partial)
    p = await make_proxy({"shop": recipe(root)}, liquibase=EVERY_CHANGESET)
    e = await connect_error(p.dsn("shop"))
    assert 'relation "nope" does not exist' in str(e)
    assert p.proxy.builder is not None
    planned = await p.proxy.builder.plan("shop")
    assert [s.cached for s in planned] == [True, True, False]
    conn = await asyncpg.connect(p.dsn(f"state:{planned[1].state_id}"), timeout=60)
    try:
        assert await conn.fetchval("select to_regclass('partial_a')") is None
        assert await conn.fetchval("select count(*) from t") == 1
    finally:
        await conn.close()


def _liquibase_jvms() -> list[int]:
    """Java processes of a build's Liquibase run (their working dir is the run's scratch dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"liquibase-core.jar" in cmd and b"update\x00" in cmd and "/taidon-lb-" in cwd:
            pids.append(int(entry))
    return pids


@needs_liquibase
async def test_liquibase_crash_mid_run(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    root = pg_dir / "p"
    slow = '<changeSet id="3" author="bob"><sql>select pg_sleep(20)</sql></changeSet>\n'
    write_changelog(root, OK_CHANGESET + slow)
    p = await make_proxy({"shop": recipe(root)}, liquibase=EVERY_CHANGESET)
    waiter = asyncio.create_task(connect_error(p.dsn("shop")))
    deadline = time.monotonic() + 120
    killed = False
    while not killed:
        assert time.monotonic() < deadline, "changeset 3 never started"
        assert not waiter.done()
        jobs = jobs_of(p, "shop")
        if jobs and any("::3::bob" in m for m in events(jobs[0], "log")):
            for pid in _liquibase_jvms():
                os.kill(pid, signal.SIGKILL)
                killed = True
        await asyncio.sleep(0.1)
    e = await asyncio.wait_for(waiter, 60)
    assert "Liquibase crashed (killed by signal 9)" in str(e), str(e)
    assert p.proxy.builder is not None
    planned = await p.proxy.builder.plan("shop")
    assert [s.cached for s in planned] == [True, True, False]
