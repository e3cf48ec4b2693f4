"""The pytest plugin, run for real: `python -m pytest` on a sample project, as a subprocess.

The sample has a taidon.yaml with a psql recipe and no running proxy, so the plugin starts an
embedded `sqlrs serve` for the session and stops it at the end; with `-n 2` the xdist
controller starts it once for both workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, processes_under
from tests.e2e.conftest import Cli

pytestmark = pytest.mark.e2e

SAMPLE = REPO / "tests" / "data" / "pytest_plugin"
DJANGO = REPO / "tests" / "data" / "django"
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def project() -> Iterator[Path]:
    """A sample project (its store kept for the module: the recipe is built once)."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="taidon-pp-"))
    d.chmod(0o755)
    try:
        shutil.copy(SAMPLE / "recipe.sql", d / "recipe.sql")
        # Named sample_*.py in the repository so that its own test run does not collect them.
        shutil.copy(SAMPLE / "sample_rows.py", d / "test_rows.py")
        (d / "taidon.yaml").write_text(
            yaml.safe_dump(
                {
                    "store": str(d / "store"),
                    "runtime": {"kind": "process", "run_dir": str(d / "run")},
                    "databases": {"shop": {"prepare": {"kind": "psql", "files": ["recipe.sql"]}}},
                }
            )
        )
        (d / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\ntaidon_alias = shop\n")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_pytest(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    results = project / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TAIDON_", "PYTEST_"))}
    environ.update({"TAIDON_SAMPLE_RESULTS": str(results), "PYTHONDONTWRITEBYTECODE": "1"})
    environ.update(env or {})
    proc = subprocess.run(  # noqa: PLW1510 - the test reads the code
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *args],
        cwd=project, env=environ, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def results(project: Path) -> list[dict[str, str]]:
    return [json.loads(p.read_text()) for p in sorted((project / "results").glob("*.json"))]


def proxy_config(project: Path) -> dict[str, int | None]:
    """What the sample's test_embedded_proxy_config saw."""
    return json.loads((project / "results" / "proxy.config").read_text())


def kept_test_clones(project: Path) -> list[str]:
    """Shared instance records of test databases in the store (read with sqlite3)."""
    db = sqlite3.connect(project / "store" / "meta.sqlite")
    try:
        rows = db.execute("select key from shared_instances where label like 'pytest-%'")
        return [r[0] for r in rows]
    finally:
        db.close()


def assert_nothing_left(project: Path) -> None:
    """No embedded proxy, no instance server, no derived config file after the run."""
    assert processes_under(project) == set()
    assert list(project.glob(".taidon-pytest-*")) == []


def test_fresh_database_per_test_embedded_proxy(project: Path) -> None:
    code, out = run_pytest(project, "test_rows.py")
    assert code == 0, out
    assert "6 passed" in out, out
    assert proxy_config(project) == {"files": 1, "warm_labels": 1}
    seen = results(project)
    assert len(seen) == 5
    assert len({r["dsn"] for r in seen}) == 5  # a database per test
    assert len({r["data_directory"] for r in seen}) == 5  # each its own server and clone
    assert all(r["database"] == "shop" for r in seen)
    assert all("pytest-main-" in r["dsn"] for r in seen)
    assert_nothing_left(project)


def test_xdist_workers_get_distinct_databases(project: Path) -> None:
    code, out = run_pytest(project, "test_rows.py", "-n", "2")
    assert code == 0, out
    assert "6 passed" in out, out
    assert proxy_config(project) == {"files": 1, "warm_labels": 2}  # one proxy, sized to 2
    seen = results(project)
    assert len({r["data_directory"] for r in seen}) == 5
    workers = {r["worker"] for r in seen}
    assert workers == {"gw0", "gw1"}, seen
    for r in seen:  # the worker id is in the label
        assert f"pytest-{r['worker']}-" in r["dsn"]
    assert_nothing_left(project)


def test_module_scope_shares_one_database_per_module(project: Path) -> None:
    # Each test asserts it sees only the seed row: with one database for the module the
    # second test sees the first one's row and fails. That is the point of this run.
    code, out = run_pytest(project, "test_rows.py", "--taidon-scope", "module")
    assert code == 1, out
    assert "2 passed" in out and "4 failed" in out, out
    assert_nothing_left(project)


def test_a_killed_pytest_takes_its_embedded_proxy_with_it(project: Path) -> None:
    """SIGKILL of pytest mid-test: the embedded proxy gets SIGTERM from the kernel (parent
    death signal) and stops with its instances; no process is left."""
    shutil.copy(SAMPLE / "sample_hang.py", project / "test_hang.py")
    results = project / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TAIDON_", "PYTEST_"))}
    environ["TAIDON_SAMPLE_RESULTS"] = str(results)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_hang.py"],
        cwd=project, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (results / "hanging").exists():
            assert proc.poll() is None, "pytest ended before the test ran"
            assert time.monotonic() < deadline, "the test never got its database"
            time.sleep(0.1)
        assert processes_under(project)  # the proxy and an instance server run now
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while processes_under(project) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_under(project) == set()
        # The stopped proxy kept the killed test's clone (a shared instance's); the next
        # embedded proxy on the store removes it.
        assert kept_test_clones(project) != []
        code, out = run_pytest(project, "test_rows.py::test_one")
        assert code == 0, out
        assert kept_test_clones(project) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        (project / "test_hang.py").unlink()
        for left in project.glob(".taidon-pytest-*"):  # a killed run cannot delete it
            left.unlink()


