"""`sqlrs token …` and `sqlrs admin quotas` as subprocesses against a real `sqlrs serve` with
teams: a token made by the admin works as ana's psql password and as her CLI bearer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import Cli, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def team_cli(pg_dir: Path) -> Cli:
    sql = pg_dir / "team.sql"
    sql.write_text("create table t (x int);\ninsert into t values (5);\n")
    recipe = {"prepare": {"kind": "psql", "files": [str(sql)]}, "roles": ["ana", "vic"]}
    c = write_config(pg_dir, {"shop": recipe, "hr": recipe})
    cfg = yaml.safe_load(c.config.read_text())
    cfg["auth"] = {"method": "scram-sha-256"}
    cfg["teams"] = {
        "payments": {"members": ["ana"], "aliases": ["shop"], "quotas": {"instances": 3}},
        "auditors": {"members": ["vic"], "aliases": ["hr"], "role": "viewer"},
    }
    cfg["users"] = {"ana": {"quotas": {"instances": 1}}}
    c.config.write_text(yaml.safe_dump(cfg))
    return c


def test_token_commands_quotas_and_refusals(team_cli: Cli) -> None:
    c = team_cli
    c.start()
    try:
        r = c.run("token", "create", "laptop", "--user", "ana", "--expires", "30d")
        assert r.returncode == 0, r.stderr
        token = r.stdout.strip()
        assert token.startswith("tdn_") and "not shown again" in r.stderr
        as_ana = {"TAIDON_TOKEN": token}
        listed = c.run("--json", "token", "list", env=as_ana)
        assert listed.returncode == 0, listed.stderr
        assert token not in listed.stdout and '"user": "ana"' in listed.stdout
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(c.port), "PGPASSWORD": token}
        out = subprocess.run(
            ["psql", "-X", "-At", "-w", "-U", "ana", "-d", "shop", "-c", "select x from t"],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "5"
        q = c.json("admin", "quotas")
        assert q["users"]["ana"]["instances"] == {"used": 0, "limit": 1}
        table = c.run("admin", "quotas")
        assert table.returncode == 0 and "payments" in table.stdout, table.stderr
        for column in ("INSTANCES", "DISK LIMIT", "LIFETIME", "IDLE TTL", "REFUSED"):
            assert column in table.stdout, table.stdout
        # ana's own token may not drain the proxy; the refusal names the permission
        r = c.run("admin", "drain", env=as_ana)
        assert r.returncode != 0
        assert "permission denied: administer needs the admin role (ana has developer)" in (
            r.stderr
        )
        # a revoked token no longer works, for psql or the CLI
        token_id = token.split("_")[1]
        r = c.run("token", "revoke", token_id, env=as_ana)
        assert r.returncode == 0 and f"revoked token {token_id}" in r.stdout, r.stderr
        out = subprocess.run(
            ["psql", "-X", "-At", "-w", "-U", "ana", "-d", "shop", "-c", "select 1"],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        assert out.returncode == 2
        assert 'password authentication failed for user "ana"' in out.stderr
        r = c.run("token", "list", env=as_ana)
        assert r.returncode != 0 and "missing or invalid bearer token" in r.stderr
        for args in (
            ("token", "--help"),
            ("token", "create", "--help"),
            ("admin", "quotas", "--help"),
        ):
            assert "Example" in c.run(*args).stdout, args
    finally:
        c.stop()
