"""The relay's message-boundary count: exact under any chunking, and what it buys when an
instance dies (an ErrorResponse only between messages, never inside one)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taidon_proxy.net import offload
from taidon_proxy.net.relay import HIGH_WATER, ClientSide, InstanceSide
from taidon_proxy.pgwire import messages
from tests.conftest import ProxyFactory, RunningProxy

IO_TIMEOUT = 30.0

# --- the tracker alone -----------------------------------------------------------------------


class _Sink:
    """Stands in for the client transport: the tracker only needs write()."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


bodies = st.binary(max_size=40) | st.binary(min_size=300, max_size=2000)
streams = st.lists(st.tuples(st.sampled_from(b"DdCZTE"), bodies), min_size=1, max_size=30)


@pytest.mark.property
@settings(deadline=None, max_examples=300)
@given(msgs=streams, cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=20))
def test_boundaries_are_exact_under_any_chunking(
    msgs: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(bytes([k]) + struct.pack("!I", len(b) + 4) + b for k, b in msgs)
    ends, pos = set(), 0
    for _, body in msgs:
        pos += 5 + len(body)
        ends.add(pos)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    side, sink = InstanceSide(), _Sink()
    side.peer = sink  # type: ignore[assignment]  # the tracker only calls write()
    start = 0
    for end in points:
        if end == start:
            continue
        side.data_received(stream[start:end])
        assert side.at_boundary == (end in ends), (start, end)
        start = end
    assert bytes(sink.data) == stream
    assert side.bytes_in == len(stream)


ready = st.tuples(st.just(ord("Z")), st.sampled_from([b"I", b"T", b"E"]))
server_streams = st.lists(st.tuples(st.sampled_from(b"DdCTE"), bodies) | ready, max_size=30)


@pytest.mark.property
@settings(deadline=None, max_examples=300)
@given(msgs=server_streams, cuts=st.lists(st.integers(min_value=0, max_value=100_000)))
def test_ready_status_is_known_exactly_after_a_ready_for_query(
    msgs: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(bytes([k]) + struct.pack("!I", len(b) + 4) + b for k, b in msgs)
    after, pos = {}, 0  # stream offset -> the status if a ReadyForQuery ends there
    for kind, body in msgs:
        pos += 5 + len(body)
        after[pos] = body if kind == ord("Z") else None
    side, sink = InstanceSide(), _Sink()
    side.peer = sink  # type: ignore[assignment]
    start = 0
    for end in sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)}):
        if end == start:
            continue
        side.data_received(stream[start:end])
        if after.get(end) is not None:
            assert side.frames.idle
            assert side.frames.ready_status == after[end]
        start = end


client_streams = st.lists(st.tuples(st.sampled_from(b"QPBEDSHd"), bodies), max_size=10)


