"""A database per git ref: `alias@ref` reads the recipe's files from the repository at that
commit (real git repositories made here: branches, a tag, a commit id), shares the states two
refs have in common, and refuses unknown refs and missing files with a precise ErrorResponse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ProxyFactory, RunningProxy
from tests.git_repo import commit_all, git, make_repo, recipe, write
from tests.integration.test_liquibase_build import needs_liquibase
from tests.recipe_helpers import builder, fetch, jobs

pytestmark = pytest.mark.integration

TABLES = (
    "select string_agg(relname, ',' order by relname) from pg_class"
    " where relkind = 'r' and relnamespace = 'public'::regnamespace"
)


def steps(p: RunningProxy, alias: str) -> list[list[str]]:
    return [
        [e.message for e in j.events if e.kind == "step.start"] for j in jobs(p, alias) if j.done
    ]


async def tables(p: RunningProxy, database: str, **params: str) -> str:
    conn = await asyncpg.connect(p.dsn(database, **params))
    try:
        return str(await conn.fetchval(TABLES))
    finally:
        await conn.close()


async def refused(p: RunningProxy, database: str, **params: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await asyncpg.connect(p.dsn(database, **params))
        await conn.close()
    return info.value


async def test_each_ref_gets_its_commits_files_and_shares_common_states(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    ids = make_repo(pg_dir)
    p = await make_proxy({"r": recipe(pg_dir)}, store=store)
    assert await tables(p, "r@feature") == "a,b,c"
    assert steps(p, "r") == [
        ["applying sql/01_schema.sql (1/2)", "applying sql/02_tables.sql (2/2)"]
    ]
    # main shares feature's first state: only its own second file is applied.
    assert await tables(p, "r@main") == "a,b"
    assert steps(p, "r")[1] == ["applying sql/02_tables.sql (2/2)"]
    states_before = len(await p.proxy.meta.states())
    # A tag and a commit id of the same commit land in the same state: nothing is built.
    assert await tables(p, "r@v1:tagged") == "a,b"
    assert await tables(p, f"r@{ids['main'][:7]}:byid") == "a,b"
    assert await tables(p, "r", options="-c taidon.ref=feature") == "a,b,c"
    assert await tables(p, "r@feature:ci") == "a,b,c"
    assert len(steps(p, "r")) == 2
    assert len(await p.proxy.meta.states()) == states_before
    # The work tree's uncommitted change is seen without a ref, and never with one.
    assert await tables(p, "r") == "a,b,d"
    assert await tables(p, "r@main:other") == "a,b"
    # Each ref has its own shared instance: a write through one is not seen through another.
    conn = await asyncpg.connect(p.dsn("r@feature"))
    try:
        await conn.execute("insert into c values (7)")
    finally:
        await conn.close()
    assert await fetch(p, "r@feature", "select y from c") == [(7,)]
    assert await fetch(p, "r@feature:ci", "select y from c") == []
    assert "r@feature:default" in {str(i.key) for i in p.proxy.instances.instances.values()}  # type: ignore[union-attr]
    # A branch that moves is followed: a new commit on feature is a new state for a new label.
    git(pg_dir, "stash", "-q")
    git(pg_dir, "checkout", "-q", "feature")
    write(pg_dir, "sql/02_tables.sql", "create table b (x int);\ncreate table e (y int);\n")
    commit_all(pg_dir, "table e instead of c")
    assert await tables(p, "r@feature:moved") == "a,b,e"
    # HEAD follows the checked-out branch, also when only that branch's ref file changes.
    assert await tables(p, "r@HEAD:h1") == "a,b,e"
    write(pg_dir, "sql/02_tables.sql", "create table b (x int);\ncreate table f (y int);\n")
    commit_all(pg_dir, "table f")
    assert await tables(p, "r@HEAD:h2") == "a,b,f"
    plan = await builder(p).plan("r", "feature")
    assert [s.cached for s in plan] == [True, True]
    assert (await builder(p).plan("r", "main"))[1].state_id != plan[1].state_id


async def test_refs_refused_with_the_ref_and_file_named(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    make_repo(pg_dir)
    p = await make_proxy({"r": recipe(pg_dir)}, store=store)
    e = await refused(p, "r@nope")
    assert (e.sqlstate, e.args[0]) == ("3D000", 'git ref "nope" does not exist')
    e = await refused(p, "r", options="-c taidon.ref=nope2")
    assert (e.sqlstate, e.args[0]) == ("3D000", 'git ref "nope2" does not exist')
    e = await refused(p, "r@old")
    assert e.sqlstate == "58P01"
    assert 'recipe file sql/02_tables.sql does not exist at ref "old"' in e.args[0]
    e = await refused(p, "r@noinc")
    assert e.sqlstate == "58000"
    assert e.args[0].startswith(
        '01_schema.sql includes inc/types.sql, which does not exist at ref "noinc" (commit '
    )
    # An include that leaves the files read from git (into the store, the host) is refused.
    git(pg_dir, "checkout", "-q", "-b", "escape", "main")
    write(pg_dir, "sql/01_schema.sql", "\\ir ../../../../../../etc/hostname\n")
    commit_all(pg_dir, "escape")
    git(pg_dir, "checkout", "-q", "main")
    e = await refused(p, "r@escape")
    assert e.sqlstate == "58000"
    assert e.args[0].startswith(
        "01_schema.sql includes ../../../../../../etc/hostname, which is outside the files"
        ' read from git at ref "escape"'
    )
    e = await refused(p, "r@a..b")
    assert (e.sqlstate, e.args[0]) == ("42602", 'invalid git ref "a..b"')
    e = await refused(p, "r@-c")
    assert e.sqlstate == "42602"
    # The same through psql (which shows no SQLSTATE for a refused connection).
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-h", p.host, "-p", str(p.port), "-U", "postgres", "-d", "r@nope",
        "-c", "select 1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert 'FATAL:  git ref "nope" does not exist' in err.decode()
    # Nothing was stored for the refused refs: only states of refs that built.
    assert len(jobs(p, "r")) == 2  # the failed builds of noinc and escape; no other started


async def test_a_config_outside_git_refuses_refs(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    write(pg_dir, "sql/01_schema.sql", "create table a (x int);\n")
    write(pg_dir, "sql/02_tables.sql", "create table b (x int);\n")
    p = await make_proxy({"r": recipe(pg_dir)}, store=store)
    e = await refused(p, "r@main")
    assert e.sqlstate == "55000"
    assert "not in a git repository" in e.args[0]
    assert await tables(p, "r") == "a,b"


MASTER = """<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.liquibase.org/xml/ns/dbchangelog
  http://www.liquibase.org/xml/ns/dbchangelog/dbchangelog-4.20.xsd">
{includes}
</databaseChangeLog>
"""
INCLUDE = '  <include file="changes/{name}.sql" relativeToChangelogFile="true"/>'


def lb_changes(repo: Path, names: list[str]) -> None:
    includes = "\n".join(INCLUDE.format(name=n) for n in names)
    write(repo, "db/master.xml", MASTER.format(includes=includes))
    for n in names:
        write(repo, f"db/changes/{n}.sql", f"--liquibase formatted sql\n--changeset ann:{n}\n"
              f"create table t{n} (x int);\n")  # fmt: skip


@pytest.mark.liquibase
@needs_liquibase
async def test_liquibase_changelog_and_its_includes_at_a_ref(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    """main includes changes 1 and 2; feature adds change 3, other change 5: each of their
    builds applies only its third changeset, on main's states. The work tree's include that
    was never committed is not seen at a ref; a ref whose master includes a missing file
    names it."""
    git(pg_dir, "init", "-q", "-b", "main")
    lb_changes(pg_dir, ["1", "2"])
    commit_all(pg_dir, "two changesets", "db")
    git(pg_dir, "checkout", "-q", "-b", "feature")
    lb_changes(pg_dir, ["1", "2", "3"])
    commit_all(pg_dir, "a third", "db")
    git(pg_dir, "checkout", "-q", "-b", "other", "main")
    lb_changes(pg_dir, ["1", "2", "5"])
    commit_all(pg_dir, "a fifth instead", "db")
    git(pg_dir, "checkout", "-q", "-b", "broken", "main")
    lb_changes(pg_dir, ["1", "2", "9"])
    git(pg_dir, "commit", "-q", "-m", "includes a file never committed", "db/master.xml")
    (pg_dir / "db/changes/9.sql").unlink()
    git(pg_dir, "checkout", "-q", "main")
    lb_changes(pg_dir, ["1", "2", "4"])  # uncommitted in the work tree
    lb = {"prepare": {"kind": "lb", "search_path": str(pg_dir / "db"), "changelog": "master.xml"}}
    p = await make_proxy({"l": lb}, store=store)
    assert await tables(p, "l@main") == "databasechangelog,databasechangeloglock,t1,t2"
    assert steps(p, "l") == [["changeset 1/2 1::ann", "changeset 2/2 2::ann"]]
    assert await tables(p, "l@feature") == "databasechangelog,databasechangeloglock,t1,t2,t3"
    assert steps(p, "l")[1] == ["changeset 3/3 3::ann"]
    # other diverges from feature after change 2: the build set off from feature's last state
    # finds it off the plan's chain and applies only change 5, on main's second state.
    assert await tables(p, "l@other") == "databasechangelog,databasechangeloglock,t1,t2,t5"
    assert steps(p, "l")[2] == ["changeset 3/3 5::ann"]
    e = await refused(p, "l@broken")
    assert e.sqlstate == "58000"
    assert "changes/9.sql" in e.args[0] and 'at ref "broken"' in e.args[0]
    assert await tables(p, "l") == "databasechangelog,databasechangeloglock,t1,t2,t4"
