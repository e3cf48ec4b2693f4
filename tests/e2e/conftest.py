"""A real `sqlrs serve` subprocess on free ports, and a way to run the CLI against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import demo_recipe, free_port

START_TIMEOUT = 60.0
CLI_TIMEOUT = 180.0


@dataclass
class Cli:
    """Runs `sqlrs --config FILE …` as a subprocess; knows the server's ports and log."""

    config: Path
    port: int
    admin_port: int
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(
        self, *args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "taidon_proxy.cli", "--config", str(self.config), *args]
        return subprocess.run(  # noqa: PLW1510 - tests read returncode
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )

    def json(self, *args: str) -> Any:
        r = self.run("--json", *args)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return json.loads(r.stdout)

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "taidon_proxy.cli",
                    "--config",
                    str(self.config),
                    "serve",
                    "--log-level",
                    "info",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        self.wait_health(proc)
        return proc

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.admin_port}/v1/health"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_health(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"sqlrs serve exited {proc.returncode}:\n{self.log_text()}")
            time.sleep(0.1)
        raise AssertionError(f"sqlrs serve did not come up:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.healthy():  # a server started with --start is not our child: ask it to stop
            self.run("admin", "drain", "--timeout", "5", timeout=60)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def write_config(pg_dir: Path, databases: dict[str, Any]) -> Cli:
    port, admin_port = free_port(), free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "store": str(pg_dir / "store"),
        "snapshot": {"backend": "copy"},
        "runtime": {"kind": "process", "run_dir": str(pg_dir / "run")},
        "databases": databases,
    }
    path = pg_dir / "taidon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Cli(path, port, admin_port, pg_dir / "serve.log")


@pytest.fixture
def cli(pg_dir: Path, request: pytest.FixtureRequest) -> Iterator[Cli]:
    """A config with the demo recipe (not started: tests call cli.start())."""
    c = write_config(pg_dir, {"demo": demo_recipe()})
    try:
        yield c
    finally:
        c.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- sqlrs serve log ---\n{c.log_text()}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
