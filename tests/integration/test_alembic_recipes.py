"""alembic recipes through the proxy: a real Alembic project with a branch, a merge, -x, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from tests.conftest import ProxyFactory
from tests.recipe_helpers import builder, fetch, jobs, steps_run

pytestmark = pytest.mark.integration

INI = """[alembic]
script_location = %(here)s/migrations
prepend_sys_path = .
# Never used: the proxy points every run at its build server.
sqlalchemy.url = postgresql+psycopg://nobody@127.0.0.1:1/nowhere
"""

ENV_PY = """from alembic import context
from sqlalchemy import create_engine

import tenancy  # the project's own module, found through prepend_sys_path

url = context.config.get_main_option("sqlalchemy.url")
tenant = context.get_x_argument(as_dictionary=True).get("tenant", "none")
with create_engine(url).connect() as conn:
    context.configure(connection=conn, target_metadata=None)
    with context.begin_transaction():
        context.get_context().opts["tenant"] = tenancy.normalise(tenant)
        context.run_migrations()
"""

REV = '''"""{doc}"""
from alembic import op, context

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    tenant = context.get_context().opts["tenant"]
    print("upgrading {rev}")
{body}
'''

GRAPH = {  # revision: (down_revision, SQL); r3a and r3b branch off r2, r4 merges them
    "r1": (None, "create table t (x int, tenant text)"),
    "r2": ("r1", "insert into t select g, '{tenant}' from generate_series(1, 3) g"),
    "r3a": ("r2", "create table a (id int)"),
    "r3b": ("r2", "create table b (id int)"),
    "r4": (("r3a", "r3b"), "update t set x = x * 10"),
    "r5": ("r4", "alter table t add column note text default 'five'"),
}


def write_revision(base: Path, rev: str, down: Any, sql: str) -> None:
    body = f'    op.execute(f"{sql}")' if "{tenant}" in sql else f"    op.execute({sql!r})"
    (base / "migrations/versions" / f"{rev}.py").write_text(
        REV.format(doc=rev, rev=rev, down=down, body=body)
    )


def write_project(base: Path, graph: dict[str, tuple[Any, str]] = GRAPH) -> dict[str, Any]:
    (base / "migrations/versions").mkdir(parents=True, exist_ok=True)
    (base / "alembic.ini").write_text(INI)
    (base / "migrations/env.py").write_text(ENV_PY)
    (base / "tenancy.py").write_text("def normalise(t):\n    return t.upper()\n")
    (base / "requirements.lock").write_text("alembic==1.20.1\nSQLAlchemy==2.1.9\n")
    for rev, (down, sql) in graph.items():
        write_revision(base, rev, down, sql)
    return {
        "prepare": {
            "kind": "alembic",
            "config": "alembic.ini",
            "x": ["tenant=acme"],
            "target": "heads",
            "lock": "requirements.lock",
        }
    }


async def test_one_state_per_revision_edit_in_the_middle_and_append(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"a": write_project(pg_dir)}, store=store)
    rows = await fetch(p, "a", "select x, tenant, note from t order by x")
    assert rows == [(10, "ACME", "five"), (20, "ACME", "five"), (30, "ACME", "five")]
    assert await fetch(p, "a", "select version_num from alembic_version") == [("r5",)]
    [job] = jobs(p, "a")
    ran = steps_run(job)
    assert ran[:2] == ["r1", "r2"] and set(ran[2:4]) == {"r3a", "r3b"} and ran[4:] == ["r4", "r5"]
    progress = [e.message for e in job.events if e.kind == "progress"]
    assert "upgrading r2" in progress  # the migration's own output streams as progress
    plan = await builder(p).plan("a")
    assert [s.label.split()[0] for s in plan] == ran and all(s.cached for s in plan)
    before = [s.state_id for s in plan]

    # Editing the merge (5th of 6) rebuilds from the 4th state: r4 and r5 run again.
    write_revision(pg_dir, "r4", ("r3a", "r3b"), "update t set x = x * 100")
    rows = await fetch(p, "a:edited", "select x from t order by x")
    assert rows == [(100,), (200,), (300,)]
    assert steps_run(jobs(p, "a")[-1]) == ["r4", "r5"]
    after = [s.state_id for s in await builder(p).plan("a")]
    assert after[:4] == before[:4] and after[4] != before[4] and after[5] != before[5]

    # Appending a revision runs one step.
    write_revision(pg_dir, "r6", "r5", "create table six (id int)")
    assert await fetch(p, "a:appended", "select count(*) from six") == [(0,)]
    assert steps_run(jobs(p, "a")[-1]) == ["r6"]


async def test_a_failing_revision_is_named_and_earlier_states_are_kept(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    graph = {**GRAPH, "r3a": ("r2", "select * from no_such_table")}
    p = await make_proxy({"a": write_project(pg_dir, graph)}, store=store)
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("a"))
    assert e.value.sqlstate == "58000"
    message = str(e.value)
    assert "revision r3a (migrations/versions/r3a.py) failed" in message, message
    assert 'relation "no_such_table" does not exist' in message
    assert str(pg_dir) not in message + (e.value.detail or "")
    [failed] = jobs(p, "a")
    assert failed.status == "failed"
    plan = await builder(p).plan("a")
    cached = {s.label.split()[0]: s.cached for s in plan}
    assert cached["r1"] and cached["r2"] and not cached["r3a"] and not cached["r5"]


async def test_unmerged_heads_with_target_head_are_refused_by_name(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    graph = {k: v for k, v in GRAPH.items() if k in ("r1", "r2", "r3a", "r3b")}
    recipe = write_project(pg_dir, graph)
    recipe["prepare"]["target"] = "head"
    p = await make_proxy({"a": recipe}, store=store)
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("a"))
    assert e.value.sqlstate == "58000"
    assert "several heads: r3a, r3b" in str(e.value), str(e.value)
    assert jobs(p, "a")[-1].status == "failed"


async def test_no_script_location_is_a_clear_build_error(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    recipe = write_project(pg_dir)
    (pg_dir / "alembic.ini").write_text("[alembic]\nsqlalchemy.url = x\n")
    p = await make_proxy({"a": recipe}, store=store)
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("a"))
    assert "no script_location in [alembic]" in str(e.value), str(e.value)
    assert str(pg_dir) not in str(e.value)


def test_a_missing_alembic_ini_is_refused_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "taidon.yaml"
    cfg.write_text("databases:\n  a:\n    prepare:\n      kind: alembic\n      config: nope.ini\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    missing = tmp_path.resolve() / "nope.ini"
    assert e.value.message == f"{cfg}:5: databases.a.prepare.config: {missing}: no such file"
