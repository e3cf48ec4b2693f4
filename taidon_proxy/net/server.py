"""The listener: accept loop (with a peek for direct TLS), session registry, cancel keys, drain."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import structlog

from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.instances.roles import LoginRoles
from taidon_proxy.net.auth import Authenticator
from taidon_proxy.net.cancel import CancelKeys
from taidon_proxy.net.context import SessionContext
from taidon_proxy.net.maintenance import Maintenance
from taidon_proxy.net.offload import NativeRelay
from taidon_proxy.net.relay import ClientSide
from taidon_proxy.net.serverpool import ServerPool
from taidon_proxy.net.session import ClientSession
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.team import Team

log = structlog.get_logger("taidon.server")

TLS_RECORD_HANDSHAKE = 0x16
PEEK_TIMEOUT = 30.0
PG_PORT_DEFAULT = 5432
SESSION_END_S = 2.0  # for ended sessions to write their error and close, at shutdown
# What sessions still open after the grace period are told (the text Postgres uses for a
# fast shutdown, and why: clients and people read it).
SHUTTING_DOWN = "terminating connection due to administrator command: the proxy is shutting down"


def parse_listen(spec: str) -> tuple[str, int] | Path:
    """'127.0.0.1:55432', '[::1]:55432', or a unix socket directory ('/run/taidon')."""
    if spec.startswith("/"):
        return Path(spec)
    host, _, port = spec.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_local(spec: str) -> bool:
    """A unix socket directory or a loopback address."""
    where = parse_listen(spec)
    if isinstance(where, Path):
        return True
    host = where[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProxyServer:
    def __init__(
        self,
        instances: InstanceManager,
        auth: Authenticator,
        tls: ssl.SSLContext | None,
        *,
        audit: Audit,
        native: bool = False,
        team: Team | None = None,
    ) -> None:
        self.instances = instances
        self.roles = LoginRoles()
        self.pool = ServerPool(lambda: self.instances.config.instances.server_pool)
        self.auth = auth
        self.tls = tls
        self._native_wanted = native
        self._native: NativeRelay | None = None
        self.sessions: set[ClientSession] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.keys = CancelKeys()
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._servers: list[asyncio.Server] = []
        self._keepalive_set: tuple[int, int, int] | bool | None = False  # False: never set
        self._handlers: set[asyncio.Task[None]] = set()
        self.addresses: list[str] = []
        # Observers (metrics): called as each session opens and once as it closes.
        self.on_session_opened: Callable[[ClientSession], None] | None = None
        self.on_session_closed: Callable[[ClientSession], None] | None = None
        # Serves maintenance connections (postgres, template1) and CREATE DATABASE names.
        self.maintenance: Maintenance | None = None
        self.context = SessionContext(
            instances=instances, auth=auth, tls=tls, keys=self.keys, pool=self.pool,
            roles=self.roles, relay=self.native_relay, maintenance=lambda: self.maintenance,
            closed=self.forget, audit=audit, team=team,
        )  # fmt: skip

    # --- listening ---------------------------------------------------------------------------

    async def listen(self, spec: str, *, unix_port: int = PG_PORT_DEFAULT) -> str:
        where = parse_listen(spec)
        if isinstance(where, Path):
            path = where / f".s.PGSQL.{unix_port}"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o777)  # like Postgres: access is decided by auth, not file mode
            address = str(path)
        else:
            host, port = where
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            address = f"{host}:{sock.getsockname()[1]}"
        sock.listen(1024)
        sock.setblocking(False)
        self._sockets.append(sock)
        if self.tls is None:
            # Nothing to peek for: the loop accepts and makes the transport itself, in C.
            loop = asyncio.get_running_loop()
            self._servers.append(await loop.create_server(self._accepted_client, sock=sock))
        else:
            self._accepting.append(asyncio.create_task(self._accept_loop(sock)))
        self.addresses.append(address)
        log.info("proxy.listening", address=address, tls=self.tls is not None)
        return address

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(lsock)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("proxy.accept_failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handle(sock, addr))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, sock: socket.socket, addr: object) -> None:
        loop = asyncio.get_running_loop()
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._keepalive(sock)
        direct = False
        try:
            if self.tls is not None:
                direct = await self._peek_direct_tls(sock)
            # Our own protocol object: with ssl=, uvloop returns its SSLProtocol wrapper instead.
            client = ClientSide()
            await loop.connect_accepted_socket(
                lambda: client, sock, ssl=self.tls if direct else None,
                ssl_handshake_timeout=PEEK_TIMEOUT if direct else None,
            )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log.info("proxy.handshake_failed", peer=peer, error=type(e).__name__)
            sock.close()
            return
        await self._serve(client, peer, direct)

    def _accepted_client(self) -> ClientSide:
        return _AcceptedClient(self._start_session)

    def _start_session(self, client: ClientSide, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        addr = transport.get_extra_info("peername")
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
        if sock is not None and sock.family != socket.AF_UNIX:
            self._keepalive(sock)  # uvloop sets TCP_NODELAY on accepted TCP sockets itself
        task = asyncio.create_task(self._serve(client, peer, False))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, client: ClientSide, peer: str, direct: bool) -> None:
        session = ClientSession(self.context, client, peer, direct)
        self.sessions.add(session)
        self._no_sessions.clear()
        if self.on_session_opened is not None:
            self.on_session_opened(session)
        await session.run()

    def _keepalive(self, sock: socket.socket) -> None:
        """Probe idle clients, with the config in force (a reload applies to new connections).

        Accepted sockets inherit these options from the listening socket, so they are set
        there, once per change, and on a socket accepted before the change was seen.
        """
        ka = self.instances.config.tcp_keepalive
        wanted = (
            (max(1, round(ka.idle)), max(1, round(ka.interval)), ka.count) if ka.idle > 0 else None
        )
        if wanted == self._keepalive_set:
            return
        self._keepalive_set = wanted
        for target in [*self._sockets, sock]:
            if target.family != socket.AF_UNIX:
                _set_keepalive(target, wanted)

    async def _peek_direct_tls(self, sock: socket.socket) -> bool:
        """Look at the first byte without consuming it: 0x16 starts a TLS handshake."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(sock.fileno(), readable)
        try:
            async with asyncio.timeout(PEEK_TIMEOUT):
                await ready
        finally:
            loop.remove_reader(sock.fileno())
        first = sock.recv(1, socket.MSG_PEEK)
        return first[:1] == bytes([TLS_RECORD_HANDSHAKE])

    @property
    def servers_reused(self) -> int:
        return self.pool.reused

    # --- sessions and cancel keys -------------------------------------------------------------

    def forget(self, session: object) -> None:
        assert isinstance(session, ClientSession)
        if session in self.sessions and self.on_session_closed is not None:
            self.on_session_closed(session)
        self.sessions.discard(session)
        self.keys.forget(session)
        if not self.sessions:
            self._no_sessions.set()

    # --- stopping ---------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for t in self._accepting:
            t.cancel()
        for s in self._sockets:
            if s.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(s.getsockname())
            s.close()
        self._accepting.clear()
        self._sockets.clear()

    def native_relay(self) -> NativeRelay | None:
        """The C relay thread, started on first use; None when sessions splice in Python."""
        if self._native is None and self._native_wanted:
            self._native = NativeRelay()
        return self._native

    async def wait_sessions(self, limit: float) -> bool:
        """Wait (bounded) until no session is left; True if none is."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._no_sessions.wait()
        return not self.sessions

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; let sessions finish within `grace`; end the rest with 57P01 (as
        Postgres's fast shutdown does), give them a moment to say it; then cancel handlers."""
        self.stop_accepting()
        if self.sessions and grace > 0:
            log.info("proxy.draining", sessions=len(self.sessions), grace=grace)
            await self.wait_sessions(grace)
        if self.sessions:
            log.info("proxy.ending_sessions", sessions=len(self.sessions))
            for session in list(self.sessions):
                session.end("57P01", SHUTTING_DOWN)
            await self.wait_sessions(SESSION_END_S)
        for t in list(self._handlers):
            t.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        if self._native is not None:
            self._native.close()  # after the sessions: they stop their pairs first
            self._native = None
        await self.pool.close()


def _set_keepalive(sock: socket.socket, wanted: tuple[int, int, int] | None) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0 if wanted is None else 1)
    if wanted is not None:
        idle, interval, count = wanted
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    # No TCP_USER_TIMEOUT: it also ends a live client that only stopped reading (psql in a
    # pager, a zero window) once the bound passes; data to a vanished client is ended by the
    # kernel's retransmission limit instead.


class _AcceptedClient(ClientSide):
    """A client the loop accepted itself: the session starts as its transport is made."""

    __slots__ = ("_made",)

    def __init__(self, made: Callable[[ClientSide, asyncio.BaseTransport], None]) -> None:
        super().__init__()
        self._made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._made(self, transport)
