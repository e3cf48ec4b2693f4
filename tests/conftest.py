"""Shared fixtures: directories the unprivileged postgres user can reach, and a running proxy."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from taidon_proxy.app import Proxy
from taidon_proxy.config_load import parse_config
from tests import log_secrets

REPO = Path(__file__).resolve().parent.parent
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"
DEMO_SQL = REPO / "examples" / "demo" / "sql"


def pytest_configure(config: pytest.Config) -> None:
    log_secrets.install()


@pytest.fixture(autouse=True)
def no_secret_in_logs() -> Iterator[None]:
    """Fails the test during which the proxy logged a registered secret (tests/log_secrets)."""
    log_secrets.leaks.clear()
    yield
    leaks = list(log_secrets.leaks)
    log_secrets.leaks.clear()
    assert not leaks, "\n".join(leaks[:5])


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Async tests run on the event loop the proxy runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """A scratch directory under /tmp that the postgres OS user can traverse (0755)."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="taidon-t-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    """A loopback port nobody listens on right now (for subprocesses that need a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_under(path: Path) -> set[int]:
    """Pids whose command line names a path under `path` (postgres -D <clone>)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            if str(path).encode() in cmd:
                found.add(int(entry))
    return found


@pytest.fixture(scope="module")
def cert() -> Iterator[dict[str, str]]:
    """A self-signed certificate for localhost and 127.0.0.1, made with openssl."""
    d = Path(tempfile.mkdtemp(prefix="taidon-cert-"))
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        yield {"cert": str(d / "cert.pem"), "key": str(d / "key.pem")}
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def store() -> Iterator[str]:
    """One store per test module: initdb and root states are built once, then reused."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="taidon-t-"))
    d.chmod(0o755)
    try:
        yield str(d / "store")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class RunningProxy:
    proxy: Proxy
    host: str
    port: int
    config_path: Path

    def dsn(self, database: str, user: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{user}@{self.host}:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )

    def libpq_env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port)}


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(pg_dir: Path) -> AsyncIterator[ProxyFactory]:
    """Start in-process proxies from a config mapping; all are closed at teardown."""
    started: list[Proxy] = []

    async def make(databases: dict[str, Any] | None = None, **settings: Any) -> RunningProxy:
        cfg: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": None},
            "store": str(pg_dir / f"store{len(started)}"),
            "snapshot": {"backend": "copy"},
            "runtime": {"kind": "process", "run_dir": str(pg_dir / f"run{len(started)}")},
            "databases": databases or {},
            "shutdown_grace": 0,  # teardown ends open sessions at once
        }
        cfg.update(settings)
        path = pg_dir / f"taidon{len(started)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        config = parse_config(path.read_text(), source=path)
        proxy = await Proxy.open(config)
        started.append(proxy)
        await proxy.start()
        assert proxy.server is not None
        host, port = proxy.server.addresses[0].rsplit(":", 1)
        return RunningProxy(proxy, host, int(port), path)

    try:
        yield make
    finally:
        for p in reversed(started):
            await drop_shared_instances(p)
            await p.close()


async def drop_shared_instances(proxy: Proxy) -> None:
    """Remove shared instances' clones (running or kept): many tests of a module share one
    store, and a kept clone would carry one test's data into the next."""
    m = proxy.instances
    if m is None or not proxy.meta.is_open:  # closed by the test itself
        return
    for target in m.listing():
        if getattr(target, "isolation", "shared") == "shared":
            await m.remove(target, "test teardown")


def demo_recipe(**extra: Any) -> dict[str, Any]:
    return {
        "prepare": {
            "kind": "psql",
            "files": [str(DEMO_SQL / f) for f in ("01_schema.sql", "02_data.sql", "03_views.sql")],
        },
        "roles": ["app"],
        **extra,
    }
