"""Instance lifecycle: a crash reaches the clients and drops the lease; no server outlives
the proxy, and a restarted proxy reaps what a killed one left behind (shared instances keep
their clones through all of it); bad config fails early."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from taidon_proxy.app import Proxy
from taidon_proxy.config_load import parse_config
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.instances.manager import InstanceManager
from tests.conftest import ProxyFactory, RunningProxy, free_port, processes_under

pytestmark = pytest.mark.integration

SQLRS = [sys.executable, "-m", "taidon_proxy.cli"]


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


def manager(p: RunningProxy | Proxy) -> InstanceManager:
    proxy = p.proxy if isinstance(p, RunningProxy) else p
    assert proxy.instances is not None
    return proxy.instances


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def startup(params: dict[str, str]) -> bytes:
    body = struct.pack("!hh", 3, 0)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    async with asyncio.timeout(30):
        hdr = await reader.readexactly(5)
        (length,) = struct.unpack("!i", hdr[1:])
        return hdr[:1], await reader.readexactly(length - 4)


async def test_crashed_instance_errors_its_clients_and_drops_the_lease(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    m = manager(p)
    a = await asyncpg.connect(p.dsn("one"))
    busy = await asyncpg.connect(p.dsn("one"))
    b = await psycopg.AsyncConnection.connect(p.dsn("one"), autocommit=True)
    reader, writer = await asyncio.open_connection(p.host, p.port)
    try:
        writer.write(startup({"user": "postgres", "database": "one"}))
        for _ in range(100):
            if (await read_message(reader))[0] == b"Z":
                break
        await a.execute("insert into t values (1)")
        sleeping = asyncio.create_task(busy.fetchval("select pg_sleep(30)"))
        await asyncio.sleep(0.3)
        [inst] = m.instances.values()
        pgdata = inst.handle.pgdata
        os.kill(inst.handle.pid, signal.SIGKILL)
        await wait_until(lambda: inst.id not in m.instances, 15, "the crash to be noticed")
        assert all(lease.released for lease in inst.leases)
        # On the wire: an idle client is told why, with a SQLSTATE, then the socket closes.
        t, body = await read_message(reader)
        assert t == b"E", (t, body)
        fields = {chr(x[0]): x[1:].decode() for x in body.split(b"\0") if x}
        # 57P01 when the backend noticed the postmaster's death first, 57P02 from the proxy.
        assert fields["C"] in ("57P01", "57P02") and fields["S"] == "FATAL", fields
        # Then only more such errors (the proxy may add its own after the backend's), and EOF.
        async with asyncio.timeout(10):
            rest = await reader.read()
        while rest:
            assert rest[:1] == b"E" and b"C57P0" in rest, rest
            rest = rest[1 + int.from_bytes(rest[1:5], "big") :]
        # A client in the middle of a query gets the error as a server error.
        with pytest.raises(asyncpg.PostgresError) as e:
            async with asyncio.timeout(10):
                await sleeping
        # asyncpg reports it as ConnectionDoesNotExistError quoting the server's message.
        # Which of the three messages wins depends on which side notices the death first.
        assert re.search("stopped unexpectedly|instance was lost|postmaster exit", str(e.value))
        # Idle library clients see the connection closed on their next use. (asyncpg, when
        # its next query comes between the unsolicited error and the EOF, says it is still
        # consuming that error: InternalClientError.)
        with pytest.raises(
            (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
        ):
            async with asyncio.timeout(10):
                await a.fetchval("select 1")
        with pytest.raises(psycopg.OperationalError):
            async with asyncio.timeout(10):
                await b.execute("select 1")
        # No backend of the dead server lingers.
        await wait_until(
            lambda: not [pid for pid in processes_under(pgdata) if alive(pid)], 15, "backends"
        )
        # The clone is kept: the next connection starts a server on it, whose crash recovery
        # keeps what was committed before the crash.
        assert m.kept[InstanceKey.parse("one:default")].clone_id == inst.id
        c = await asyncpg.connect(p.dsn("one"))
        try:
            assert await c.fetchval("select count(*) from t") == 2
        finally:
            await c.close()
        [again] = m.instances.values()
        assert again.id == inst.id and again.handle.pid != inst.handle.pid
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        await a.close()
        busy.terminate()
        await b.close()


async def test_stopping_the_proxy_stops_every_instance(pg_dir: Path) -> None:
    port_cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": None},
        "store": str(pg_dir / "store"),
        "snapshot": {"backend": "copy"},
        "runtime": {"kind": "process", "run_dir": str(pg_dir / "run")},
        "databases": {"one": recipe(pg_dir)},
    }
    path = pg_dir / "taidon.yaml"
    path.write_text(yaml.safe_dump(port_cfg))
    proxy = await Proxy.open(parse_config(path.read_text(), source=path))
    closed = False
    try:
        await proxy.start()
        assert proxy.server is not None
        host, port = proxy.server.addresses[0].rsplit(":", 1)
        dsn = f"postgresql://postgres@{host}:{port}"
        conns = [
            await asyncpg.connect(f"{dsn}/one"),
            await asyncpg.connect(f"{dsn}/one:b"),
            await asyncpg.connect(
                f"{dsn}/one", server_settings={"options": "-c taidon.isolation=connection"}
            ),
        ]
        pgdatas = [i.handle.pgdata for i in manager(proxy).instances.values()]
        assert len(pgdatas) == 3
        assert all(processes_under(d) for d in pgdatas)
        await proxy.close()
        closed = True
        for d in pgdatas:
            assert not [pid for pid in processes_under(d) if alive(pid)], d
        assert not [pid for pid in processes_under(pg_dir / "run") if alive(pid)]
        for conn in conns:
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                async with asyncio.timeout(10):
                    await conn.fetchval("select 1")
            conn.terminate()
    finally:
        if not closed:
            await proxy.close()


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"sqlrs serve exited:\n{log.read_text(errors='replace')}"
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        assert time.monotonic() < deadline, "sqlrs serve did not listen"
        time.sleep(0.1)


async def test_restart_reaps_instances_a_killed_proxy_left(pg_dir: Path) -> None:
    port = free_port()
    run_dir = pg_dir / "run"
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": None},
        "store": str(pg_dir / "store"),
        "snapshot": {"backend": "copy"},
        "runtime": {"kind": "process", "run_dir": str(run_dir)},
        "databases": {"one": recipe(pg_dir)},
    }
    path = pg_dir / "taidon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = pg_dir / "serve.log"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*SQLRS, "--config", str(path), "serve"], stdout=out, stderr=out,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        procs.append(proc)
        wait_listening(proc, port, log)
        return proc

    dsn = f"postgresql://postgres@127.0.0.1:{port}/one"
    try:
        first = await asyncio.to_thread(start)
        conn = await asyncpg.connect(dsn, timeout=60)
        await conn.execute("insert into t values (7)")
        orphans = {pid for pid in processes_under(run_dir) if alive(pid)}
        assert orphans, "no instance process found"
        first.kill()
        first.wait(timeout=10)
        conn.terminate()
        # The instance outlives a kill -9 of its proxy...
        assert all(alive(pid) for pid in orphans)
        await asyncio.to_thread(start)
        # ...until the next proxy on the same config starts and reaps it; the shared clone
        # stays, and the next connection starts a server on it (crash recovery keeps the 7).
        await wait_until(lambda: not any(alive(pid) for pid in orphans), 15, "the reap")
        conn = await asyncpg.connect(dsn, timeout=60)
        try:
            assert await conn.fetchval("select array_agg(x order by x) from t") == [7, 42]
        finally:
            await conn.close()
    except BaseException:
        sys.stderr.write(f"--- sqlrs serve log ---\n{log.read_text(errors='replace')}\n")
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            "listen: 127.0.0.1:0\ninstances:\n  max: 5\n  idle_ttl: banana\n",
            [":4:", "instances.idle_ttl", "not a duration"],
        ),
        (
            "listen: 127.0.0.1:0\ndatabases:\n  shop:\n    prepare: {kind: psql}\n",
            [":4:", "databases.shop.prepare.files", "required, but not set"],
        ),
        ("listen: 127.0.0.1:0\nsnapshot: [\n", ["line 3", "invalid YAML"]),
        ("listen: 127.0.0.1:0\nbogus_key: 1\n", [":2:", "bogus_key", "unknown setting"]),
    ],
)
def test_sqlrs_serve_rejects_bad_config_naming_key_and_line(
    pg_dir: Path, text: str, needles: list[str]
) -> None:
    path = pg_dir / "bad.yaml"
    path.write_text(text)
    r = subprocess.run(
        [*SQLRS, "--config", str(path), "serve"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stderr.startswith(f"sqlrs: {path}"), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_sqlrs_serve_missing_config(pg_dir: Path) -> None:
    path = pg_dir / "absent.yaml"
    r = subprocess.run(
        [*SQLRS, "--config", str(path), "serve"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert f"cannot read config {path}" in r.stderr
    assert "Traceback" not in r.stderr
