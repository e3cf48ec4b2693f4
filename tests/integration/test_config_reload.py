"""Reloading the config of a running proxy: the admin endpoint and SIGHUP, with real clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from tests.conftest import ProxyFactory, demo_recipe, free_port
from tests.integration.test_admin_api import ADMIN, Api

pytestmark = pytest.mark.integration


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


def small_recipe(sql: Path) -> dict[str, Any]:
    return {"prepare": {"kind": "psql", "files": [str(sql)]}}


def rewrite(path: Path, change: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


async def test_reload_through_the_admin_endpoint(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession, pg_dir: Path
) -> None:
    one = pg_dir / "one.sql"
    one.write_text("create table one (x int); insert into one values (1);\n")
    p = await make_proxy({"demo": small_recipe(one)}, admin=ADMIN)
    api = Api(p, http)
    held = await asyncpg.connect(p.dsn("demo"), timeout=120)
    try:
        await held.execute("create table mine (x int); insert into mine values (7)")
        with pytest.raises(asyncpg.InvalidCatalogNameError) as e:
            await asyncpg.connect(p.dsn("x"), timeout=60)
        assert "sqlrs ls aliases" in (e.value.hint or ""), e.value.hint
        assert "sqlrs admin reload" in (e.value.hint or "")
        status, body = await api.call("POST", "/v1/aliases/x/prepare")
        assert status == 404 and body["error"]["known"] == ["demo"], body
        assert "sqlrs admin reload" in body["error"]["hint"]

        two = pg_dir / "two.sql"
        two.write_text("create table two (y text); insert into two values ('new');\n")

        def add_x(cfg: dict[str, Any]) -> None:
            cfg["databases"]["x"] = small_recipe(two)
            cfg["databases"]["demo"]["idle_ttl"] = "5m"
            cfg["instances"] = {"max": 20}
            cfg["listen"] = f"127.0.0.1:{free_port()}"
            cfg["snapshot"] = {"backend": "overlayfs"}

        rewrite(p.config_path, add_x)
        status, body = await api.call("POST", "/v1/reload")
        assert status == 200, body
        assert body["aliases"] == {"added": ["x"], "removed": [], "changed": ["demo"]}
        assert body["applied"] == ["instances.max"]
        restart = {r["key"]: r for r in body["needs_restart"]}
        assert set(restart) == {"listen", "snapshot.backend"}
        assert restart["listen"]["running"] == "127.0.0.1:0"
        assert restart["snapshot.backend"] == {
            "key": "snapshot.backend",
            "running": "copy",
            "configured": "overlayfs",
        }
        # What needs a restart keeps running as it was; the rest is in force.
        assert p.proxy.config.listen == "127.0.0.1:0" and p.proxy.config.snapshot.backend == "copy"
        assert p.proxy.config.instances.max == 20
        assert p.proxy.config.databases["demo"].idle_ttl == 300.0
        # Every service that routes by alias sees the new recipes.
        assert p.proxy.builder is not None and p.proxy.builder.config is p.proxy.config
        assert p.proxy.instances is not None and p.proxy.instances.config is p.proxy.config
        assert p.proxy.virtual is not None and p.proxy.virtual.config is p.proxy.config

        conn = await asyncpg.connect(p.dsn("x"), timeout=120)
        try:
            assert await conn.fetchval("select y from two") == "new"
        finally:
            await conn.close()
        assert await held.fetchval("select x from mine") == 7  # the session went on

        # A bad file: refused with each problem's file and line, nothing changes.
        def break_it(cfg: dict[str, Any]) -> None:
            cfg["databases"]["x"]["prepare"]["files"] = [str(pg_dir / "gone.sql")]
            cfg["instances"] = {"max": 3}

        rewrite(p.config_path, break_it)
        text = p.config_path.read_text().splitlines()
        line = next(i for i, t in enumerate(text, 1) if "gone.sql" in t)
        status, body = await api.call("POST", "/v1/reload")
        assert status == 422, body
        err = body["error"]
        assert err["code"] == "invalid_config"
        assert err["message"].startswith(
            f"{p.config_path}:{line}: databases.x.prepare.files.0: {pg_dir}/gone.sql: no such file"
        ), err
        assert err["problems"][0]["line"] == line
        assert "unchanged" in err["hint"]
        assert p.proxy.config.instances.max == 20
        conn = await asyncpg.connect(p.dsn("x"), timeout=120)
        await conn.close()

        # Removing an alias: new connections are refused, open ones keep going.
        def drop_demo(cfg: dict[str, Any]) -> None:
            cfg["databases"] = {"x": small_recipe(two)}
            cfg["instances"] = {"max": 20}

        rewrite(p.config_path, drop_demo)
        status, body = await api.call("POST", "/v1/reload")
        assert status == 200 and body["aliases"]["removed"] == ["demo"], body
        with pytest.raises(asyncpg.InvalidCatalogNameError, match='database "demo" does not'):
            await asyncpg.connect(p.dsn("demo"), timeout=60)
        assert await held.fetchval("select count(*) from mine") == 1
        status, doc = await api.call("GET", "/v1/openapi.json", auth=False)
        assert (
            "post" in doc["paths"]["/v1/reload"]
            and "422" in (doc["paths"]["/v1/reload"]["post"]["responses"])
        )
    finally:
        await held.close()


async def test_reload_with_nothing_changed(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    status, body = await Api(p, http).call("POST", "/v1/reload")
    assert status == 200, body
    assert body["aliases"] == {"added": [], "removed": [], "changed": []}
    assert body["applied"] == [] and body["needs_restart"] == []


# --- SIGHUP to `sqlrs serve` ------------------------------------------------------------------


def psql(port: int, database: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510 - tests read returncode
        ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-d", database, "-c", sql],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def wait_for_log(log: Path, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log:\n{content}")


async def test_sighup_reloads_sqlrs_serve(pg_dir: Path) -> None:
    one = pg_dir / "one.sql"
    one.write_text("create table one (x int); insert into one values (1);\n")
    port, admin_port = free_port(), free_port()
    path = pg_dir / "taidon.yaml"
    path.write_text(
        "# the team's proxy\n"
        + yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin": {"listen": f"127.0.0.1:{admin_port}"},
                "store": str(pg_dir / "store"),
                "snapshot": {"backend": "copy"},
                "runtime": {"kind": "process", "run_dir": str(pg_dir / "run")},
                "databases": {"demo": small_recipe(one)},
            },
            sort_keys=False,
        )
    )
    log = pg_dir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taidon_proxy.cli", "serve", "--config", str(path)],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    held: asyncpg.Connection | None = None
    try:
        wait_for_log(log, "proxy.ready")
        dsn = f"postgresql://postgres@127.0.0.1:{port}/demo"
        held = await asyncpg.connect(dsn, timeout=120)
        r = psql(port, "x", "select 1")
        assert r.returncode != 0 and 'database "x" does not exist' in r.stderr, r.stderr
        assert "HINT:" in r.stderr and "sqlrs ls aliases" in r.stderr

        two = pg_dir / "two.sql"
        two.write_text("create table two (y text); insert into two values ('via hup');\n")
        with path.open("a") as f:
            f.write(f"  x:\n    prepare: {{kind: psql, files: ['{two}']}}\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for_log(log, "config.reloaded")
        r = psql(port, "x", "select y from two")
        assert r.returncode == 0 and r.stdout.strip() == "via hup", r.stderr
        assert await held.fetchval("select x from one") == 1  # open across the reload

        # A broken file: logged with file:line, the running config stays.
        with path.open("a") as f:
            f.write("  y:\n    prepare: {kind: psql, files: [nope.sql]}\n")
        line = len(path.read_text().splitlines())
        os.kill(proc.pid, signal.SIGHUP)
        content = wait_for_log(log, "config.reload_refused")
        assert f"{path}:{line}: databases.y.prepare.files.0:" in content, content
        r = psql(port, "x", "select count(*) from two")
        assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
        assert await held.fetchval("select 1") == 1
        assert proc.poll() is None
    except BaseException:
        print(f"--- sqlrs serve log ---\n{log.read_text(errors='replace')}")
        raise
    finally:
        if held is not None:
            await held.close()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
