"""`sqlrs explain ALIAS@REF`, `sqlrs provenance STATE` and `${file:…}` config values against a
real `sqlrs serve`, on a git repository made here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.conftest import write_config
from tests.git_repo import git, make_repo, recipe

pytestmark = pytest.mark.e2e
SECRET = "tok-3f9a-secret"
KEY = re.compile(r"^[0-9a-f]{64}$")


def test_explain_at_a_ref_and_the_provenance_of_its_state(pg_dir: Path) -> None:
    ids = make_repo(pg_dir)
    (pg_dir / "token").write_text(SECRET + "\n")
    r = recipe(pg_dir)
    r["prepare"]["variables"] = {"token": "${file:token}"}
    cli = write_config(pg_dir, {"r": r})
    try:
        cli.start()
        key = cli.run("explain", "--key", "r@feature")
        assert key.returncode == 0 and KEY.match(key.stdout.strip()), key.stderr
        same = cli.run("explain", "--key", "--ref", "feature", "r")
        assert same.stdout == key.stdout
        work = cli.run("explain", "--key", "r")  # the work tree's uncommitted change differs
        assert KEY.match(work.stdout.strip()) and work.stdout != key.stdout
        out = cli.run("explain", "r@feature")
        assert out.stdout.startswith(f"r@feature: key {key.stdout.strip()}\n"), out.stdout
        assert "not built here yet" in out.stdout

        assert cli.run("prepare", "r", "--ref", "feature").returncode == 0
        out = cli.run("explain", "r@feature")
        assert "in this store" in out.stdout and "first miss" not in out.stdout, out.stdout
        # main differs from feature in its second file: the first miss says so.
        out = cli.run("explain", "r@main")
        assert "first miss at step 2: sql/02_tables.sql changed since state" in out.stdout

        tree = cli.run("provenance", key.stdout.strip()[:12])
        assert tree.returncode == 0, tree.stderr
        text = tree.stdout
        assert text.startswith(f"state {key.stdout.strip()}  (r)\n"), text
        assert "  engine: Postgres 15." in text and "initdb: encoding=UTF8" in text
        blob = git(pg_dir, "rev-parse", "feature:sql/inc/types.sql")
        assert f"file sql/inc/types.sql  blob {blob[:12]}" in text
        assert f"@ {ids['feature'][:12]}" in text and "ref feature" in text
        assert "variable token = sha256:" in text and SECRET not in text
        assert text.rstrip().splitlines()[-1].lstrip("│ ").startswith("variable token")

        data = cli.json("provenance", key.stdout.strip())
        assert [s["kind"] for s in data["steps"]] == ["initdb", "root", "psql", "psql"]
        assert data["steps"][-1]["record"]["commit"] == ids["feature"]

        shown = cli.run("config", "get", "databases.r.prepare.variables")
        assert "token: (secret)" in shown.stdout and SECRET not in shown.stdout

        bad = cli.run("provenance", "ffffffffffff")
        assert bad.returncode != 0 and "ffffffffffff" in bad.stderr
        bad = cli.run("explain", "r@")
        assert bad.returncode == 2 and '"r@" is not ALIAS or ALIAS@REF' in bad.stderr
        bad = cli.run("explain", "r@main", "--ref", "feature")
        assert bad.returncode == 2 and "give one" in bad.stderr
        bad = cli.run("explain", "r@nope")
        assert bad.returncode != 0 and 'git ref "nope" does not exist' in bad.stderr
    finally:
        cli.stop()
    assert SECRET not in cli.log_text()
