"""Maintenance connections (`postgres`, `template1`): a real server, but CREATE/DROP DATABASE
are the proxy's (net side of instances/virtual.py, wire rules in pgwire/maintenance.py).

Not the hot path: these connections are read message by message in Python for their whole
life; every other session is spliced as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from taidon_proxy.errors import TaidonError
from taidon_proxy.instances.manager import InstanceManager, Lease
from taidon_proxy.instances.virtual import SERVER_DATABASES, VirtualDatabases
from taidon_proxy.net.relay import ClientSide, InstanceSide
from taidon_proxy.pgwire import messages
from taidon_proxy.pgwire.dbcommands import CreateDatabase, DatabaseCommand
from taidon_proxy.pgwire.maintenance import (
    INSPECT_LIMIT,
    Forward,
    MaintenanceFilter,
    Outcome,
    Reply,
    Run,
    WaitServer,
)
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.routing import Route
from taidon_proxy.runtimes.base import RuntimeError_


class MaintenanceClient(Protocol):
    """What serving a maintenance connection needs of the client's session."""

    user: str
    client: ClientSide
    lease: Lease | None
    log: Any  # a bound structlog logger

    def progress(self, ev: JobEvent) -> None: ...

    async def open_instance(self, params: dict[str, str]) -> tuple[InstanceSide, bytes] | None: ...


log = structlog.get_logger("taidon.maintenance")

# Pause reading the client when this much of its input waits for the server (or a command).
CLIENT_HIGH_WATER = INSPECT_LIMIT + 256 * 1024


def _ours(command: DatabaseCommand) -> bool:
    """Statements about the server's own databases go to the server."""
    return command.name not in SERVER_DATABASES


class Maintenance:
    """What a session asks before routing: is this a maintenance connection, is the name a
    virtual database; and serving a maintenance connection to its end."""

    def __init__(self, registry: VirtualDatabases, manager: InstanceManager) -> None:
        self.registry = registry
        self.manager = manager

    def is_maintenance(self, route: Route) -> bool:
        return self.registry.is_maintenance(route)

    def target(self, route: Route, user: str) -> Route:
        """The route a maintenance connection's server is opened for (its alias)."""
        return self.registry.maintenance_route(route, user)

    def reroute(self, route: Route) -> Route:
        return self.registry.reroute(route)

    async def serve(
        self, session: MaintenanceClient, route: Route, database: str, leftover: bytes
    ) -> None:
        progress = session.progress  # notices (and a cancel key) while a build runs
        lease = await self.manager.acquire(
            self.registry.maintenance_route(route, session.user), progress
        )
        session.lease = lease  # released, with both sockets closed, by the session's close
        session.log = session.log.bind(instance=lease.instance.id, maintenance=True)
        params = dict(route.params)
        params["database"] = database
        opened = await session.open_instance(params)
        if opened is None:
            return
        side, rest = opened
        await _Relay(session, side, progress, self.registry).run(leftover, rest)


class _Relay:
    """Both directions of one maintenance connection, driven by a MaintenanceFilter."""

    def __init__(
        self,
        session: MaintenanceClient,
        side: InstanceSide,
        progress: Callable[[JobEvent], None],
        registry: VirtualDatabases,
    ) -> None:
        self.session = session
        self.client = session.client
        self.side = side
        self.progress = progress
        self.registry = registry
        self.filter = MaintenanceFilter(ours=_ours)
        self.ended = False

    async def run(self, leftover: bytes, from_server: bytes) -> None:
        client, side, f = self.client, self.side, self.filter
        # Backpressure both ways through the sides' pause/resume_writing.
        client.peer_side, side.peer_side = side, client
        side.consumer = self._from_server
        side.on_close = self._server_closed
        client.on_close = lambda _exc: self._end()
        self._from_server(from_server)
        assert self.session.lease is not None
        self.session.lease.on_terminate = self._terminated
        client.consumer = self._from_client
        self._from_client(leftover + client.take_pending())
        with contextlib.suppress(ConnectionError):
            while not self.ended:
                ev = f.next_event()
                if ev is None:
                    self._resume_client()
                    await client.wait_data()
                elif isinstance(ev, WaitServer):
                    await side.wait_data()
                elif isinstance(ev, Forward):
                    side.write(ev.data)
                elif isinstance(ev, Reply):
                    client.write(ev.data)
                elif isinstance(ev, Run):
                    client.write(f.reply(ev, await self._execute(ev.command)))

    async def _execute(self, command: DatabaseCommand) -> Outcome:
        try:
            if isinstance(command, CreateDatabase):
                notices = await self.registry.create(command, self.progress)
                return Outcome.ok("CREATE DATABASE", tuple(notices))
            notices = await self.registry.drop(command)
            return Outcome.ok("DROP DATABASE", tuple(notices))
        except RuntimeError_:
            raise  # not the user's error: the session reports an internal error
        except TaidonError as e:
            return Outcome.error(e.sqlstate, e.message, detail=e.detail, hint=e.hint)

    # --- callbacks --------------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        self.filter.receive_data(data)
        t = self.client.transport
        if self.filter.buffered > CLIENT_HIGH_WATER and t is not None and not t.is_closing():
            t.pause_reading()

    def _resume_client(self) -> None:
        t = self.client.transport
        if t is not None and not t.is_closing() and not self.client.closed:
            t.resume_reading()

    def _from_server(self, data: bytes) -> None:
        self.client.write(data)
        self.filter.server_data(data)

    def _fatal(self, sqlstate: str, message: str) -> None:
        self.client.write(messages.error_response(sqlstate, message))

    def _server_closed(self, _exc: Exception | None) -> None:
        f = self.filter
        if (
            f.server_at_boundary
            and not f.server_said_error
            and not self.ended
            and not f.client_terminated
        ):
            self._fatal("57P02", "the connection to the instance was lost")
        self._end()

    def _terminated(self, sqlstate: str, message: str) -> None:
        """The instance is going away (reset, crash, shutdown)."""
        if self.filter.server_at_boundary:
            self.side.detach()
            self._fatal(sqlstate, message)
        self._end()

    def _end(self) -> None:
        """Stop: closing the client wakes the loop (its wait raises), the session cleans up."""
        self.ended = True
        for t in (self.client.transport, self.side.transport):
            if t is not None and not t.is_closing():
                t.close()
