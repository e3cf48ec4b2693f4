"""A real Postgres 15 server for the Postgres metadata backend's tests (initdb + pg_ctl), and
gateways (in-process proxies) whose metadata is in it.

It listens on a loopback port with SCRAM passwords (the DSN carries one, as a gateway's
does) and on a unix socket; `stop()` and `start()` make an outage. Its log is printed when
a test using it fails (`dump_log`).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests import log_secrets
from tests.conftest import ProxyFactory, RunningProxy, free_port

BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class MetadataServer:
    root: Path
    port: int
    password: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def dsn(self, database: str = "taidon_meta") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres([str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                          "-o", opts, "-w", "-t", "60", "start"]),
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
            timeout=90,
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.root),
             "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.stdout

    def fresh_database(self, name: str) -> str:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def dump_log(self) -> None:
        if self.log.exists():
            print(f"--- metadata server log ({self.log}) ---")
            print(self.log.read_text()[-6000:])


def start_server() -> MetadataServer:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="taidon-meta-"))
    root.chmod(0o755)
    password = "meta-" + secrets.token_hex(12)
    log_secrets.register(password)  # a log line with the DSN's password fails the test
    server = MetadataServer(root, free_port(), password)
    server.data.mkdir(mode=0o700)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        uid = pwd.getpwnam("postgres").pw_uid
        for p in (root, server.data, pwfile):
            os.chown(p, uid, uid)
    subprocess.run(
        _as_postgres([str(BIN / "initdb"), "-D", str(server.data), "-U", "postgres",
                      "--auth-local=trust", "--auth-host=scram-sha-256",
                      f"--pwfile={pwfile}"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pwfile.unlink()
    server.start()
    return server


@pytest.fixture(scope="module")
def metadata_server() -> Iterator[MetadataServer]:
    """One Postgres 15 server per test module; each test takes its own database."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def metadata_dsn(metadata_server: MetadataServer) -> Iterator[str]:
    """A fresh, empty database for one test. The server's log is printed at teardown, which
    pytest shows only for a test that failed."""
    yield metadata_server.fresh_database("m_" + secrets.token_hex(4))
    metadata_server.dump_log()


# --- gateways on such a database --------------------------------------------------------


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "shop.sql"
    f.write_text("create table items (x int);\ninsert into items values (1), (2);\n")
    return {"shop": {"prepare": {"kind": "psql", "files": [str(f)]}}}


async def gateway(
    make_proxy: ProxyFactory, pg_dir: Path, dsn: str, name: str, **settings: Any
) -> RunningProxy:
    meta = {"kind": "postgres", "dsn": dsn, "node": name}
    return await make_proxy(
        recipe(pg_dir), store=str(pg_dir / f"store-{name}"),
        runtime={"kind": "process", "run_dir": str(pg_dir / f"run-{name}")},
        metadata=meta, **settings,
    )  # fmt: skip


async def one(p: RunningProxy, database: str, sql: str) -> Any:
    conn = await asyncpg.connect(p.dsn(database), timeout=120)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()
