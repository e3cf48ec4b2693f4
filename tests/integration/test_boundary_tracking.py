"""Both boundary trackers (pgwire.boundaries for the Python relay, the C relay's own) give
MessageFramer's answer under any chunking: at a boundary or not, how many ReadyForQuery
went by, and the status of the last one."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taidon_proxy.net import offload
from taidon_proxy.pgwire.boundaries import BoundaryTracker
from taidon_proxy.pgwire.messages import MessageFramer

IO_TIMEOUT = 10.0

bodies = st.binary(max_size=40) | st.binary(min_size=300, max_size=2000)
server_messages = st.lists(
    st.tuples(st.sampled_from(b"DdCTEN"), bodies)
    | st.tuples(st.just(ord("Z")), st.sampled_from([b"I", b"T", b"E"])),
    min_size=1, max_size=25,
)  # fmt: skip


def encode(msgs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([k]) + struct.pack("!I", len(b) + 4) + b for k, b in msgs)


def reference(data: bytes) -> tuple[bool, int, bytes]:
    """MessageFramer's view of a prefix: at a boundary, ReadyForQuery count, last status
    (if the prefix ends right after a ReadyForQuery)."""
    framer = MessageFramer(1 << 20)
    framer.receive_data(data)
    readies, last = 0, None
    while (m := framer.next_message()) is not None:
        last = m
        readies += m[0] == b"Z"
    at = framer.buffered == 0
    status = last[1] if at and last is not None and last[0] == b"Z" else b""
    return at, readies, status


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@pytest.mark.property
@settings(deadline=None, max_examples=400)
@given(msgs=server_messages, cuts=st.lists(st.integers(min_value=0, max_value=100_000)))
def test_the_python_tracker_agrees_with_the_framer(
    msgs: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = encode(msgs)
    tracker = BoundaryTracker(frozenset(b"Z"))
    seen = b""
    for chunk in chunks(stream, cuts):
        tracker.feed(chunk)
        seen += chunk
        at, readies, status = reference(seen)
        assert tracker.at_boundary == at
        assert tracker.counted == readies
        assert (tracker.ready_status if tracker.idle else b"") == status


@pytest.mark.integration
@settings(
    deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    msgs=server_messages,
    cut=st.integers(min_value=0, max_value=100_000),
    chunk=st.integers(min_value=1, max_value=700),
)
async def test_the_c_relay_agrees_with_the_framer(
    msgs: list[tuple[int, bytes]], cut: int, chunk: int
) -> None:
    assert offload.available(), "the C relay is not built: run scripts/setup"
    stream = encode(msgs)
    sent = stream[: cut % (len(stream) + 1)]
    relay = offload.NativeRelay()
    client, c_in = socket.socketpair()
    instance, i_in = socket.socketpair()
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[offload.Ended] = loop.create_future()
    try:
        for s in (client, instance):
            s.setblocking(False)
        relay.add(c_in.fileno(), i_in.fileno(), ended.set_result)
        got = bytearray()

        async def send() -> None:
            for i in range(0, len(sent), chunk):
                await loop.sock_sendall(instance, sent[i : i + chunk])
                await asyncio.sleep(0)

        async with asyncio.timeout(IO_TIMEOUT):
            # Read while sending, as a client does: many one-byte writes fill a unix socket's
            # buffer (each is accounted at its full overhead), and a reader that waits for the
            # writer to finish would wait for ever.
            sender = asyncio.ensure_future(send())
            while len(got) < len(sent):
                got += await loop.sock_recv(client, 1 << 16)
            await sender
            instance.close()  # the instance's stream ends at the cut
            result: Any = await ended
        assert bytes(got) == sent
        at, _, status = reference(sent)
        assert result.reason == "instance"
        assert result.at_boundary == at
        assert result.ready_status == status
    finally:
        relay.close()
        for s in (client, instance, c_in, i_in):
            s.close()
