"""`sqlrs diff` between two recipes' databases and a live instance, through a real proxy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import Cli, write_config

pytestmark = pytest.mark.e2e

BASE = """
create extension if not exists pgcrypto;
create type mood as enum ('ok', 'sad');
create sequence ticket_seq start 100;
create table item (id int primary key, name text not null, price numeric(10,2) default 0);
create table tag (id int primary key, item_id int references item (id), label text);
create index tag_label on tag (label);
create view cheap as select id, name from item where price < 10;
create function total() returns numeric language sql as 'select sum(price) from item';
create role viewer;
grant select on item to viewer;
insert into item values (1, 'a', 1), (2, 'b', 20);
"""
# The same schema with one of each kind of change.
CHANGED = (
    BASE.replace("name text not null", "name varchar(80) not null")
    .replace("on tag (label)", "on tag (label, item_id)")
    .replace("price < 10", "price < 5")
    .replace("('ok', 'sad')", "('ok', 'sad', 'glad')")
    .replace("create table tag", "create table extra (x int);\ncreate table tag")
    .replace("'select sum(price) from item'", "'select coalesce(sum(price), 0) from item'")
    .replace("grant select on item to viewer;", "grant select, update on item to viewer;")
    .replace("(2, 'b', 20)", "(2, 'b', 20), (3, 'c', 3)")
)


@pytest.fixture
def two(pg_dir: Path) -> Iterator[Cli]:
    for name, sql in (("base", BASE), ("changed", CHANGED)):
        (pg_dir / f"{name}.sql").write_text(sql)
    c = write_config(pg_dir, {
        "base": {"prepare": {"kind": "psql", "files": [str(pg_dir / "base.sql")]}},
        "changed": {"prepare": {"kind": "psql", "files": [str(pg_dir / "changed.sql")]}},
    })  # fmt: skip
    c.start()
    yield c
    c.stop()


def test_a_diff_names_each_change_and_equal_schemas_say_so(two: Cli) -> None:
    r = two.run("diff", "base", "base:other")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "base and base:other: same schema"

    r = two.run("diff", "base", "changed", "--rows")
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert out.startswith("--- base\n+++ changed\n")
    assert "  + public.extra" in out  # a new table, once: not its columns again
    assert "public.extra.x" not in out
    assert "  ~ public.item.name: text not null -> character varying(80) not null" in out
    assert "  ~ public.tag_label:" in out and "(label, item_id)" in out
    assert "  ~ public.cheap:" in out
    assert "  ~ public.mood: enum ('ok', 'sad') -> enum ('ok', 'sad', 'glad')" in out
    assert "  ~ public.total():" in out
    assert "  ~ public.item to viewer: SELECT -> SELECT, UPDATE" in out
    assert "  ~ public.item: 2 -> 3" in out  # rows

    data = json.loads(two.run("--json", "diff", "base", "changed").stdout)
    assert data["equal"] is False
    ops = {(c["kind"], c["name"]): c["op"] for c in data["changes"]}
    assert ops[("tables", "public.extra")] == "added"
    assert ops[("columns", "public.item.name")] == "changed"
    assert ("rows", "public.item") not in ops  # only with --rows


def test_a_live_instance_against_its_recipe(two: Cli) -> None:
    with psycopg.connect(
        f"postgresql://postgres@127.0.0.1:{two.port}/base:live", autocommit=True
    ) as conn:
        conn.execute("alter table item add column sku text unique")
        conn.execute("drop view cheap")
        r = two.run("diff", "base", "base:live")
    assert r.returncode == 1, r.stderr
    assert "  + public.item.sku: text" in r.stdout
    assert "  + public.item.item_sku_key: UNIQUE (sku)" in r.stdout
    assert "  - public.cheap" in r.stdout


def test_an_unknown_side_is_named(two: Cli) -> None:
    r = two.run("diff", "base", "nosuch")
    assert r.returncode == 1
    assert "nosuch" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_explain_prints_each_step_and_why_the_first_miss_misses(two: Cli) -> None:
    assert two.run("prepare", "base").returncode == 0
    r = two.run("explain", "base")
    assert r.returncode == 0, r.stderr
    assert "base.sql" in r.stdout and "yes" in r.stdout and "first miss" not in r.stdout
    sql = two.config.parent / "base.sql"
    sql.write_text(sql.read_text() + "create table later (x int);\n")
    r = two.run("explain", "base")
    assert "first miss at step 1:" in r.stdout and "base.sql changed since state" in r.stdout
    data = json.loads(two.run("--json", "explain", "base").stdout)
    assert data["first_miss"]["reason"] == "changed" and data["plan"][0]["cached"] is False
