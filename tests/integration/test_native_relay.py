"""The C relay thread on real socket pairs: bytes both ways, counts, the boundary it reports
under any chunking, backpressure, and stop (no Postgres: the peers are plain sockets)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taidon_proxy.net import offload

IO_TIMEOUT = 10.0


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


@dataclass
class Pair:
    """client <-> [relay] <-> instance, each end a socketpair."""

    relay: offload.NativeRelay
    client: socket.socket  # what the test's "client" holds
    instance: socket.socket  # what the test's "instance" holds
    inner: tuple[socket.socket, socket.socket]  # the ends the relay moves bytes between
    ended: asyncio.Future[offload.Ended]
    id: int


@pytest.fixture
async def relay() -> AsyncIterator[offload.NativeRelay]:
    assert offload.available(), "the C relay is not built: run scripts/setup"
    r = offload.NativeRelay()
    try:
        yield r
    finally:
        r.close()


async def open_pair(relay: offload.NativeRelay) -> Pair:
    client, c_in = socket.socketpair()
    instance, i_in = socket.socketpair()
    for s in (client, instance):
        s.setblocking(False)
    ended: asyncio.Future[offload.Ended] = asyncio.get_running_loop().create_future()
    pid = relay.add(c_in.fileno(), i_in.fileno(), ended.set_result)
    return Pair(relay, client, instance, (c_in, i_in), ended, pid)


def close_all(p: Pair) -> None:
    for s in (p.client, p.instance, *p.inner):
        s.close()


async def recv_exactly(s: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(IO_TIMEOUT):
        while len(out) < n:
            chunk = await loop.sock_recv(s, n - len(out))
            assert chunk, "peer closed early"
            out += chunk
    return bytes(out)


@pytest.mark.integration
async def test_bytes_cross_both_ways_and_are_counted(relay: offload.NativeRelay) -> None:
    p = await open_pair(relay)
    loop = asyncio.get_running_loop()
    try:
        query = message(b"Q", b"select 1\0")
        await loop.sock_sendall(p.client, query)
        assert await recv_exactly(p.instance, len(query)) == query
        reply = message(b"T", b"x" * 30) + message(b"D", b"y" * 10) + message(b"Z", b"I")
        await loop.sock_sendall(p.instance, reply)
        assert await recv_exactly(p.client, len(reply)) == reply
        assert relay.counts(p.id) == (len(query), len(reply))
        p.client.close()  # the client leaves: the pair ends, the instance end is untouched
        async with asyncio.timeout(IO_TIMEOUT):
            ended = await p.ended
        assert ended.reason == "client"
        assert (ended.bytes_up, ended.bytes_down) == (len(query), len(reply))
        assert p.inner[1].fileno() >= 0  # the relay never closes a descriptor
    finally:
        close_all(p)


@pytest.mark.integration
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    at=st.integers(min_value=0, max_value=11),
    # Cuts inside a header (1-4 bytes past a start) are the easy ones to get wrong.
    into=st.integers(min_value=0, max_value=6) | st.integers(min_value=0, max_value=320),
    chunk=st.integers(min_value=1, max_value=700),
)
async def test_the_reported_boundary_is_exact_under_any_chunking(
    relay: offload.NativeRelay, bodies: list[bytes], at: int, into: int, chunk: int
) -> None:
    stream = b"".join(message(b"D", b) for b in bodies)
    starts, pos = [0], 0
    for b in bodies:
        pos += 5 + len(b)
        starts.append(pos)
    cut = min(starts[min(at, len(bodies) - 1)] + into, len(stream))
    sent = stream[:cut]
    p = await open_pair(relay)
    loop = asyncio.get_running_loop()
    try:
        for i in range(0, len(sent), chunk):
            await loop.sock_sendall(p.instance, sent[i : i + chunk])
            await asyncio.sleep(0)
        got = await recv_exactly(p.client, len(sent)) if sent else b""
        assert got == sent
        p.instance.close()  # the instance dies here
        async with asyncio.timeout(IO_TIMEOUT):
            ended = await p.ended
        assert ended.reason == "instance"
        assert ended.at_boundary == (cut in starts)
    finally:
        close_all(p)


@pytest.mark.integration
async def test_a_full_client_stops_the_instance_side_and_stop_returns_unsent_bytes(
    relay: offload.NativeRelay,
) -> None:
    p = await open_pair(relay)
    try:
        row = message(b"d", b"z" * 100)
        # The client reads nothing: the relay must stop reading the instance, so the
        # instance's own sends start to fail with EAGAIN after a bounded amount.
        written = 0
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                try:
                    written += p.instance.send(row * 100)
                except BlockingIOError:
                    await asyncio.sleep(0.2)
                    try:
                        written += p.instance.send(row * 100)
                    except BlockingIOError:
                        break
        moved = relay.counts(p.id)[1]
        await asyncio.sleep(0.3)
        assert relay.counts(p.id)[1] == moved  # paused, not spinning
        assert moved < written
        relay.stop(p.id)
        async with asyncio.timeout(IO_TIMEOUT):
            ended = await p.ended
        assert ended.reason == "stopped"
        # Whatever the relay read but could not hand over comes back with the report.
        assert ended.bytes_down == moved
        received = bytearray()
        while True:
            try:
                data = p.client.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            received += data
        assert bytes(received) + ended.unsent_to_client == (row * (moved // len(row) + 1))[:moved]
    finally:
        close_all(p)
