"""Scale-in drain of a real `sqlrs serve` (what a Kubernetes gateway replica does on SIGTERM):
it stops accepting, readiness answers 503, open sessions finish within `shutdown_grace`, the
rest get 57P01 saying the proxy is shutting down, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import free_port
from tests.integration.test_store_recovery import start_serve, wait_listening, write_config

pytestmark = pytest.mark.integration


class Gateway:
    """One `sqlrs serve` with a proxy port and an admin port on loopback."""

    def __init__(self, pg_dir: Path, grace: str) -> None:
        sql = pg_dir / "r.sql"
        sql.write_text("create table t (x int);\n")
        self.port, self.admin_port = free_port(), free_port()
        config = write_config(
            pg_dir,
            {"r": {"prepare": {"kind": "psql", "files": [str(sql)]}}},
            listen=f"127.0.0.1:{self.port}",
            admin={"listen": f"127.0.0.1:{self.admin_port}"},
            shutdown_grace=grace,
        )
        self.log = pg_dir / "serve.log"
        self.proc = start_serve(config, self.log)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/r"

    def ready(self) -> tuple[int, dict[str, str]]:
        """GET /v1/ready (no token, as a kubelet probes it)."""
        url = f"http://127.0.0.1:{self.admin_port}/v1/ready"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_not_ready(self) -> dict[str, str]:
        deadline = time.monotonic() + 10
        while True:
            status, body = self.ready()
            if status == 503:
                return body
            assert time.monotonic() < deadline, f"still ready: {status} {body}"
            time.sleep(0.05)

    def terminate(self) -> float:
        os.kill(self.proc.pid, signal.SIGTERM)
        return time.monotonic()


@pytest.fixture
def gateway_factory(pg_dir: Path) -> Iterator[type[Gateway]]:
    made: list[Gateway] = []

    class Made(Gateway):
        def __init__(self, pg_dir: Path, grace: str) -> None:
            super().__init__(pg_dir, grace)
            made.append(self)

    yield Made
    for g in made:
        if g.proc.poll() is None:
            os.killpg(g.proc.pid, signal.SIGKILL)
            g.proc.wait(timeout=10)
            sys.stderr.write(f"--- sqlrs serve log ---\n{g.log.read_text(errors='replace')}\n")


async def test_sigterm_lets_a_transaction_finish_then_exits_0(
    pg_dir: Path, gateway_factory: type[Gateway]
) -> None:
    gw = gateway_factory(pg_dir, "20s")
    await asyncio.to_thread(wait_listening, gw.proc, gw.port)
    assert gw.ready() == (200, {"status": "ready"})
    conn = await asyncpg.connect(gw.dsn, timeout=60)
    await conn.execute("begin; insert into t values (1)")
    sent = gw.terminate()
    # The replica leaves the Service at once: readiness fails, new clients are refused...
    assert await asyncio.to_thread(gw.wait_not_ready) == {"status": "draining"}
    with pytest.raises(OSError):
        await asyncpg.connect(gw.dsn, timeout=5)
    assert gw.proc.poll() is None  # ...while it waits for the open session
    # The session in its transaction goes on and commits across the SIGTERM.
    await conn.execute("insert into t values (2)")
    await conn.execute("commit")
    assert await conn.fetchval("select count(*) from t") == 2
    await conn.close()
    code = await asyncio.to_thread(gw.proc.wait, 30)
    took = time.monotonic() - sent
    assert code == 0, gw.log.read_text(errors="replace")
    assert took < 15, f"it waited {took:.1f}s after the last session left"  # not the 20 s grace
    assert "proxy.stopped" in gw.log.read_text(errors="replace")


async def test_a_session_past_the_grace_gets_57p01_and_the_exit_is_0(
    pg_dir: Path, gateway_factory: type[Gateway]
) -> None:
    gw = gateway_factory(pg_dir, "2s")
    await asyncio.to_thread(wait_listening, gw.proc, gw.port)
    warm = await asyncpg.connect(gw.dsn, timeout=60)  # builds the state
    await warm.close()
    # A real psql inside a transaction that outlasts the grace period.
    psql = subprocess.Popen(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", gw.dsn,
         "-c", "begin", "-c", "insert into t values (1)", "-c", "select pg_sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        await asyncio.sleep(2.0)  # the state is built (above): psql is in its pg_sleep now
        assert psql.poll() is None, psql.communicate()
        sent = gw.terminate()
        assert await asyncio.to_thread(gw.wait_not_ready) == {"status": "draining"}
        _, err = await asyncio.to_thread(psql.communicate, timeout=30)
        ended = time.monotonic() - sent
        assert psql.returncode != 0
        assert "FATAL:  terminating connection due to administrator command" in err, err
        assert "the proxy is shutting down" in err, err
        assert ended >= 2.0, f"ended after {ended:.1f}s, before the 2 s grace"
        code = await asyncio.to_thread(gw.proc.wait, 30)
        took = time.monotonic() - sent
        assert code == 0, gw.log.read_text(errors="replace")
        assert took < 2.0 + 10, f"exit {took:.1f}s after SIGTERM"
    finally:
        if psql.poll() is None:
            psql.kill()
            psql.communicate(timeout=10)