@pytest.mark.property
@settings(deadline=None, max_examples=300)
@given(msgs=client_streams, cuts=st.lists(st.integers(min_value=0, max_value=100_000)))
def test_a_held_terminate_never_reaches_the_instance(
    msgs: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    body = b"".join(bytes([k]) + struct.pack("!I", len(b) + 4) + b for k, b in msgs)
    stream = body + b"X\x00\x00\x00\x04"
    side, sink = ClientSide(), _Sink()
    side.peer = sink  # type: ignore[assignment]
    side.hold_terminate = True
    answered = len([k for k, _ in msgs if k in b"QS"])
    side.peer_answers = lambda: answered  # the server has answered every query
    ended = []
    side.on_terminate = lambda: ended.append(True)
    start = 0
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    for end in points:
        if end > start:
            side.data_received(stream[start:end])
            start = end
    # Held whenever its header arrived whole in one read; else passed on (the server exits).
    whole = not any(len(body) < c < len(stream) for c in points)
    assert side.frames.counted == answered
    if whole:
        assert bytes(sink.data) == body and ended == [True]
    else:
        assert bytes(sink.data) == stream and ended == [] and side.terminated


# --- a dying instance, seen by a raw client ------------------------------------------------------


class RawClient:
    """A byte-level frontend, so the test sees exactly what the proxy sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, p: RunningProxy, database: str) -> RawClient:
        reader, writer = await asyncio.open_connection(p.host, p.port, limit=1 << 20)
        c = cls(reader, writer)
        writer.write(messages.startup_message({"user": "postgres", "database": database}))
        while (await c.message())[0] != b"Z":
            pass
        return c

    async def message(self) -> tuple[bytes, bytes]:
        async with asyncio.timeout(IO_TIMEOUT):
            head = await self.reader.readexactly(5)
            body = await self.reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
        return head[:1], body

    async def rest(self) -> bytes:
        async with asyncio.timeout(IO_TIMEOUT):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def frame(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Whole messages in `data`, and the truncated tail (if any)."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        n = struct.unpack_from("!I", data, pos + 1)[0]
        if pos + 1 + n > len(data):
            break
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + n]))
        pos += 1 + n
    return out, data[pos:]


def recipe(sql_dir: Any) -> dict[str, Any]:
    f = sql_dir / "t.sql"
    f.write_text(
        "create table t as select g as id, md5(g::text) as v from generate_series(1, 200000) g;\n"
    )
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


# Both relays: the Python protocol callbacks and the C thread (which scripts/setup builds;
# a missing build fails these tests rather than skipping them).
RELAYS = ["python", "native"]


async def relay_proxy(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str, **settings: Any
) -> RunningProxy:
    if relay == "native":
        assert offload.available(), "the C relay is not built: run scripts/setup"
    p = await make_proxy({"t": recipe(pg_dir)}, relay=relay, **settings)
    return p


def kill_instance(p: RunningProxy) -> None:
    assert p.proxy.instances is not None
    (inst,) = p.proxy.instances.instances.values()
    os.kill(inst.handle.pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.parametrize("relay", RELAYS)
async def test_idle_client_gets_an_error_when_its_instance_dies(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    p = await relay_proxy(make_proxy, pg_dir, relay)
    c = await RawClient.connect(p, "t")
    try:
        c.writer.write(messages.query("select 1"))
        while (await c.message())[0] != b"Z":
            pass
        kill_instance(p)
        msgs, tail = frame(await c.rest())
        assert tail == b""
        # One error, the last word: ours (57P02), or the backend's own when it noticed first
        # ("terminating connection due to unexpected postmaster exit", 57P01): never both.
        assert [k for k, _ in msgs] == [b"E"], msgs
        assert messages.parse_error_fields(msgs[-1][1])["C"] in ("57P02", "57P01"), msgs
    finally:
        c.close()


async def copy_until_paused(p: Any, c: Any, query: str = "copy t to stdout") -> Any:
    """Start a COPY the client does not read, until the proxy stops passing bytes to it."""
    c.writer.write(messages.query(query))
    assert p.proxy.server is not None
    (session,) = p.proxy.server.sessions
    async with asyncio.timeout(IO_TIMEOUT):
        if session.pair is None:  # the Python relay: its buffer to the client fills up
            while session.client.transport is None or (
                session.client.transport.get_write_buffer_size() < HIGH_WATER
            ):
                await asyncio.sleep(0.01)
        else:  # the C relay: the count stops moving once the client's socket is full
            last = -1
            while session.bytes_to_client != last or last < HIGH_WATER:
                last = session.bytes_to_client
                await asyncio.sleep(0.2)
    return session


@pytest.mark.integration
@pytest.mark.parametrize("relay", RELAYS)
async def test_no_error_is_spliced_into_a_message_cut_by_a_dying_instance(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    p = await relay_proxy(make_proxy, pg_dir, relay)
    c = await RawClient.connect(p, "t")
    try:
        # The client does not read: the proxy's buffer to it fills and the relay pauses with
        # a message cut in two (rows are 40-odd bytes, reads are not message-aligned).
        # 44 MB of rows: more than the socket buffers and the client's reader can hold, so
        # the COPY is still running when the instance dies.
        session = await copy_until_paused(
            p, c, "copy (select t.* from t, generate_series(1, 5)) to stdout"
        )
        assert session.instance is not None
        # The C relay keeps its count to itself until the pair ends: then either outcome
        # below is allowed, but never an error after a cut message.
        cut = None if session.pair is not None else not session.instance.at_boundary
        kill_instance(p)
        data = await c.rest()
        msgs, tail = frame(data)
        kinds = {k for k, _ in msgs}
        assert kinds <= {b"H", b"d", b"E", b"C", b"Z"}, kinds
        for kind, body in msgs:
            if kind == b"d":  # every row arrived whole: "id\tmd5\n"
                ident, v = body.rstrip(b"\n").split(b"\t")
                assert ident.isdigit() and len(v) == 32
        errors = [messages.parse_error_fields(b)["C"] for k, b in msgs if k == b"E"]
        if cut is None:
            cut = tail != b""
        if cut:  # the stream stops inside the message; nothing may follow it
            assert tail != b"" and errors == []
        else:
            assert tail == b"" and errors == ["57P02"]
    finally:
        with contextlib.suppress(Exception):
            c.close()


@pytest.mark.integration
@pytest.mark.parametrize("relay", RELAYS)
async def test_a_slow_client_pauses_the_instance_and_still_gets_every_row(
    make_proxy: ProxyFactory, pg_dir: Any, relay: str
) -> None:
    p = await relay_proxy(make_proxy, pg_dir, relay)
    c = await RawClient.connect(p, "t")
    try:
        session = await copy_until_paused(p, c)
        # Paused: while the client reads nothing, the proxy buffers no more than one more read.
        assert session.instance is not None and session.instance.transport is not None
        # A read already under way when the pause began may still land: let it settle first.
        await asyncio.sleep(0.2)
        held = session.client.transport.get_write_buffer_size()
        passed = session.bytes_to_client
        await asyncio.sleep(0.3)
        assert session.client.transport.get_write_buffer_size() == held
        assert session.bytes_to_client == passed
        assert held <= HIGH_WATER + 256 * 1024
        rows = 0
        while True:
            kind, body = await c.message()
            if kind == b"d":
                ident, v = body.rstrip(b"\n").split(b"\t")
                assert int(ident) == rows + 1 and len(v) == 32
                rows += 1
            elif kind == b"Z":
                break
        assert rows == 200_000
        assert session.bytes_to_client > 200_000 * 40
        if relay == "python":
            assert session.instance.at_boundary
    finally:
        c.close()


@pytest.mark.property
@settings(deadline=None, max_examples=100)
@given(msgs=client_streams.filter(lambda m: any(k in b"QS" for k, _ in m)))
def test_a_terminate_after_an_unanswered_query_is_passed_on(msgs: list[tuple[int, bytes]]) -> None:
    stream = b"".join(bytes([k]) + struct.pack("!I", len(b) + 4) + b for k, b in msgs)
    stream += b"X\x00\x00\x00\x04"
    side, sink = ClientSide(), _Sink()
    side.peer = sink  # type: ignore[assignment]
    side.hold_terminate = True
    side.peer_answers = lambda: 0  # nothing answered yet: the server must see the Terminate
    side.data_received(stream)
    assert bytes(sink.data) == stream and side.terminated
