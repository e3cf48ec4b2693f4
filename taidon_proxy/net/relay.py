"""The byte splice: two asyncio protocols that forward in callbacks, with backpressure both ways.

Sessions without TLS move to the C relay thread once spliced (`offload.py`); this one
carries TLS sessions, and all of them with `relay: python`.

During the startup phase each side hands its bytes to a consumer (the session's sans-IO
machines); once `splice` links them, data_received writes straight to the peer transport.
Both directions keep a cheap running count of message boundaries: instance→client so the
proxy can add its own ErrorResponse when an instance dies without corrupting a message,
client→instance to know when the client has sent Terminate (then the instance closing is the
normal end, and a kept server connection never sees it).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# The length field (it counts itself) of the message whose type byte is at `pos`. Twice as
# fast as slicing + int.from_bytes, which matters for COPY OUT: one short message per row.
_MSG_LEN = struct.Struct("!xI").unpack_from


class _Side(asyncio.Protocol):
    """One socket. Before splicing, bytes go to `consumer`; after, to `peer`."""

    __slots__ = (
        "_paused",
        "_pending",
        "_waiter",
        "bytes_in",
        "closed",
        "consumer",
        "on_close",
        "peer",
        "peer_side",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.peer_side: _Side | None = None
        self.consumer: Callable[[bytes], None] | None = None
        self.on_close: Callable[[Exception | None], None] | None = None
        self.closed = False
        self.bytes_in = 0
        self._pending = bytearray()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None:
            peer.write(data)
            return
        if self.consumer is not None:
            self.consumer(data)
        else:
            self._pending += data
            if len(self._pending) > HIGH_WATER and self.transport is not None:
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self.on_close is not None:
            self.on_close(exc)

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading from the side that feeds it.
        self._paused = True
        if self.peer_side is not None and self.peer_side.transport is not None:
            self.peer_side.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.peer_side is not None and self.peer_side.transport is not None:
            self.peer_side.transport.resume_reading()

    # --- used by the session during startup -------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_data(self) -> None:
        """Wait until more bytes arrive (or the connection closes)."""
        if self.closed:
            raise ConnectionResetError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.closed and self.consumer is not None:
            raise ConnectionResetError("connection closed")

    def take_pending(self) -> bytes:
        data = bytes(self._pending)
        self._pending.clear()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def detach(self) -> None:
        """Stop forwarding this side's bytes: the proxy has said the last word to the peer."""
        self.peer = None
        self.consumer = _drop
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()


def _drop(_data: bytes) -> None:
    pass


_TERMINATE = ord("X")
_READY = ord("Z")


class _FramedSide(_Side):
    """A side whose forwarded stream is followed message by message (cheaply: lengths only)."""

    __slots__ = ("_hdr", "_need", "counted", "last_type", "ready_status")
    # Message types counted as they pass (the client's sync points, the server's answers).
    COUNTED: frozenset[int] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self._need = 0  # body bytes of the current message still to come
        self._hdr = b""  # a message header split across reads
        self.last_type = 0  # type byte of the last message whose header was whole
        self.ready_status = b""  # of the last ReadyForQuery, once its body arrived
        self.counted = 0  # messages of the COUNTED types passed on

    def _track(self, data: bytes, n: int) -> int:
        """Follow the framing over `data`; return where in it the last whole header starts
        (-1 if none does)."""
        pos = self._need  # where the next message starts in `data`
        if pos and self.last_type == _READY and pos == 1:
            self.ready_status = data[:1]
        start = -1
        hdr = self._hdr
        if hdr:
            take = 5 - len(hdr)
            hdr += data[:take]
            if len(hdr) < 5:
                self._hdr, self._need = hdr, 0
                return -1
            self.last_type = hdr[0]
            if hdr[0] in self.COUNTED:
                self.counted += 1
            if hdr[0] == _READY and take < n:
                self.ready_status = data[take : take + 1]
            pos = take + _MSG_LEN(hdr, 0)[0] - 4
            self._hdr = b""
        last = n - 5
        msg_len, counted, c = _MSG_LEN, self.COUNTED, 0
        while pos <= last:  # a length below 4 is the peer's bug; we still move on
            start = pos
            if data[pos] in counted:
                c += 1
            pos += msg_len(data, pos)[0] + 1
        self.counted += c
        if start >= 0:
            self.last_type = data[start]
            if data[start] == _READY and start + 5 < n:
                self.ready_status = data[start + 5 : start + 6]
        if pos >= n:
            self._need = pos - n
        else:
            self._need, self._hdr = 0, bytes(data[pos:])
        return start

    def note_ready(self, status: bytes) -> None:
        """The session passed on a ReadyForQuery itself (the end of a startup)."""
        self.last_type, self.ready_status = _READY, status

    def note_forwarded(self, data: bytes) -> None:
        """Bytes of this side's stream that the session passed on itself."""
        if data:
            self._track(data, len(data))

    @property
    def at_boundary(self) -> bool:
        return self._need == 0 and not self._hdr


class ClientSide(_FramedSide):
    """The client's socket; notices its Terminate, and can withhold it from the instance."""

    __slots__ = ("hold_terminate", "on_terminate", "peer_answers")
    COUNTED = frozenset(b"QSF")  # Query, Sync, FunctionCall: each is answered by one Z

    def __init__(self) -> None:
        super().__init__()
        self.hold_terminate = False
        self.on_terminate: Callable[[], None] | None = None
        self.peer_answers: Callable[[], int] | None = None  # ReadyForQuery messages so far

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            super().data_received(data)
            return
        self.bytes_in += len(data)
        n = len(data)
        start = self._track(data, n)
        if start >= 0 and data[start] == _TERMINATE and self.hold_terminate and self._answered():
            # The client is done: the server connection stays ours, Terminate never reaches it.
            # (Not while a query is unanswered: then the server ends as the client asked.)
            self.peer = None
            self.consumer = _drop
            peer.write(data[:start])
            if self.on_terminate is not None:
                self.on_terminate()
            return
        peer.write(data)

    def _answered(self) -> bool:
        return self.peer_answers is not None and self.peer_answers() == self.counted

    @property
    def terminated(self) -> bool:
        return self.last_type == _TERMINATE and self.at_boundary


class InstanceSide(_FramedSide):
    """The instance's socket; tracks message boundaries of what it forwards to the client."""

    __slots__ = ("on_idle",)
    COUNTED = frozenset(b"Z")

    def __init__(self) -> None:
        super().__init__()
        # Called when what was passed on ends with a ReadyForQuery (the server waits).
        self.on_idle: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            super().data_received(data)
            return
        self.bytes_in += len(data)
        peer.write(data)
        n = len(data)
        need = self._need
        if need > n or (need == n and not self._hdr and self.last_type != _READY):
            self._need = need - n
            return
        self._track(data, n)
        if self.on_idle is not None and self.last_type == _READY and self.at_boundary:
            self.on_idle()


def splice(client: ClientSide, instance: InstanceSide) -> None:
    """Link the two sides: from now on every byte goes straight across."""
    assert client.transport is not None and instance.transport is not None
    client.consumer = instance.consumer = None
    client.peer, client.peer_side = instance.transport, instance
    instance.peer, instance.peer_side = client.transport, client
    # Honour a write buffer that filled up before the link.
    if client._paused:
        instance.transport.pause_reading()
    if instance._paused:
        client.transport.pause_reading()
