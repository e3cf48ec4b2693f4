"""The `sqlrs` CLI as a subprocess against a real `sqlrs serve`: output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli

pytestmark = pytest.mark.e2e


def test_no_proxy_running_says_how_to_start(cli: Cli) -> None:
    r = cli.run("status")
    assert r.returncode == 4
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"no proxy is running at 127.0.0.1:{cli.admin_port}" in lines[0]
    assert f"sqlrs --config {cli.config} serve" in lines[0]
    for args in (("ls",), ("admin", "instances"), ("prepare:psql", "demo")):
        assert cli.run(*args).returncode == 4


def test_help_everywhere_has_an_example(cli: Cli) -> None:
    groups = {
        "": [
            "admin",
            "config",
            "diff",
            "explain",
            "init",
            "login",
            "logout",
            "logs",
            "ls",
            "plan",
            "plan:lb",
            "plan:psql",
            "prepare",
            "prepare:lb",
            "prepare:psql",
            "rm",
            "run:pgbench",
            "run:psql",
            "serve",
            "state",
            "status",
        ],
        "admin": [
            "connections",
            "drain",
            "gc",
            "instances",
            "jobs",
            "logs",
            "pin",
            "reload",
            "reset",
            "rm",
            "snapshot",
            "states",
            "status",
            "unpin",
        ],
        "config": ["get", "set", "show"],
        "state": ["export", "import", "verify"],
    }
    for group, commands in groups.items():
        for command in commands:
            args = [a for a in (group, command) if a]
            r = cli.run(*args, "--help")
            assert r.returncode == 0, (args, r.stderr)
            assert "Example" in r.stdout, args
    r = cli.run("--help")
    assert "Exit codes:" in r.stdout


def test_prepare_then_run_tools_and_inspect(cli: Cli) -> None:
    cli.start()
    r = cli.run("plan:psql", "demo")
    assert r.returncode == 0, r.stderr
    assert "3 step(s), 0 cached, 3 to run" in r.stdout

    r = cli.run("prepare:psql", "demo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"postgresql://postgres@127.0.0.1:{cli.port}/demo"
    assert "demo: ready" in r.stderr  # the progress bar went to stderr

    out = cli.json("prepare:psql", "demo", "--label", "ci")
    assert out["built"] is False and out["dsn"].endswith("/demo:ci")
    state = out["state"]

    r = cli.run("plan:lb", "demo")
    assert r.returncode == 2 and "demo is a psql recipe" in r.stderr
    assert "or the plain one (any kind)" in r.stderr
    r = cli.run("plan:psql", "nope")
    assert r.returncode == 5 and "known aliases: demo" in r.stderr

    # psql's output streams through; its exit status is ours.
    r = cli.run("run:psql", "demo", "-X", "-At", "-c", "select count(*) from film")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "1000"
    r = cli.run("run:psql", "demo", "-X", "-c", "select nope")
    assert r.returncode != 0 and 'column "nope" does not exist' in r.stderr
    r = cli.run("run:pgbench", "demo", "-n", "-S", "-t", "20", "-f", "/dev/null")
    # pgbench refuses an empty script: its message and status come back unchanged.
    assert r.returncode != 0 and "pgbench" in r.stderr

    listing = cli.json("ls")
    assert [a["status"] for a in listing["aliases"]] == ["fresh"]
    assert state in [s["id"] for s in listing["states"]]
    assert listing["jobs"][0]["status"] == "succeeded"
    r = cli.run("ls", "states", state[:8])
    assert r.returncode == 0 and state[:12] in r.stdout
    r = cli.run("admin", "states", "--tree")
    assert r.returncode == 0
    assert "initdb" in r.stdout and "02_data.sql" in r.stdout

    r = cli.run("logs")
    assert r.returncode == 0 and "job.done" in r.stdout
    job = listing["jobs"][0]["id"]
    lines = cli.run("--json", "admin", "logs", job[:6], "--follow").stdout.splitlines()
    assert json.loads(lines[-1])["kind"] == "job.done"

    status = cli.json("status")
    assert status["backend"]["name"] == "copy" and status["listeners"]["proxy"] == [
        f"127.0.0.1:{cli.port}"
    ]
    r = cli.run("status")
    assert r.returncode == 0 and "backend    copy" in r.stdout


def test_admin_operations(cli: Cli) -> None:
    cli.start()
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(cli.port), "PGUSER": "postgres"}
    # A client holding a session open on demo:work.
    holder = subprocess.Popen(
        [
            "psql",
            "-X",
            "-d",
            "demo:work",
            "-c",
            "create table note (t text)",
            "-c",
            "insert into note values ('hi')",
            "-c",
            "select pg_sleep(60)",
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(300):
            conns = cli.json("admin", "connections")
            if conns and conns[0]["instance"]:
                break
            time.sleep(0.2)
        assert conns[0]["database"] == "demo:work"
        r = cli.run("admin", "connections")
        assert r.returncode == 0 and "demo:work" in r.stdout
        insts = cli.json("admin", "instances")
        assert [(i["alias"], i["label"], i["connections"]) for i in insts] == [("demo", "work", 1)]

        r = cli.run("admin", "snapshot", "demo:work", "--name", "noted")
        assert r.returncode == 0, r.stderr
        assert "state:noted" in r.stdout
        r = cli.run("admin", "snapshot", "demo:work", "--name", "noted")
        assert r.returncode == 6 and "taken" in r.stderr
        r = cli.run("admin", "snapshot", "demo:work", "--name", "bad name!")
        assert r.returncode == 2 and "name" in r.stderr

        # In use: refused, then a dry run, then forced.
        inst = insts[0]["id"]
        r = cli.run("rm", inst)
        assert r.returncode == 6 and "open connection" in r.stderr
        r = cli.run("admin", "reset", "demo:work")
        assert r.returncode == 0 and "reset demo:work" in r.stdout
        _, err = holder.communicate(timeout=30)
        assert "terminating connection due to administrator command" in err
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)

    r = subprocess.run(  # noqa: PLW1510 - tests read returncode
        ["psql", "-X", "-At", "-d", "state:noted", "-c", "select t from note"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.strip() == "hi", r.stderr

    r = cli.run("admin", "pin", "noted")
    assert r.returncode == 0 and r.stdout.startswith("pinned ")
    r = cli.run("rm", "noted", "--dry-run")
    assert r.returncode == 0 and "would remove 1 state(s)" in r.stdout
    assert "needs --force" in r.stdout
    r = cli.run("rm", "noted")
    assert r.returncode == 6 and "pinned" in r.stderr
    assert cli.run("admin", "unpin", "noted").returncode == 0
    r = cli.run("rm", "noted", "--force")
    assert r.returncode == 0 and "removed 1 state(s)" in r.stdout
    r = cli.run("rm", "noted")
    assert r.returncode == 5 and 'no state or instance "noted"' in r.stderr

    r = cli.run("admin", "logs", "j-nothing")
    assert r.returncode == 5
    r = cli.run("admin", "gc", "--dry-run")
    assert r.returncode == 0 and "would evict" in r.stdout


def test_wrong_token_and_drain(cli: Cli) -> None:
    proc = cli.start()
    token = cli.config.parent / "store" / "admin.token"
    good = token.read_text()
    token.write_text("wrong\n")
    try:
        r = cli.run("admin", "status")
        assert r.returncode == 7
        assert r.stderr.strip() == "sqlrs: missing or invalid bearer token"
    finally:
        token.write_text(good)
    r = cli.run("admin", "drain", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert "the proxy stopped" in r.stdout
    # "stopped" means gone: the process has exited by the time the command returns.
    assert proc.poll() == 0, "sqlrs admin drain said stopped while the proxy still ran"
    assert cli.run("status").returncode == 4


def test_start_in_background_and_config_commands(cli: Cli) -> None:
    r = cli.run("config", "get", "instances.idle_ttl")
    assert r.returncode == 0 and r.stdout.strip() == "600.0"
    r = cli.run("config", "set", "instances.idle_ttl", "30m")
    assert r.returncode == 0
    assert cli.json("config", "get", "instances.idle_ttl") == 1800.0
    r = cli.run("config", "set", "instances.max", "zero")
    assert r.returncode == 3 and "instances.max" in r.stderr
    assert cli.run("config", "get", "no.such").returncode == 5
    assert "databases:" in cli.run("config", "show").stdout

    r = cli.run("--start", "status")
    try:
        assert r.returncode == 0, r.stderr
        assert "taidon proxy" in r.stdout
    finally:
        # Stopped through the API: the background server is not our child.
        cli.run("admin", "drain", "--timeout", "10")
    assert not cli.healthy()


def test_init_writes_a_loadable_config(cli: Cli) -> None:
    target = cli.config.parent / "fresh" / "taidon.yaml"
    target.parent.mkdir()
    r = subprocess.run(  # noqa: PLW1510 - tests read returncode
        [sys.executable, "-m", "taidon_proxy.cli", "--config", str(target), "init"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "snapshot backend:" in r.stdout
    assert (target.parent / ".taidon" / "store").is_dir()
    r2 = subprocess.run(  # noqa: PLW1510 - tests read returncode
        [sys.executable, "-m", "taidon_proxy.cli", "--config", str(target), "init"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r2.returncode == 6 and "exists" in r2.stderr
    r3 = subprocess.run(  # noqa: PLW1510 - tests read returncode
        [
            sys.executable,
            "-m",
            "taidon_proxy.cli",
            "--config",
            str(target),
            "--json",
            "config",
            "get",
            "snapshot.backend",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r3.returncode == 0 and json.loads(r3.stdout) in ("copy", "overlayfs", "btrfs", "zfs")


# --- issue 10: configuration found early, reload, papercuts ----------------------------------


def sqlrs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI exactly as typed: no --config put in front."""
    return subprocess.run(  # noqa: PLW1510 - tests read returncode
        [sys.executable, "-m", "taidon_proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or {**os.environ, "COLUMNS": "200"},
    )


def test_version_and_options_after_the_command(cli: Cli) -> None:
    from importlib.metadata import version

    r = sqlrs("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sqlrs {version('taidon-proxy')}"
    config = str(cli.config)
    r = sqlrs("config", "get", "listen", "--config", config, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == f"127.0.0.1:{cli.port}"
    r = sqlrs("admin", "status", "--config", config)
    assert r.returncode == 4 and f"127.0.0.1:{cli.admin_port}" in r.stderr  # its config, not ./
    with open(cli.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taidon_proxy.cli", "serve", "--config", config],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    cli.procs.append(proc)
    cli.wait_health(proc)
    r = sqlrs("status", "--json", "--config", config)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"]["name"] == "copy"
    assert "store.backend" in cli.log_text() and "backend=copy" in cli.log_text()


def test_config_show_checks_the_files_a_recipe_names(cli: Cli) -> None:
    text = cli.config.read_text().replace(
        "02_data.sql", "02_missing.sql"
    )  # the demo recipe's second file
    cli.config.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "02_missing.sql" in t)
    r = cli.run("config", "show")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert f"{cli.config}:{line}: databases.demo.prepare.files.1:" in r.stderr, r.stderr
    assert "02_missing.sql: no such file" in r.stderr
    # The operator can still reach (or not reach) the proxy: only the schema is needed there.
    assert cli.run("status").returncode == 4


def test_tables_are_not_folded_when_piped(cli: Cli) -> None:
    from tests.conftest import demo_recipe

    alias = "a_rather_long_alias_name_for_the_inventory_service_" + "x" * 10
    add_recipe(cli, alias, demo_recipe())
    cli.start()
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = sqlrs("--config", str(cli.config), "ls", "aliases", env=env)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if alias in line]
    assert rows and rows[0].count(alias) == 2, r.stdout  # alias and database, both whole
    assert max(len(line) for line in r.stdout.splitlines()) > 120


def add_recipe(cli: Cli, alias: str, recipe: dict[str, Any]) -> None:
    import yaml

    cfg = yaml.safe_load(cli.config.read_text())
    cfg["databases"][alias] = recipe
    cli.config.write_text(yaml.safe_dump(cfg))


def failing_recipe(d: Path) -> dict[str, Any]:
    files = []
    for name, sql in (
        ("1_ok.sql", "create table a (x int);"),
        ("2_bad.sql", "insert into a values (1);\nselect * from no_such_table;"),
        ("3_after.sql", "select 1;"),
    ):
        (d / name).write_text(sql + "\n")
        files.append(str(d / name))
    return {"prepare": {"kind": "psql", "files": files}}


def test_prepare_any_kind_and_progress_counts_real_steps(cli: Cli) -> None:
    add_recipe(cli, "bad", failing_recipe(cli.config.parent))
    cli.start()
    r = cli.run("plan", "demo")
    assert r.returncode == 0 and "demo (psql): 3 step(s), 0 cached, 3 to run" in r.stdout
    r = cli.run("prepare", "demo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"postgresql://postgres@127.0.0.1:{cli.port}/demo"
    assert "3/3" in r.stderr and "demo: ready" in r.stderr
    r = cli.run("prepare", "demo")  # all cached: still three steps, all done
    assert r.returncode == 0 and "3/3" in r.stderr and "1/1" not in r.stderr, r.stderr
    r = cli.run("prepare:lb", "demo")
    assert r.returncode == 2 and "or the plain one (any kind)" in r.stderr

    for attempt in ("live", "replayed"):
        r = cli.run("prepare", "bad")
        assert r.returncode == 1, (attempt, r.stderr)
        assert "no_such_table" in r.stderr
        assert "failed at step 2/3 (2_bad.sql)" in r.stderr, (attempt, r.stderr)
        assert "1/3" in r.stderr and "0/1" not in r.stderr, (attempt, r.stderr)


def test_config_set_keeps_comments_and_reload_brings_the_alias(cli: Cli) -> None:
    cli.config.write_text("# who: the platform team\n" + cli.config.read_text())
    cli.start()
    sql = cli.config.parent / "x.sql"
    sql.write_text("create table x (v text); insert into x values ('fresh');\n")
    r = cli.run("config", "set", "databases.x", "{prepare: {kind: liquibase_typo}}")
    assert r.returncode == 3 and "databases.x.prepare.kind" in r.stderr, r.stderr
    assert "use one of: psql, lb, command, alembic, django, liquibase" in r.stderr
    r = cli.run("config", "set", "databases.x", f"{{prepare: {{kind: psql, files: ['{sql}']}}}}")
    assert r.returncode == 0, r.stderr
    assert "sqlrs admin reload" in r.stderr
    assert cli.config.read_text().startswith("# who: the platform team\n")

    r = cli.run("prepare", "x")
    assert r.returncode == 5 and 'alias "x" does not exist; known aliases: demo' in r.stderr
    assert "sqlrs admin reload" in r.stderr
    r = cli.run("admin", "reload")
    assert r.returncode == 0, r.stderr
    assert "aliases added: x" in r.stdout
    r = cli.run("run:psql", "x", "-X", "-At", "-c", "select v from x")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "fresh", r.stderr

    other = str(cli.port + 1 if cli.port < 65000 else cli.port - 1)
    assert cli.run("config", "set", "listen", f"127.0.0.1:{other}").returncode == 0
    r = cli.run("admin", "reload")
    assert r.returncode == 0, r.stderr
    assert f"needs restart: listen (running 127.0.0.1:{cli.port}, file says 127.0.0.1:{other})" in (
        r.stdout
    )
    r = cli.run("admin", "reload", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["needs_restart"][0]["key"] == "listen"

    add_recipe(cli, "y", {"prepare": {"kind": "psql", "files": ["n.sql"]}})
    line = next(i for i, t in enumerate(cli.config.read_text().splitlines(), 1) if "n.sql" in t)
    r = cli.run("admin", "reload")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert f"{cli.config}:{line}: databases.y.prepare.files.0:" in r.stderr, r.stderr
    assert "nothing changed" in r.stderr
    assert [a["alias"] for a in cli.json("ls", "aliases")] == ["demo", "x"]
