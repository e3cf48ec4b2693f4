"""A real Django project's `manage.py test`, unchanged, with DATABASE_URL at a proxy alias.

Django connects to the `postgres` maintenance database, creates `test_<name>` (drops and
recreates a leftover one with --noinput, keeps it with --keepdb), clones it for --parallel
and drops it at the end. Every run must see the recipe's state: the project's tests fail
if the recipe's row is missing or a row an earlier run committed is present.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import asyncpg
import pytest

from tests.conftest import REPO, ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

PROJECT = REPO / "tests" / "data" / "django"
RUN_TIMEOUT = 180


def recipe() -> dict[str, Any]:
    return {"prepare": {"kind": "psql", "files": [str(PROJECT / "recipe.sql")]}, "roles": ["app"]}


async def manage_test(p: RunningProxy, *args: str) -> str:
    """`python manage.py test ARGS` with DATABASE_URL at the proxy; its output (must pass)."""
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://app@{p.host}:{p.port}/shop",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", "test", "-v", "2", *args,
        cwd=PROJECT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Ran 2 tests" in text and "\nOK" in text, text
    return text


def virtual_names(p: RunningProxy) -> list[str]:
    assert p.proxy.virtual is not None
    return sorted(d.name for d in p.proxy.virtual.databases())


async def test_manage_py_test_plain_rerun_keepdb_parallel(
    make_proxy: ProxyFactory, store: str
) -> None:
    p = await make_proxy({"shop": recipe()}, store=store)
    # Plain run, then a rerun: created, used, dropped each time.
    out = await manage_test(p, "--noinput")
    assert "database used: test_shop" in out
    assert virtual_names(p) == []
    await manage_test(p, "--noinput")
    # A run that died left its database behind, with a committed row: --noinput drops it
    # (Django: "database already exists" → DROP → CREATE) and the run starts fresh.
    conn = await asyncpg.connect(p.dsn("postgres", user="app"))
    try:
        await conn.execute('CREATE DATABASE "test_shop"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(p.dsn("test_shop", user="app"))
    try:
        await conn.execute("insert into shopapp_item (name) values ('committed by a run')")
    finally:
        await conn.close()
    out = await manage_test(p, "--noinput")
    assert "Destroying old test database" in out
    # --keepdb twice: the kept database is still there, yet the second run starts from the
    # recipe (its test fails on the first run's committed row otherwise).
    await manage_test(p, "--keepdb")
    assert virtual_names(p) == ["test_shop"]
    out = await manage_test(p, "--keepdb")
    assert "Using existing test database" in out
    # --parallel 2: clones test_shop_1 and test_shop_2 WITH TEMPLATE test_shop.
    out = await manage_test(p, "--noinput", "--parallel", "2")
    assert "Cloning test database" in out
    assert virtual_names(p) == []  # the clones and the kept test_shop: dropped
    await manage_test(p, "--keepdb", "--parallel", "2")
    out = await manage_test(p, "--keepdb", "--parallel", "2")
    assert virtual_names(p) == ["test_shop", "test_shop_1", "test_shop_2"]
    # Clones from a template snapshot: the states made for them go with the databases.
    assert p.proxy.virtual is not None
    await manage_test(p, "--noinput")
    for name in ("test_shop_1", "test_shop_2"):
        conn = await asyncpg.connect(p.dsn("postgres"))
        try:
            await conn.execute(f'DROP DATABASE "{name}"')
        finally:
            await conn.close()
    assert virtual_names(p) == []
    assert p.proxy.virtual._owned == set()
