"""`sqlrs plan/prepare/run --ref` against a real `sqlrs serve`, on a git repository made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import write_config
from tests.git_repo import make_repo, recipe

pytestmark = pytest.mark.e2e


def test_plan_prepare_and_run_at_a_ref(pg_dir: Path) -> None:
    make_repo(pg_dir)
    cli = write_config(pg_dir, {"r": recipe(pg_dir)})
    try:
        cli.start()
        r = cli.run("plan:psql", "r", "--ref", "feature")
        assert r.returncode == 0, r.stderr
        assert "r@feature (psql): 2 step(s), 0 cached, 2 to run" in r.stdout

        out = cli.json("prepare:psql", "r", "--ref", "feature", "--label", "ci")
        assert out["ref"] == "feature" and out["built"] is True
        assert out["dsn"] == f"postgresql://postgres@127.0.0.1:{cli.port}/r%40feature:ci"

        # main shares feature's first state: one step to run.
        r = cli.run("plan", "r", "--ref", "main")
        assert "r@main (psql): 2 step(s), 1 cached, 1 to run" in r.stdout, r.stdout

        sql = (
            "select string_agg(relname, ',' order by relname) from pg_class"
            " where relkind = 'r' and relnamespace = 'public'::regnamespace"
        )
        r = cli.run("run:psql", "--ref", "v1", "r", "-Atc", sql)
        assert (r.returncode, r.stdout.strip()) == (0, "a,b"), r.stderr
        # A ref's shared instance is reset by its name: the write is gone, the ref's state back.
        r = cli.run(
            "run:psql", "--ref", "feature", "--label", "ci", "r", "-c", "insert into c values (1)"
        )
        assert r.returncode == 0, r.stderr
        r = cli.run("admin", "reset", "r@feature:ci")
        assert (r.returncode, r.stdout.split(" (")[0]) == (0, "reset r@feature:ci"), r.stderr
        count = "select count(*) from c"
        r = cli.run("run:psql", "--ref", "feature", "--label", "ci", "r", "-Atc", count)
        assert r.stdout.strip() == "0", r.stderr
        r = cli.run("run:psql", "r", "-Atc", sql)  # the work tree, uncommitted change included
        assert (r.returncode, r.stdout.strip()) == (0, "a,b,d"), r.stderr

        r = cli.run("prepare", "r", "--ref", "nope")
        assert r.returncode != 0
        assert 'git ref "nope" does not exist' in r.stderr
        r = cli.run("plan", "r", "--ref", "a..b")
        assert r.returncode != 0
        assert 'invalid git ref "a..b"' in r.stderr
    finally:
        cli.stop()
