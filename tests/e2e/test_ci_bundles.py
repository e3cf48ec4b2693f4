"""The CI templates' script (examples/ci/taidon-ci.sh) and the `sqlrs state` / `sqlrs explain`
commands it runs, against real `sqlrs serve` processes on two separate stores: one CI run
that misses the cache and saves, one on a fresh machine that restores and builds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import demo_recipe
from tests.e2e.conftest import Cli, write_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "ci" / "taidon-ci.sh"
SQLRS = Path(sys.executable).parent / "sqlrs"


def machine(pg_dir: Path, name: str, databases: dict[str, Any]) -> Cli:
    """A config and store of their own, as a fresh CI machine would have."""
    d = pg_dir / name
    d.mkdir(mode=0o755)
    return write_config(d, databases)


@pytest.fixture
def machines(pg_dir: Path, request: pytest.FixtureRequest) -> Iterator[list[Cli]]:
    made: list[Cli] = []
    try:
        yield made
    finally:
        for c in made:
            c.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for c in made:
                print(f"--- sqlrs serve log {c.config} ---\n{c.log_text()}")


def ci(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TAIDON_CONFIG": str(cli.config), "SQLRS": str(SQLRS)}
    return subprocess.run(  # noqa: PLW1510 - tests read returncode
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=180, env=env
    )


def films(cli: Cli) -> str:
    r = cli.run("run:psql", "demo", "-X", "-A", "-t", "-c", "select count(*) from film")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_miss_save_then_restore_on_a_fresh_store_without_a_build(
    pg_dir: Path, machines: list[Cli]
) -> None:
    assert SQLRS.exists(), "sqlrs is not installed in this environment"
    cache = pg_dir / "ci-cache"
    first = machine(pg_dir, "first", {"demo": demo_recipe()})
    machines.append(first)
    first.start()
    key = ci(first, "key", "demo").stdout.strip()
    assert len(key) == 64
    r = ci(first, "restore", "demo", str(cache))
    assert r.returncode == 0 and f"cache miss for demo (key {key[:12]})" in r.stderr
    assert films(first) == "1000"  # the tests, through the proxy
    r = ci(first, "save", "demo", str(cache))
    assert r.returncode == 0, r.stderr
    bundle = cache / f"demo-{key}.tzst"
    assert f"saved {bundle}" in r.stderr and bundle.is_file()
    assert sorted(p.name for p in cache.iterdir()) == [bundle.name]  # no temp file left
    first.stop()

    fresh = machine(pg_dir, "fresh", {"demo": demo_recipe()})
    machines.append(fresh)
    fresh.start()
    # A damaged cache entry: refused by name, removed, nothing stored.
    damaged = pg_dir / "damaged" / bundle.name
    damaged.parent.mkdir()
    damaged.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    r = fresh.run("state", "verify", str(damaged))
    assert r.returncode == 2
    assert r.stderr.startswith(
        f"sqlrs: {damaged}: truncated: the file ends inside the data (incomplete zstd frame)"
    )
    r = ci(fresh, "restore", "demo", str(damaged.parent))
    assert r.returncode == 0
    assert "the cached bundle was refused (sqlrs exit 2), removed" in r.stderr
    assert "truncated: the file ends inside the data" in r.stderr
    assert not damaged.exists()
    assert fresh.json("admin", "states") == []
    # The good one: imported and adopted, so the tests' connection builds nothing.
    r = ci(fresh, "restore", "demo", str(cache))
    assert r.returncode == 0, r.stderr
    assert f"imported state {key[:12]} (03_views.sql); demo serves it now, without a build" in (
        r.stderr
    )
    assert films(fresh) == "1000"
    assert fresh.json("admin", "jobs") == []  # no build ran, not even initdb
    assert [s["id"] for s in fresh.json("admin", "states")] == [key]
    r = ci(fresh, "save", "demo", str(cache))
    assert r.returncode == 0 and "demo is unchanged" in r.stderr

    # The recipe changes: a new key, a miss, and the save replaces the old bundle.
    recipe = demo_recipe()
    recipe["prepare"]["variables"] = {"edition": "2"}
    cfg = yaml.safe_load(fresh.config.read_text())
    cfg["databases"]["demo"] = recipe
    fresh.config.write_text(yaml.safe_dump(cfg))
    assert fresh.run("admin", "reload").returncode == 0
    r = ci(fresh, "restore", "demo", str(cache))
    assert r.returncode == 0 and "cache miss" in r.stderr
    r = ci(fresh, "save", "demo", str(cache))
    assert r.returncode == 0, r.stderr
    (saved,) = cache.iterdir()
    assert saved.name.startswith("demo-") and saved != bundle
    assert f"removed the bundle of an older key: {bundle.name}" in r.stderr


def test_templates_run_the_tested_script_and_commands() -> None:
    """Each template restores before its tests and saves after them, with this script."""
    gh = yaml.safe_load((REPO / "examples" / "ci" / "github-actions.yml").read_text())
    steps = gh["jobs"]["test"]["steps"]
    runs = [s.get("run", "") for s in steps]
    uses = [s.get("uses", "") for s in steps]
    order = [
        next(i for i, r in enumerate(runs) if "sqlrs --start status" in r),
        next(i for i, r in enumerate(runs) if "taidon-ci.sh key" in r),
        next(i for i, u in enumerate(uses) if u.startswith("actions/cache/restore@")),
        next(i for i, r in enumerate(runs) if "taidon-ci.sh restore" in r),
        next(i for i, r in enumerate(runs) if "sqlrs prepare" in r),
        next(i for i, r in enumerate(runs) if "taidon-ci.sh save" in r),
        next(i for i, u in enumerate(uses) if u.startswith("actions/cache/save@")),
    ]
    assert order == sorted(order)
    restore = steps[order[2]]
    save = steps[order[6]]
    assert restore["with"]["key"] == save["with"]["key"]
    assert "steps.key.outputs.key" in save["with"]["key"]
    assert "cache-hit != 'true'" in save["if"]
    gl = yaml.safe_load((REPO / "examples" / "ci" / "gitlab-ci.yml").read_text())
    job = gl["db-tests"]
    lines = [*job["before_script"], *job["script"]]
    text = "\n".join(lines)
    assert text.index("taidon-ci.sh restore") < text.index("sqlrs prepare")
    assert text.index("sqlrs prepare") < text.index("taidon-ci.sh save")
    assert job["cache"]["paths"] == [".taidon-bundles/"]
    for line in lines:  # every script invocation is one the script accepts
        if "taidon-ci.sh" in line:
            sub = line.split("taidon-ci.sh", 1)[1].split()
            assert sub[0] in ("key", "restore", "save"), line
