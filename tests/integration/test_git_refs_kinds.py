"""`alias@ref` for alembic and command recipes (the recipe's directory checked out at that
commit, the tool run there), and refs in a detached or shallow repository: real git, real
Alembic and psql, states shared between refs with the same content."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ProxyFactory, RunningProxy
from tests.git_repo import git, make_repo, recipe, write
from tests.integration.test_alembic_recipes import write_project, write_revision
from tests.recipe_helpers import builder, fetch, jobs, steps_run

pytestmark = pytest.mark.integration
TABLES = (
    "select string_agg(relname, ',' order by relname) from pg_class"
    " where relkind = 'r' and relnamespace = 'public'::regnamespace"
)


async def tables(p: RunningProxy, database: str) -> str:
    return str((await fetch(p, database, TABLES))[0][0])


async def refused(p: RunningProxy, database: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await asyncpg.connect(p.dsn(database))
        await conn.close()
    return info.value


def commit(repo: Path, message: str) -> str:
    # A project ignores what running it leaves (the work tree's own __pycache__ must not come
    # back through a commit: the checkouts' check below is of what the proxy writes).
    ignore = repo / ".gitignore"
    if not ignore.exists():
        ignore.write_text("__pycache__/\n")
    git(repo, "add", "-A", ".")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


GRAPH = {
    "r1": (None, "create table t (x int, tenant text)"),
    "r2": ("r1", "insert into t select g, '{tenant}' from generate_series(1, 2) g"),
}


async def test_alembic_at_refs_runs_the_commits_project(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    r = write_project(pg_dir, GRAPH)
    git(pg_dir, "init", "-q", "-b", "main")
    main = commit(pg_dir, "r1 r2")
    git(pg_dir, "checkout", "-q", "-b", "feature")
    write_revision(pg_dir, "r3", "r2", "create table three as select '{tenant}'::text as tenant")
    # The project's own module at this commit (imported by env.py) is the one that runs.
    write(pg_dir, "tenancy.py", "def normalise(t):\n    return t.lower()\n")
    commit(pg_dir, "r3, lower-case tenants")
    git(pg_dir, "checkout", "-q", "-b", "renamed", "main")
    git(pg_dir, "mv", "migrations/versions/r2.py", "migrations/versions/r2_data.py")
    commit(pg_dir, "rename r2's file")
    git(pg_dir, "checkout", "-q", "main")
    write_revision(pg_dir, "r9", "r2", "create table uncommitted (id int)")  # work tree only

    p = await make_proxy({"a": r}, store=store)
    assert await tables(p, "a@main") == "alembic_version,t"
    assert await fetch(p, "a@main", "select distinct tenant from t") == [("ACME",)]
    assert await tables(p, "a@feature") == "alembic_version,t,three"
    assert await fetch(p, "a@feature", "select tenant from three") == [("acme",)]
    # r1 and r2 are main's states (same files; tenancy.py is not hashed, as without refs).
    assert await fetch(p, "a@feature", "select distinct tenant from t") == [("ACME",)]
    assert steps_run(jobs(p, "a")[-1]) == ["r3"]
    # A renamed file with the same content is the same state: no step runs.
    assert [s.cached for s in await builder(p).plan("a", "renamed")] == [True, True]
    assert await fetch(p, "a@renamed", "select version_num from alembic_version") == [("r2",)]
    assert steps_run(jobs(p, "a")[-1]) == []
    # The work tree's uncommitted revision is seen without a ref only.
    assert "uncommitted" in await tables(p, "a")
    assert await fetch(p, f"a@{main[:12]}:id", "select count(*) from t") == [(2,)]
    # No __pycache__ was written into the shared checkout.
    trees = Path(store) / "trees"
    assert not list(trees.rglob("__pycache__"))
    # A recipe file missing at the ref: its name and the commit.
    git(pg_dir, "checkout", "-q", "-b", "noini", "main")
    git(pg_dir, "rm", "-q", "alembic.ini")
    noini = commit(pg_dir, "no alembic.ini")
    git(pg_dir, "checkout", "-q", "main")
    e = await refused(p, "a@noini")
    assert (e.sqlstate, e.args[0]) == (
        "58P01", f'recipe file alembic.ini does not exist at ref "noini" (commit {noini[:12]})'
    )  # fmt: skip


async def test_a_command_recipe_runs_in_the_commits_files(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    git(pg_dir, "init", "-q", "-b", "main")
    write(pg_dir, "db/schema.sql", "create table one (x int);\n")
    commit(pg_dir, "one")
    git(pg_dir, "checkout", "-q", "-b", "two")
    write(pg_dir, "db/schema.sql", "create table one (x int);\ncreate table two (x int);\n")
    commit(pg_dir, "two")
    git(pg_dir, "checkout", "-q", "-b", "empty", "main")
    git(pg_dir, "rm", "-q", "db/schema.sql")
    write(pg_dir, "README", "nothing here\n")
    empty = commit(pg_dir, "no schema")
    git(pg_dir, "checkout", "-q", "main")
    cmd = {
        "prepare": {
            "kind": "command",
            "run": ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "db/schema.sql"],
            "inputs": ["db/*.sql"],
        }
    }
    p = await make_proxy({"c": cmd}, store=store)
    assert await tables(p, "c@two") == "one,two"
    assert await tables(p, "c@main") == "one"
    assert await tables(p, "c") == "one"
    # The work tree has main's content: main's state, nothing run for it.
    assert [steps_run(j) for j in jobs(p, "c")] == [["psql"], ["psql"], []]
    e = await refused(p, "c@empty")
    assert e.args[0] == (
        f'command recipe: its inputs match no file at ref "empty" (commit {empty[:12]})'
    )


async def test_refs_in_a_detached_head_repository(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    ids = make_repo(pg_dir)
    git(pg_dir, "stash", "-q")
    # Detached HEAD: branches and tags still resolve, and HEAD is the detached commit.
    git(pg_dir, "checkout", "-q", "--detach", ids["feature"])
    p = await make_proxy({"r": recipe(pg_dir)}, store=store)
    assert await tables(p, "r@main") == "a,b"
    assert await tables(p, "r@HEAD") == "a,b,c"
    assert await tables(p, "r@v1:tag") == "a,b"


async def test_refs_in_a_shallow_clone(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, tmp_path: Path
) -> None:
    ids = make_repo(tmp_path)
    git(tmp_path, "stash", "-q")
    # A shallow fetch of one branch: its commit works; history it lacks is named as such.
    git(pg_dir, "init", "-q", "-b", "scratch")
    git(pg_dir, "fetch", "-q", "--depth", "1", f"file://{tmp_path}", "main:main")
    git(pg_dir, "checkout", "-q", "main")
    assert (pg_dir / ".git" / "shallow").is_file()
    p = await make_proxy({"s": recipe(pg_dir)}, store=store)
    assert await tables(p, "s@main") == "a,b"
    assert await tables(p, f"s@{ids['main']}:id") == "a,b"
    e = await refused(p, f"s@{ids['old']}")
    assert (e.sqlstate, e.args[0]) == (
        "3D000", f'git ref "{ids["old"]}" does not exist in this shallow clone'
    )  # fmt: skip
    assert "git fetch --unshallow" in (e.hint or "")
    e = await refused(p, "s@feature")
    assert e.args[0] == 'git ref "feature" does not exist in this shallow clone'


async def test_django_at_refs_plans_the_commits_migrations(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    from tests.integration.test_django_recipes import PLAN, migration, write_migration
    from tests.integration.test_django_recipes import write_project as write_django

    r = write_django(pg_dir)
    git(pg_dir, "init", "-q", "-b", "main")
    commit(pg_dir, "five migrations")
    git(pg_dir, "checkout", "-q", "-b", "short")
    git(pg_dir, "rm", "-q", "orders/migrations/0002_order_note.py")
    commit(pg_dir, "without the note")
    git(pg_dir, "checkout", "-q", "main")
    extra = '        migrations.AddField("order", "extra", models.TextField(default="")),'
    write_migration(
        pg_dir, "orders", "0003_extra", migration(extra, [("orders", "0002_order_note")])
    )
    applied = "select app || '.' || name from django_migrations order by id"

    p = await make_proxy({"shop": r}, store=store)
    assert await fetch(p, "shop@short", applied) == [(m,) for m in PLAN[:4]]
    assert await fetch(p, "shop@main", applied) == [(m,) for m in PLAN]
    assert steps_run(jobs(p, "shop")[-1]) == ["orders.0002_order_note"]  # the rest shared
    assert await fetch(p, "shop", applied) == [(m,) for m in [*PLAN, "orders.0003_extra"]]
    assert not list((Path(store) / "trees").rglob("__pycache__"))
