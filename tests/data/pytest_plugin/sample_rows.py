"""A sample project's tests: each writes rows and sees only its own and the recipe's."""

import json
import os
from pathlib import Path

import psycopg

RESULTS = Path(os.environ["TAIDON_SAMPLE_RESULTS"])


def record(name, conn, dsn):
    """Which database this test had: its label, its worker, its server's data directory."""
    row = conn.execute("select current_setting('data_directory'), current_database()").fetchone()
    data = {
        "test": name,
        "dsn": dsn,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "data_directory": row[0],
        "database": row[1],
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(data))


def names(conn):
    return sorted(r[0] for r in conn.execute("select name from item"))


def writes_and_sees_only_its_own(name, conn, dsn):
    assert names(conn) == ["seed"]
    conn.execute("insert into item (name) values (%s)", (name,))
    conn.commit()
    # A second connection to the same DSN is the same database: the app and the test agree.
    with psycopg.connect(dsn) as other:
        assert names(other) == sorted(["seed", name])
    record(name, conn, dsn)


def test_one(taidon_psycopg, taidon_dsn):
    writes_and_sees_only_its_own("one", taidon_psycopg, taidon_dsn)


def test_two(taidon_psycopg, taidon_dsn):
    writes_and_sees_only_its_own("two", taidon_psycopg, taidon_dsn)


def test_three(taidon_psycopg, taidon_dsn):
    writes_and_sees_only_its_own("three", taidon_psycopg, taidon_dsn)


def test_four(taidon_psycopg, taidon_dsn):
    writes_and_sees_only_its_own("four", taidon_psycopg, taidon_dsn)


async def test_asyncpg(taidon_asyncpg, taidon_dsn):
    rows = await taidon_asyncpg.fetch("select name from item")
    assert [r["name"] for r in rows] == ["seed"]
    await taidon_asyncpg.execute("insert into item (name) values ('asyncpg')")
    with psycopg.connect(taidon_dsn) as conn:
        assert names(conn) == ["asyncpg", "seed"]
        record("asyncpg", conn, taidon_dsn)


def test_embedded_proxy_config(request):
    """The embedded proxy's config (a hidden file beside taidon.yaml while the run lasts)."""
    found = sorted(Path(request.config.rootpath).glob(".taidon-pytest-*.yaml"))
    warm = None
    if found:
        import yaml

        warm = yaml.safe_load(found[0].read_text())["instances"]["warm_labels"]
    (RESULTS / "proxy.config").write_text(json.dumps({"files": len(found), "warm_labels": warm}))
