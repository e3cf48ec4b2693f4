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
from collections.abc import Callable
from typing import cast

from taidon_proxy.pgwire.boundaries import ERROR_RESPONSE, TERMINATE, BoundaryTracker

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class _Side(asyncio.Protocol):
    """One socket. Before splicing, bytes go to `consumer`; after, to `peer`."""

    __slots__ = (
        "_paused",
        "_pending",
        "_waiter",
        "bytes_in",
        "bytes_written",
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
        self.bytes_written = 0  # through write(): the proxy's own bytes, not the splice's
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
            self.bytes_written += len(data)
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


class _FramedSide(_Side):
    """A side whose forwarded stream is followed message by message (pgwire.boundaries)."""

    __slots__ = ("frames",)
    # Message types counted as they pass (the client's sync points, the server's answers).
    COUNTED: frozenset[int] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.frames = BoundaryTracker(self.COUNTED)

    def note_forwarded(self, data: bytes) -> None:
        """Bytes of this side's stream that the session passed on itself."""
        if data:
            self.frames.feed(data)

    @property
    def at_boundary(self) -> bool:
        return self.frames.at_boundary


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
        start = self.frames.feed(data)
        if start >= 0 and data[start] == TERMINATE and self.hold_terminate and self._answered():
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
        return self.peer_answers is not None and self.peer_answers() == self.frames.counted

    @property
    def terminated(self) -> bool:
        return self.frames.last_type == TERMINATE and self.frames.at_boundary


class InstanceSide(_FramedSide):
    """The instance's socket; tracks message boundaries of what it forwards to the client."""

    __slots__ = ("on_idle",)
    COUNTED = frozenset(b"Z")

    def __init__(self) -> None:
        super().__init__()
        # Called when what was passed on ends with a ReadyForQuery (the server waits).
        self.on_idle: Callable[[], None] | None = None

    @property
    def said_error(self) -> bool:
        """The stream ended with a whole ErrorResponse: the server's last word (a FATAL)."""
        return self.frames.at_boundary and self.frames.last_type == ERROR_RESPONSE

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            super().data_received(data)
            return
        self.bytes_in += len(data)
        peer.write(data)
        frames = self.frames
        frames.feed(data)
        if self.on_idle is not None and frames.idle:
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
