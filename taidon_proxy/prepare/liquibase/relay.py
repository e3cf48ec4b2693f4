"""A loopback TCP relay in front of the build server that pauses Liquibase at changeset commits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from taidon_proxy.prepare.liquibase.wire import BoundaryTracker

log = structlog.get_logger("taidon.prepare.liquibase")

READ_SIZE = 65536
CONNECT_TIMEOUT = 10.0

OnBoundary = Callable[[], Awaitable[None]]


class BoundaryRelay:
    """JDBC can't reach a unix socket, so Liquibase connects here; each byte goes to the server.

    At every changeset boundary the server's ReadyForQuery is held back until `on_boundary`
    returns: Liquibase cannot start the next changeset while the state is being taken.
    """

    def __init__(self, socket_path: Path, on_boundary: OnBoundary) -> None:
        self.socket_path = socket_path
        self.on_boundary = on_boundary
        self.port = 0
        self.error: BaseException | None = None  # the first failure of on_boundary
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except* (ConnectionError, OSError) as eg:
            log.debug("lb.relay.closed", error=str(eg.exceptions[0]))
        except* Exception as eg:
            # Recorded for the build to report; the accept loop itself carries on.
            log.warning("lb.relay.error", error=str(eg.exceptions[0]))
            if self.error is None:
                self.error = eg.exceptions[0]
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            up_r, up_w = await asyncio.open_unix_connection(str(self.socket_path))
        tracker = BoundaryTracker()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._client_to_server(tracker, reader, writer, up_w))
                tg.create_task(self._server_to_client(tracker, up_r, writer))
        finally:
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()

    async def _client_to_server(
        self,
        tracker: BoundaryTracker,
        reader: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        up_w: asyncio.StreamWriter,
    ) -> None:
        while data := await reader.read(READ_SIZE):
            chunk = tracker.feed_client(data)
            if chunk.reply:
                client_w.write(chunk.reply)
                await client_w.drain()
            if chunk.forward:
                up_w.write(chunk.forward)
                await up_w.drain()
        if up_w.can_write_eof():
            up_w.write_eof()

    async def _server_to_client(
        self, tracker: BoundaryTracker, up_r: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await up_r.read(READ_SIZE):
            if tracker.feed_server(data):
                try:
                    await self.on_boundary()
                except Exception as e:
                    # Liquibase must not go on past a boundary that failed: cut its connection.
                    if self.error is None:
                        self.error = e
                    raise
            writer.write(data)
            await writer.drain()
        writer.close()
