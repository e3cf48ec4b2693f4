"""command recipes through the proxy: a shell script using psql, hashing, failures, deadline."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.jobs import Job
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

# The script sees only what the recipe passes: libpq variables for the build server, its env.
SCRIPT = """#!/bin/sh
set -eu
echo "migrating $PGDATABASE as $PGUSER (tag=$TAG)"
for f in migrations/*.sql; do
  echo "applying $f"
  psql -X -q -v ON_ERROR_STOP=1 -f "$f"
done
psql -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "insert into seen values ('url')"
"""


def write_project(base: Path, *, script: str = SCRIPT) -> dict[str, Any]:
    (base / "migrations").mkdir(parents=True, exist_ok=True)
    (base / "migrations/001.sql").write_text(
        "create table t (x int); create table seen (s text);\n"
    )
    (base / "migrations/002.sql").write_text("insert into t values (1), (2);\n")
    run = base / "migrate.sh"
    run.write_text(script)
    run.chmod(0o755)
    return {
        "prepare": {
            "kind": "command",
            "run": ["./migrate.sh"],
            "inputs": ["migrations/**/*.sql", "migrate.sh"],
            "env": {"TAG": "t1"},
            "timeout": "60s",
            "version": ["psql", "--version"],
        }
    }


def builder(p: RunningProxy) -> StateBuilder:
    assert p.proxy.builder is not None
    return p.proxy.builder


def jobs(p: RunningProxy, alias: str) -> list[Job]:
    return [j for j in builder(p).jobs.values() if j.alias == alias]


async def fetchval(p: RunningProxy, database: str, sql: str) -> Any:
    conn = await asyncpg.connect(p.dsn(database))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_command_builds_one_state_and_rebuilds_when_an_input_changes(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"c": write_project(pg_dir)}, store=store)
    assert await fetchval(p, "c", "select sum(x) from t") == 3
    assert await fetchval(p, "c", "select s from seen") == "url"
    [job] = jobs(p, "c")
    progress = [e.message for e in job.events if e.kind == "progress"]
    assert "migrating c as postgres (tag=t1)" in progress
    assert "applying migrations/002.sql" in progress
    logs = [e.message for e in job.events if e.kind == "log"]
    assert any(m.startswith("tool version: psql (PostgreSQL) 15") for m in logs), logs
    [step] = await builder(p).plan("c")
    assert step.cached and "psql (PostgreSQL) 15" in step.label
    assert p.proxy.store is not None
    row = await p.proxy.store.get(step.state_id)
    assert row is not None and row.kind == "command" and row.parent == await builder(p).root_id("c")

    # The progress lines reach a real psql client as NOTICEs while it waits.
    (pg_dir / "migrations/003.sql").write_text("insert into t values (10);\n")
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-U", "postgres", "-d", "c:psql", "-c", "select sum(x) from t",
        env=p.libpq_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == b"13"  # a new file under the glob is a new input: rebuilt
    assert b"NOTICE:  applying migrations/003.sql" in err, err
    assert len(jobs(p, "c")) == 2
    [new] = await builder(p).plan("c")
    assert new.state_id != step.state_id
    assert await p.proxy.store.get(step.state_id) is not None  # the old state is kept


async def test_nonzero_exit_fails_quoting_the_last_lines_and_stores_nothing(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    script = SCRIPT.replace("done\n", 'done\necho "about to fail"\nexit 3\n')
    p = await make_proxy({"c": write_project(pg_dir, script=script)}, store=store)
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("c"))
    assert e.value.sqlstate == "58000"
    assert "exited with status 3: about to fail" in str(e.value)
    assert "applying migrations/002.sql" in (e.value.detail or "")
    [failed] = jobs(p, "c")
    assert failed.status == "failed"
    [step] = await builder(p).plan("c")
    assert not step.cached


async def test_a_hang_is_killed_at_the_timeout_with_its_children(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    pidfile = pg_dir / "child.pid"
    script = f"#!/bin/sh\necho started\nsleep 300 &\necho $! > {pidfile}\nwait\n"
    recipe = write_project(pg_dir, script=script)
    recipe["prepare"]["timeout"] = "2s"
    p = await make_proxy({"c": recipe}, store=store)
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("c"), timeout=60)
    assert time.monotonic() - started < 30
    assert "timed out after 2s: started" in str(e.value)
    child = int(pidfile.read_text())
    for _ in range(50):  # the kill is synchronous; the zombie's reaping by init is not
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        await asyncio.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the command's child survived the timeout")
    [step] = await builder(p).plan("c")
    assert not step.cached


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (OSError, IndexError):
        return "Z"


def test_an_input_glob_matching_nothing_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "001.sql").write_text("select 1;\n")
    cfg = tmp_path / "taidon.yaml"
    cfg.write_text(
        "databases:\n"
        "  c:\n"
        "    prepare:\n"
        "      kind: command\n"
        "      run: [./migrate.sh]\n"
        "      inputs:\n"
        "        - migrations/*.sql\n"
        "        - prisma/**/*.prisma\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.message == (
        f"{cfg}:8: databases.c.prepare.inputs.1: 'prisma/**/*.prisma' matches no file"
    ), e.value.message


def test_a_bad_command_setting_is_named_with_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "taidon.yaml"
    cfg.write_text(
        "databases:\n"
        "  c:\n"
        "    prepare:\n"
        "      kind: command\n"
        "      run: []\n"
        "      inputs: ['*.sql']\n"
        "      timeout: soon\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:5: databases.c.prepare.run:" in e.value.message, e.value.message
    assert f"{cfg}:7: databases.c.prepare.timeout: not a duration: 'soon'" in e.value.message