def test_wrong_alias_is_named_in_the_output(project: Path) -> None:
    code, out = run_pytest(project, "test_rows.py::test_one", "--taidon-alias", "nope")
    assert code == 1, out
    assert 'taidon: unknown alias "nope"' in out, out
    assert "serves: shop" in out, out
    assert_nothing_left(project)


def test_missing_config_is_named_in_the_output(project: Path) -> None:
    code, out = run_pytest(project, "test_rows.py::test_one", "--taidon-config", "absent.yaml")
    assert code == 1, out
    assert "absent.yaml does not exist" in out, out
    bad = project / "bad.yaml"
    # Its own store: with the default one, a proxy a user runs on the default ports (the demo)
    # would be taken as this config's proxy.
    bad.write_text(
        f"store: {project / 'bad-store'}\n"
        "databases:\n  shop:\n    prepare: {kind: psql, files: [gone.sql]}\n"
    )
    try:
        code, out = run_pytest(project, "test_rows.py::test_one", "--taidon-config", "bad.yaml")
    finally:
        bad.unlink()
    assert code == 1, out
    assert "taidon: " in out and "bad.yaml:4" in out and "gone.sql" in out, out
    assert_nothing_left(project)


@pytest.mark.parametrize("how", ["url", "config"])
def test_a_running_proxy_is_used_and_left_running(project: Path, tmp_path: Path, how: str) -> None:
    """--taidon-url, or the config's own proxy found running at its admin address: the tests
    use that proxy (no embedded one); it is not stopped, and the test databases are gone
    from it afterwards."""
    cfg = yaml.safe_load((project / "taidon.yaml").read_text())
    admin = free_port()
    cfg.update({"listen": f"127.0.0.1:{free_port()}", "admin": {"listen": f"127.0.0.1:{admin}"}})
    own = project / "own.yaml"
    own.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        serve = subprocess.Popen(
            [sys.executable, "-m", "taidon_proxy.cli", "--config", str(own), "serve"],
            stdout=f, stderr=f, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    cli = Cli(own, 0, admin, log, [serve])
    try:
        cli.wait_health(serve)
        args = ["--taidon-url", f"http://127.0.0.1:{admin}"] if how == "url" else []
        code, out = run_pytest(project, "test_rows.py", "--taidon-config", "own.yaml", *args)
        assert code == 0, out + cli.log_text()
        assert "6 passed" in out, out
        assert proxy_config(project) == {"files": 0, "warm_labels": None}  # none embedded
        assert serve.poll() is None  # not ours to stop
        assert "shop:pytest-main-" in cli.log_text()  # it served the tests' databases
        instances = cli.json("admin", "instances")
        assert [i for i in instances if "pytest-" in str(i["key"])] == []
    finally:
        cli.stop()
        own.unlink(missing_ok=True)
    assert processes_under(project) == set()


def test_pytest_django_test_database_is_the_recipe_state(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="taidon-pd-"))
    d.chmod(0o755)
    try:
        shutil.copytree(DJANGO / "djproj", d / "djproj")
        shutil.copytree(
            DJANGO / "shopapp", d / "shopapp", ignore=shutil.ignore_patterns("tests.py")
        )
        shutil.copy(DJANGO / "recipe.sql", d / "recipe.sql")
        shutil.copy(SAMPLE / "sample_dj.py", d / "test_dj.py")
        (d / "taidon.yaml").write_text(
            yaml.safe_dump(
                {
                    "store": str(d / "store"),
                    "runtime": {"kind": "process", "run_dir": str(d / "run")},
                    "databases": {
                        "shop": {
                            "prepare": {"kind": "psql", "files": ["recipe.sql"]},
                            "roles": ["app"],
                        }
                    },
                }
            )
        )
        (d / "pytest.ini").write_text(
            "[pytest]\nDJANGO_SETTINGS_MODULE = djproj.settings\ntaidon_alias = shop\n"
        )
        # The settings read DATABASE_URL; nothing listens there: the plugin points Django
        # at the proxy, and no test database is created (that would need this server).
        env = {"DATABASE_URL": "postgres://app@127.0.0.1:9/shop"}
        code, out = run_pytest(d, "test_dj.py", env=env)
        assert code == 0, out
        assert "3 passed" in out, out
        assert processes_under(d) == set()
    finally:
        shutil.rmtree(d, ignore_errors=True)
