"""Server connections kept after their client left a shared instance, for the next client.

Postgres spends milliseconds starting a backend; applications that connect per request pay
that every time (PgBouncer hides it by keeping server connections: so do we). A connection
is kept only when its client ended cleanly (Terminate, withheld from the server) with the
server idle; it is reset with DISCARD ALL before it is parked, and handed out only to a
client with exactly the same startup parameters (user, database, options, application_name,
...), on the same running server of the same instance.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from taidon_proxy.instances.manager import Instance
from taidon_proxy.net.relay import InstanceSide
from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.reset import SessionReset

log = structlog.get_logger("taidon.serverpool")

RESET_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 60.0  # an idle kept connection is closed after this (its backend exits)
# A connection kept longer than this gets a round trip before it is handed out (PgBouncer's
# server_check_delay): a server stopped or wedged meanwhile is found before a client waits.
CHECK_AFTER_S = 10.0

_Key = tuple[str, int, frozenset[tuple[str, str]]]


@dataclass(eq=False)
class ServerConnection:
    """A connection to an instance's server, past its startup."""

    side: InstanceSide
    instance: Instance
    server_pid: int  # of the instance's postmaster when connected: a restart makes it stale
    backend_key: tuple[int, bytes]  # the backend's own (pid, secret), for cancels
    params: frozenset[tuple[str, str]]  # the startup parameters it was opened with
    parameter_status: dict[str, bytes] = field(default_factory=dict)  # name -> raw message
    kept_at: float = 0.0  # loop time it was parked
    _timer: asyncio.TimerHandle | None = None

    @property
    def key(self) -> _Key:
        return (self.instance.id, self.server_pid, self.params)

    def usable_for(self, instance: Instance) -> bool:
        return (
            not self.side.closed and instance is self.instance and not instance.stopping
            and instance.handle.pid == self.server_pid
        )  # fmt: skip

    def close(self) -> None:
        t = self.side.transport
        if t is not None and not t.is_closing():
            t.close()


def startup_key(params: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset(params.items())


class ServerPool:
    """Idle server connections by (instance, server, startup parameters)."""

    def __init__(self, max_idle: Callable[[], int], idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        self._max_idle = max_idle  # read at each use: a config reload changes it
        self.idle_timeout = idle_timeout
        self._idle: dict[_Key, list[ServerConnection]] = {}
        self._resets: set[asyncio.Task[None]] = set()
        self.reused = 0  # handed out again (for metrics and tests)

    @property
    def max_idle(self) -> int:
        return self._max_idle()

    @property
    def enabled(self) -> bool:
        return self.max_idle > 0

    def idle_count(self, instance: Instance | None = None) -> int:
        return sum(
            len(conns) for key, conns in self._idle.items()
            if instance is None or key[0] == instance.id
        )  # fmt: skip

    def take(self, instance: Instance, params: Mapping[str, str]) -> ServerConnection | None:
        conns = self._idle.get((instance.id, instance.handle.pid, startup_key(params)))
        while conns:
            conn = conns.pop()
            self._unpark(conn)
            if conn.usable_for(instance):
                self.reused += 1
                return conn
            conn.close()
        return None

    def park(self, conn: ServerConnection) -> None:
        """Reset the connection in the background; keep it if that works and there is room."""
        task = asyncio.create_task(self._reset_and_keep(conn), name="server-reset")
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    def stale(self, conn: ServerConnection) -> bool:
        return asyncio.get_running_loop().time() - conn.kept_at > CHECK_AFTER_S

    async def check(self, conn: ServerConnection) -> None:
        """One round trip (the reset again) on a connection taken from the pool; the caller
        bounds it in time. Closed on any failure (gone, broken, cancelled by that bound)."""
        try:
            await self._reset(conn)
        except BaseException:
            conn.close()
            raise

    async def _reset(self, conn: ServerConnection) -> None:
        side = conn.side
        machine = SessionReset()
        side.peer = side.peer_side = None
        side.on_close = None
        side.consumer = machine.receive_data
        if side.transport is not None:
            side.transport.resume_reading()
        side.write(machine.initial_bytes())
        while (done := machine.result()) is None:
            await side.wait_data()
        side.consumer = None
        conn.parameter_status.update(done.parameter_status)

    async def _reset_and_keep(self, conn: ServerConnection) -> None:
        try:
            async with asyncio.timeout(RESET_TIMEOUT_S):
                await self._reset(conn)
        except (RemoteProtocolError, ConnectionError, TimeoutError) as e:
            log.info("serverpool.reset_failed", instance=conn.instance.id, error=str(e))
            conn.close()
            return
        side = conn.side
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle or not conn.usable_for(conn.instance):
            conn.close()
            return
        # Idle: anything from the server now (a FATAL at its shutdown) ends the connection.
        side.consumer = lambda _data: self._drop(conn)
        side.on_close = lambda _exc: self._drop(conn)
        loop = asyncio.get_running_loop()
        conn.kept_at = loop.time()
        conn._timer = loop.call_later(self.idle_timeout, self._drop, conn)
        conns.append(conn)

    def _unpark(self, conn: ServerConnection) -> None:
        if conn._timer is not None:
            conn._timer.cancel()
            conn._timer = None
        conn.side.consumer = None
        conn.side.on_close = None

    def _drop(self, conn: ServerConnection) -> None:
        conns = self._idle.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[conn.key]
        self._unpark(conn)
        conn.close()

    async def close(self) -> None:
        for task in list(self._resets):
            task.cancel()
        for task in list(self._resets):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conns in list(self._idle.values()):
            for conn in list(conns):
                self._drop(conn)
