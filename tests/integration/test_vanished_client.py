"""A client that vanishes without a FIN: TCP keepalive drops it and lets its instance go."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from taidon_proxy.pgwire.messages import startup_message
from tests.conftest import ProxyFactory

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables"),
]


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


async def until_ready(reader: asyncio.StreamReader) -> None:
    while True:
        head = await reader.readexactly(5)
        (length,) = struct.unpack("!i", head[1:])
        await reader.readexactly(length - 4)
        assert head[:1] != b"E"
        if head[:1] == b"Z":
            return


@contextmanager
def black_hole(client_port: int) -> Iterator[None]:
    """Drop every packet to and from one loopback client port (its host went away)."""
    rules = [["INPUT", "--sport"], ["INPUT", "--dport"]]
    for chain, flag in rules:
        subprocess.run(
            ["iptables", "-I", chain, "-p", "tcp", flag, str(client_port), "-j", "DROP"],
            check=True,
        )
    try:
        yield
    finally:
        for chain, flag in rules:
            subprocess.run(
                ["iptables", "-D", chain, "-p", "tcp", flag, str(client_port), "-j", "DROP"],
                check=False,
            )


async def test_a_client_gone_without_a_fin_is_dropped_by_keepalive(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy(
        {"one": recipe(pg_dir)}, store=store,
        tcp_keepalive={"idle": "1s", "interval": "1s", "count": 2},
    )  # fmt: skip
    assert p.proxy.server is not None and p.proxy.instances is not None
    reader, writer = await asyncio.open_connection(p.host, p.port)
    client_port = writer.get_extra_info("sockname")[1]
    try:
        writer.write(startup_message({"user": "postgres", "database": "one"}))
        await asyncio.wait_for(until_ready(reader), 60)
        [inst] = p.proxy.instances.instances.values()
        assert len(inst.leases) == 1
        with black_hole(client_port):
            deadline = time.monotonic() + 30
            while p.proxy.server.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            waited = 30 - (deadline - time.monotonic())
            assert not p.proxy.server.sessions, "the vanished client's session is still open"
            assert not inst.leases
            assert waited < 20, waited
    finally:
        writer.close()


def client_keepalive(p: Any, port: int) -> tuple[int, ...]:
    """The keepalive options of the proxy's socket for the client on local port `port`."""
    import socket

    for s in p.proxy.server.sessions:
        sock = s.client.transport.get_extra_info("socket")
        if sock.getpeername()[1] == port:
            on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            if not on:
                return (0,)
            return (
                on,
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            )
    raise AssertionError(f"no session for client port {port}")


async def test_keepalive_settings_reach_each_client_and_follow_a_reload(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    import yaml

    p = await make_proxy(
        {"one": recipe(pg_dir)}, tcp_keepalive={"idle": "7s", "interval": "3s", "count": 4}
    )
    opened = []

    async def connect() -> int:
        reader, writer = await asyncio.open_connection(p.host, p.port)
        writer.write(startup_message({"user": "postgres", "database": "one"}))
        await until_ready(reader)
        opened.append(writer)
        return int(writer.get_extra_info("sockname")[1])

    try:
        first, second = await connect(), await connect()
        assert client_keepalive(p, first) == (1, 7, 3, 4)
        assert client_keepalive(p, second) == (1, 7, 3, 4)
        for ka, expect in [({"idle": "20s", "interval": "5s", "count": 2}, (1, 20, 5, 2)),
                           ({"idle": 0}, (0,))]:  # fmt: skip
            cfg = yaml.safe_load(p.config_path.read_text())
            cfg["tcp_keepalive"] = ka
            p.config_path.write_text(yaml.safe_dump(cfg))
            await p.proxy.reload()
            assert client_keepalive(p, await connect()) == expect
            assert client_keepalive(p, await connect()) == expect
        assert client_keepalive(p, first) == (1, 7, 3, 4)  # set when it came, as before
    finally:
        for w in opened:
            w.close()
