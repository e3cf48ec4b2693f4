"""One client connection: startup, TLS, auth, routing, instance handshake, then the splice."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import asyncpg
import structlog

from taidon_proxy.errors import AuthFailed, Cancelled, TaidonError, from_protocol
from taidon_proxy.instances.manager import Lease
from taidon_proxy.instances.roles import ROLE_MISSING, SUPERUSER, hint
from taidon_proxy.net.offload import Ended, NativeRelay
from taidon_proxy.net.relay import ClientSide, InstanceSide, splice
from taidon_proxy.net.serverpool import ServerConnection, startup_key
from taidon_proxy.net.tls import ALPN
from taidon_proxy.pgwire import messages
from taidon_proxy.pgwire.errors import ProtocolError
from taidon_proxy.pgwire.instance import (
    InstanceBackendKey,
    InstanceError,
    InstanceNotice,
    InstanceParameterStatus,
    InstanceReady,
    InstanceStartup,
)
from taidon_proxy.pgwire.startup import FrontendStartup
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
)
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.prepare.queue import REQUESTER, Priority, Requester
from taidon_proxy.routing import Route, parse_route
from taidon_proxy.runtimes.base import RuntimeError_
from taidon_proxy.services.team import Admission

if TYPE_CHECKING:
    from taidon_proxy.net.context import SessionContext

log = structlog.get_logger("taidon.session")

# A reused server connection's session is often one query long (a client that connects per
# request): it moves to the C relay only after this many round trips, when the hand-over
# (a thread wake-up and four epoll changes) pays for itself.
HANDOVER_AFTER_ROUNDS = 3
STARTUP_TIMEOUT = 60.0  # client must finish its startup packet and auth within this
INSTANCE_HANDSHAKE_TIMEOUT = 30.0


class ClientSession:
    """Owns one client connection from accept to close."""

    def __init__(
        self, ctx: SessionContext, client: ClientSide, peer: str, direct_tls: bool
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.peer = peer
        self.direct_tls = direct_tls
        self.started = time.monotonic()
        self.started_at = time.time()
        # Our half of the cancel key; the pid the client is told is its backend's own, once
        # known (a key sent before that, for a long wait, carries an invented one).
        self.secret = secrets.token_bytes(4)
        self.keys: list[tuple[int, bytes]] = []  # every (pid, secret) this client was given
        self.instance_key: tuple[int, bytes] | None = None
        self.instance: InstanceSide | None = None
        # Server connection reuse (shared instances): what the connection was opened with,
        # the ParameterStatus it reported (name -> raw), and its bytes before this session.
        self._poolable = False
        self._fwd: dict[str, str] = {}
        self._server_params: dict[str, bytes] = {}
        self._instance_base = 0
        self._instance_bytes = 0  # once the connection went back to the pool
        self._splice_base = 0  # the instance's bytes read before the splice
        self._spliced = 0  # instance bytes the Python splice forwarded, once the side is gone
        self._rounds = 0  # round trips relayed in Python on a reused connection
        self.lease: Lease | None = None
        self.user = ""
        self.admission: Admission | None = None  # the team server's: principal and quota slot
        self.route_desc = ""
        self.route: Route | None = None
        self.instance_id: str | None = None  # the leased instance's, kept past the release
        self._cancel_request = False
        self._instance_refusal: str | None = None  # the SQLSTATE an instance refused with
        self.waiting_task: asyncio.Task[object] | None = None
        self._leftover = b""
        self._held = bytearray()  # startup answers not yet written
        self._ending: tuple[str, str] | None = None  # why the proxy ends this session
        # While the C relay moves this session's bytes: its pair id, the relay, and what
        # to do once it lets go of the sockets.
        self.pair: int | None = None
        self._native: NativeRelay | None = None
        self._native_counts = (0, 0)
        self._stop_with: tuple[str, str] | None = None
        self._close_after_relay = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log = log.bind(peer=peer)

    # --- the whole life -------------------------------------------------------------------

    async def run(self) -> None:
        outcome = "closed"
        sqlstate: str | None = None  # what the client was refused with
        auth_failed = False
        try:
            await self._run()
        except _Refused:
            outcome, sqlstate = "refused by instance", self._instance_refusal
        except RuntimeError_:  # a runtime failure nobody turned into a user's error: our bug
            outcome, sqlstate = "internal error", "XX000"
            self.log.exception("session.crashed")
            self._fatal("XX000", "internal error in the proxy (see its log)")
        except TaidonError as e:
            outcome, sqlstate = f"refused {e.sqlstate}", e.sqlstate
            auth_failed = isinstance(e, AuthFailed)
            self._fatal(e.sqlstate, e.message, detail=e.detail, hint=e.hint)
        except ProtocolError as e:  # pgwire's own family becomes ours here, and only here
            err = from_protocol(e)
            auth_failed = isinstance(err, AuthFailed)
            outcome = "auth failed" if auth_failed else f"protocol error {e.sqlstate}"
            sqlstate = err.sqlstate
            self._fatal(err.sqlstate, err.message)
        except (ConnectionError, ssl.SSLError, TimeoutError) as e:
            outcome = f"dropped: {type(e).__name__}"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            outcome, sqlstate = "internal error", "XX000"
            self.log.exception("session.crashed")
            self._fatal("XX000", "internal error in the proxy (see its log)")
        finally:
            self._close()
            if self._cancel_request:
                outcome = "cancel request"
            self.log.info(
                "session.closed", outcome=outcome, user=self.user, route=self.route_desc,
                seconds=round(time.monotonic() - self.started, 3),
                bytes_from_client=self.bytes_from_client,
                bytes_to_client=self.bytes_to_client,
            )  # fmt: skip
            self._record(outcome, sqlstate, auth_failed)

    def _record(self, outcome: str, sqlstate: str | None, auth_failed: bool) -> None:
        """The connection's one audit record (never a password or SCRAM data: none is kept)."""
        route = self.route
        fields: dict[str, object] = {
            "address": self.peer, "database": self.route_desc, "outcome": outcome,
            "start": round(self.started_at, 6), "tls": self.tls_active,
        }  # fmt: skip
        if auth_failed:
            self.ctx.audit.record("auth_failure", actor=self.user, sqlstate=sqlstate, **fields)
            return
        self.ctx.audit.record(
            "connection", actor=self.user, **fields,
            alias=route.alias if route else None, label=route.label if route else None,
            state=route.state_ref if route else None, instance=self.instance_id,
            duration=round(time.monotonic() - self.started, 6),
            bytes_in=self.bytes_from_client, bytes_out=self.bytes_sent, sqlstate=sqlstate,
        )  # fmt: skip

    @property
    def bytes_from_client(self) -> int:
        return self.client.bytes_in + self._relayed()[0]

    @property
    def bytes_to_client(self) -> int:
        if self.instance is not None:
            self._instance_bytes = self.instance.bytes_in - self._instance_base
        return self._instance_bytes + self._relayed()[1]

    @property
    def bytes_sent(self) -> int:
        """Every byte sent to the client: the proxy's own answers (startup, errors, the
        instance's startup answers it passed on) and what the splices forwarded."""
        if self.instance is not None and self.instance.peer is not None:
            self._spliced = self.instance.bytes_in - self._splice_base
        return self.client.bytes_written + self._spliced + self._relayed()[1]

    def _relayed(self) -> tuple[int, int]:
        if self.pair is not None and self._native is not None:
            return self._native.counts(self.pair)
        return self._native_counts

    async def _run(self) -> None:
        params = await self._startup()
        if params is None:
            return
        self.route_desc = params.get("database", "")
        route = self.route = parse_route(params)
        if (maintenance := self.ctx.maintenance()) is not None:  # net/maintenance.py
            if maintenance.is_maintenance(route):  # postgres, template1
                self._admit(maintenance.target(route, self.user))
                await maintenance.serve(self, route, self.route_desc, self._leftover)
                return
            route = self.route = maintenance.reroute(route)  # made by CREATE DATABASE
        self._admit(route)
        await self._check_role(route)
        lease = self.ctx.instances.attach_running(route) or await self._wait(
            self.ctx.instances.acquire(route, self.progress)
        )
        assert isinstance(lease, Lease)
        self.lease = lease
        if self.admission is not None and self.ctx.team is not None:
            self.ctx.team.attach(self.admission, lease.instance)  # disk and idle TTL quotas
        lease.on_terminate = self._terminated
        self.log = self.log.bind(instance=lease.instance.id)
        fwd = dict(route.params)
        fwd["database"] = lease.instance.database
        self._fwd = fwd
        pool = self.ctx.pool
        self._poolable = pool.enabled and lease.instance.isolation == "shared"
        kept = pool.take(lease.instance, fwd) if self._poolable else None
        if kept is not None and pool.stale(kept):
            kept = await self._checked(kept)
        if kept is not None:
            self._adopt(kept)
        else:
            await self._instance_handshake(fwd)
        await self.done

    async def _checked(self, kept: ServerConnection) -> ServerConnection | None:
        """A long-kept connection answers a round trip first; None: it is gone, start anew."""
        try:
            async with asyncio.timeout(INSTANCE_HANDSHAKE_TIMEOUT):
                await self.ctx.pool.check(kept)
        except TimeoutError:
            raise self._no_answer() from None
        except (ConnectionError, ProtocolError):
            return None
        return kept

    def _no_answer(self) -> TaidonError:
        # A stopped (SIGSTOP) or wedged server accepts and then says nothing.
        assert self.lease is not None
        return TaidonError(
            f"the instance for {self.lease.instance.key} did not answer within"
            f" {INSTANCE_HANDSHAKE_TIMEOUT:g}s",
            sqlstate="57P03",
            hint="sqlrs admin reset gives the alias a fresh instance",
        )

    def _admit(self, route: Route) -> None:
        """With teams: the user's principal may connect to the alias, within its quotas."""
        REQUESTER.set(Requester(None, Priority.INTERACTIVE))  # builds it waits for go first
        team = self.ctx.team
        if team is None or not team.enabled:
            return
        principal = team.connection(self.user)
        recipe = self.ctx.instances.config.databases.get(route.alias or "")
        isolation = route.isolation or (recipe.isolation if recipe is not None else "shared")
        if isolation == "connection":
            key = f"session:{id(self)}"
        elif route.state_ref is not None:
            key = f"state:{route.state_ref}:{route.label}"
        else:
            key = f"{route.alias}:{route.label}"
        self.admission = team.admit(
            principal, route.alias if route.state_ref is None else None, key
        )
        self.log = self.log.bind(teams=",".join(principal.teams))
        REQUESTER.set(Requester(self.admission.slot.team, Priority.INTERACTIVE))

    def _fatal(self, sqlstate: str, message: str, *, detail: str | None = None,
               hint: str | None = None) -> None:  # fmt: skip
        self._flush()
        self.client.write(messages.error_response(sqlstate, message, detail=detail, hint=hint))

    def _hold(self, data: bytes) -> None:
        """Startup answers go out together: one write per step, not one per message."""
        self._held += data

    def _flush(self) -> None:
        if self._held:
            self.client.write(bytes(self._held))
            self._held.clear()

    def _close(self) -> None:
        self._flush()
        self.ctx.closed(self)
        if self.admission is not None and self.ctx.team is not None:
            self.ctx.team.leave(self.admission)
            self.admission = None
        if self.lease is not None:
            self.instance_id = self.lease.instance.id
            self.ctx.instances.release(self.lease)
            self.lease = None
        if self.pair is not None and self._native is not None:
            # The relay thread may be using the sockets: close them once it has let go.
            self._close_after_relay = True
            self._native.stop(self.pair)
            return
        self._close_transports()

    def _close_transports(self) -> None:
        for side in (self.client, self.instance):
            if side is not None and side.transport is not None:
                side.transport.close()

    # --- startup and auth -------------------------------------------------------------------

    async def _next(self, machine: FrontendStartup) -> object:
        while True:
            ev = machine.next_event()
            if ev is not None:
                return ev
            await self.client.wait_data()

    async def _startup(self) -> dict[str, str] | None:
        ctx = self.ctx
        machine = FrontendStartup(tls_available=ctx.tls is not None)
        if self.direct_tls:
            self._check_alpn()
            machine.direct_tls_established()
        self.client.consumer = machine.receive_data
        async with asyncio.timeout(STARTUP_TIMEOUT):
            machine.receive_data(self.client.take_pending())
            while True:
                ev = await self._next(machine)
                if isinstance(ev, SSLRequested):
                    accept = ctx.tls is not None
                    self.client.write(machine.answer_ssl(accept))
                    if accept:
                        await self._start_tls()
                        machine.tls_established()
                elif isinstance(ev, GSSENCRequested):
                    self.client.write(machine.answer_gssenc())
                elif isinstance(ev, CancelRequested):
                    self._cancel_request = True
                    await ctx.keys.cancel(ev.pid, ev.secret)
                    return None
                elif isinstance(ev, StartupReceived):
                    break
            if ev.needs_negotiation:
                self.client.write(
                    messages.negotiate_protocol_version(0, sorted(ev.protocol_options))
                )
            self.user = ev.params["user"]
            self.log = self.log.bind(user=self.user)
            await self._authenticate(machine, ev.params["user"])
        machine.auth_done()
        self.client.consumer = None  # later bytes wait in the side's buffer until the splice
        self._leftover = machine.take_remaining()
        self._hold(messages.authentication_ok())
        return ev.params

    def _send_key(self, pid: int) -> None:
        key = (pid, self.secret)
        self._hold(messages.backend_key_data(*key))
        self.keys.append(key)
        self.ctx.keys.register(self, key)

    def _check_alpn(self) -> None:
        assert self.client.transport is not None
        obj = self.client.transport.get_extra_info("ssl_object")
        if obj is None or obj.selected_alpn_protocol() != ALPN:
            raise TaidonError("direct TLS connection without ALPN postgresql", sqlstate="08P01")

    async def _start_tls(self) -> None:
        tls = self.ctx.tls
        assert tls is not None and self.client.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.client.transport, self.client, tls, server_side=True,
            ssl_handshake_timeout=STARTUP_TIMEOUT,
        )  # fmt: skip
        self.client.transport = cast(asyncio.Transport, transport)

    @property
    def tls_active(self) -> bool:
        t = self.client.transport
        return t is not None and t.get_extra_info("ssl_object") is not None

    async def _authenticate(self, machine: FrontendStartup, user: str) -> None:
        auth = self.ctx.auth
        if auth.method == "trust":
            return
        if auth.method == "password":
            if not self.tls_active:
                raise AuthFailed("cleartext password authentication requires TLS", sqlstate="28000")
            self.client.write(messages.authentication_cleartext_password())
            machine.expect_password()
            ev = await self._next(machine)
            assert isinstance(ev, PasswordReceived)
            await auth.check_password(user, ev.payload)
            return
        scram = await auth.scram_for(user)
        self.client.write(auth.sasl_request())
        machine.expect_password()
        ev = await self._next(machine)
        assert isinstance(ev, PasswordReceived)
        mechanism, data = auth.parse_initial(ev.payload)
        self.client.write(
            messages.authentication_sasl_continue(scram.handle_initial(mechanism, data))
        )
        machine.expect_password()
        ev = await self._next(machine)
        assert isinstance(ev, PasswordReceived)
        self._hold(messages.authentication_sasl_final(scram.handle_final(ev.payload)))

    # --- waiting for an instance ------------------------------------------------------------

    def progress(self, ev: JobEvent) -> None:
        if not self.keys:
            # A build is under way: give the client a key now, so it can cancel the wait.
            # Its pid is invented; the backend's own follows with the instance's handshake
            # (clients keep the last BackendKeyData they get).
            self._send_key(secrets.randbelow(2**31 - 1) + 1)
        self._hold(messages.notice_response(ev.message))
        self._flush()

    async def _wait(self, coro: object) -> object:
        """Await a build/start; a CancelRequest or a client hang-up ends only this wait."""
        assert asyncio.iscoroutine(coro)
        self.waiting_task = asyncio.ensure_future(coro)
        self.client.on_close = lambda _exc: self._abort_wait()
        try:
            return await self.waiting_task
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this session itself is being cancelled (shutdown)
            if self.client.closed:
                raise ConnectionResetError("client went away while waiting") from None
            if self._ending is not None:
                raise TaidonError(self._ending[1], sqlstate=self._ending[0]) from None
            raise Cancelled("canceling the connection attempt due to user request") from None
        finally:
            self.waiting_task = None
            self.client.on_close = self._client_closed

    def _abort_wait(self) -> None:
        if self.waiting_task is not None:
            self.waiting_task.cancel()

    # --- roles ------------------------------------------------------------------------------

    async def _check_role(self, route: Route) -> None:
        """Refuse a role the recipe's state is known not to have before cloning anything."""
        manager = self.ctx.instances
        recipe = manager.config.databases.get(route.alias or "")
        if route.alias is None or route.state_ref is not None or recipe is None:
            return  # unknown aliases and states are refused by acquire
        if self.user == SUPERUSER or self.user in recipe.roles or not self.ctx.roles.learned:
            return  # (nothing learned yet: resolving the state on every connect would buy nothing)
        sid = await self._wait(manager.builder.resolve(route.alias, self.progress, route.ref))
        assert isinstance(sid, str)
        self.ctx.roles.check(sid, self.user, recipe.roles)

    async def _explain_refusal(self, ev: InstanceError) -> bytes:
        """A missing role: say which ones exist (and remember them for the next attempt)."""
        if ev.fields.get("C") != ROLE_MISSING or self.user == SUPERUSER or self.lease is None:
            return ev.raw
        inst = self.lease.instance
        try:
            roles = await self.ctx.roles.learn(inst.state_id, inst.handle, inst.database)
        except (OSError, asyncpg.PostgresError, TimeoutError) as e:
            self.log.info("session.roles_unknown", error=str(e))
            return ev.raw
        if self.user in roles:
            return ev.raw  # refused for another reason
        return messages.error_response(
            ROLE_MISSING, ev.fields.get("M", "role does not exist"), hint=hint(roles)
        )

    # --- the instance -----------------------------------------------------------------------

    async def open_instance(self, params: dict[str, str]) -> tuple[InstanceSide, bytes] | None:
        """Connect to the leased instance and run its startup for `params`.

        The instance's answers (ParameterStatus, notices, the backend's key under our secret,
        ReadyForQuery) go out with the session's held ones in one write. Returns the
        connected side and whatever the instance sent after ReadyForQuery; None when the
        instance refused the session (its error, explained where we can, has gone out).
        """
        assert self.lease is not None
        handle = self.lease.instance.handle
        machine = InstanceStartup(params)
        try:
            return await self._instance_startup(machine, handle.socket_path)
        except TimeoutError:
            raise self._no_answer() from None

    async def _instance_startup(
        self, machine: InstanceStartup, socket_path: Path
    ) -> tuple[InstanceSide, bytes] | None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(INSTANCE_HANDSHAKE_TIMEOUT):
            _, side = await loop.create_unix_connection(InstanceSide, str(socket_path))
            self.instance = side
            side.on_close = self._instance_closed
            side.consumer = machine.receive_data
            side.write(machine.initial_bytes())
            while True:
                ev = machine.next_event()
                if ev is None:
                    await side.wait_data()
                    continue
                if isinstance(ev, InstanceParameterStatus):
                    self._server_params[ev.name] = ev.raw
                    self._hold(ev.raw)
                elif isinstance(ev, InstanceNotice):
                    self._hold(ev.raw)
                elif isinstance(ev, InstanceBackendKey):
                    self.instance_key = (ev.pid, ev.secret)
                    self._send_key(ev.pid)  # the real pid: NOTIFY senders, pg_stat_activity
                elif isinstance(ev, InstanceError):
                    self._instance_refusal = ev.fields.get("C")
                    self._hold(await self._explain_refusal(ev))
                    self._flush()
                    return None
                elif isinstance(ev, InstanceReady):
                    self._hold(ev.raw)
                    self._flush()
                    side.frames.note_ready(ev.status)
                    break
        side.consumer = None
        return side, machine.take_remaining()

    async def _instance_handshake(self, params: dict[str, str]) -> None:
        opened = await self.open_instance(params)
        if opened is None:
            raise _Refused()
        side, rest = opened
        if rest:
            side.note_forwarded(rest)
            self._hold(rest)
        self._flush()
        self._start_relay(side)

    def _adopt(self, kept: ServerConnection) -> None:
        """A kept server connection: answer the client as its startup would have."""
        side = kept.side
        self.instance = side
        self._instance_base = side.bytes_in
        self._server_params = kept.parameter_status
        self.instance_key = kept.backend_key
        side.on_close = self._instance_closed
        for raw in kept.parameter_status.values():
            self._hold(raw)
        self._send_key(kept.backend_key[0])
        self._hold(messages.ready_for_query(b"I"))
        side.frames.note_ready(b"I")
        self._flush()
        self.log = self.log.bind(reused=True)
        self._start_relay(side, reused=True)

    def _start_relay(self, side: InstanceSide, *, reused: bool = False) -> None:
        # The server is idle: every query and answer from here on is this client's.
        self._splice_base = side.bytes_in
        side.frames.counted = self.client.frames.counted = 0
        if self._poolable:
            self.client.hold_terminate = True
            self.client.on_terminate = self._client_left
            self.client.peer_answers = lambda: side.frames.counted
        splice(self.client, side)
        pending = self._leftover + self.client.take_pending()
        if pending:
            self.client.note_forwarded(pending)
            side.write(pending)
        self.client.on_close = self._client_closed
        if self.client.closed or side.closed:
            self._finish()
            return
        native = self.ctx.relay()
        if native is None:
            return
        if reused:
            side.on_idle = self._instance_idle
        elif self._can_hand_over(side):
            self._hand_over(native, side)

    # --- the C relay ------------------------------------------------------------------------

    def _instance_idle(self) -> None:
        """A reused connection's round trip ended: move to the C relay after a few."""
        self._rounds += 1
        side, native = self.instance, self.ctx.relay()
        if side is None or native is None:
            return
        if self._rounds >= HANDOVER_AFTER_ROUNDS and self._can_hand_over(side):
            side.on_idle = None
            self._hand_over(native, side)

    def _can_hand_over(self, side: InstanceSide) -> bool:
        """Plain sockets with nothing buffered in Python: the C relay can take them as they are."""
        c, i = self.client.transport, side.transport
        return (
            c is not None and i is not None and not self.tls_active
            and self.client.at_boundary and side.at_boundary
            and c.get_write_buffer_size() == 0 and i.get_write_buffer_size() == 0
            and c.get_extra_info("socket") is not None and i.get_extra_info("socket") is not None
        )  # fmt: skip

    def _hand_over(self, native: NativeRelay, side: InstanceSide) -> None:
        c, i = self.client.transport, side.transport
        assert c is not None and i is not None
        # From here on the event loop no longer reads these sockets; the thread does.
        c.pause_reading()
        i.pause_reading()
        self.client.on_close = side.on_close = None
        self._native = native
        self.pair = native.add(
            c.get_extra_info("socket").fileno(), i.get_extra_info("socket").fileno(),
            self._relay_ended, keep_server=self._poolable,
            ready=side.frames.ready_status if side.frames.idle else b"",
            unanswered=max(0, self.client.frames.counted - side.frames.counted),
        )  # fmt: skip

    def _relay_ended(self, ended: Ended) -> None:
        """The thread let go of both sockets: finish the session as the Python relay would."""
        self.pair = None
        self._native_counts = (ended.bytes_up, ended.bytes_down)
        if self._close_after_relay:
            self._close_transports()
            return
        if ended.unsent_to_client:
            self.client.write(ended.unsent_to_client)
        if ended.reason == "terminated":  # the client left; its Terminate was withheld
            if not ended.unsent_to_instance:
                self._keep_server(ended.ready_status)
            self._finish()
            return
        if ended.unsent_to_instance and ended.reason != "instance" and self.instance is not None:
            self.instance.write(ended.unsent_to_instance)
        # The server's own FATAL was its last word (terminated, shut down): nothing to add.
        if ended.reason != "client" and ended.at_boundary and not ended.ended_with_error:
            if self._stop_with is not None:
                self._fatal(*self._stop_with)
            elif ended.reason == "instance" and not ended.client_terminated:
                self._fatal("57P02", "the connection to the instance was lost")
            elif ended.reason == "failed":  # the relay could not take the sockets (our bug)
                self.log.error("session.relay_failed")
                self._fatal("XX000", "internal error in the proxy's relay (see its log)")
        self._finish()

    def _client_closed(self, _exc: Exception | None) -> None:
        self._finish()

    def _client_left(self) -> None:
        """The Python relay withheld the client's Terminate."""
        side = self.instance
        if side is not None and side.frames.idle:
            self._keep_server(side.frames.ready_status)
        self._finish()

    def _keep_server(self, ready: bytes) -> None:
        """Hand the server connection to the pool if it is idle and its instance stays."""
        side, lease = self.instance, self.lease
        if (
            side is None or lease is None or self.instance_key is None or ready != b"I"
            or side.closed or lease.instance.stopping
        ):  # fmt: skip
            return  # the session closes it as usual
        self._spliced = side.bytes_in - self._splice_base
        side.peer = side.peer_side = self.client.peer_side = None
        side.on_idle = None
        self._instance_bytes = side.bytes_in - self._instance_base
        self.instance = None
        self.ctx.pool.park(
            ServerConnection(
                side=side, instance=lease.instance, server_pid=lease.instance.handle.pid,
                backend_key=self.instance_key, params=startup_key(self._fwd),
                parameter_status=dict(self._server_params),
            )
        )  # fmt: skip

    def _instance_closed(self, _exc: Exception | None) -> None:
        # After the client's Terminate, the instance closing is the normal end: add nothing.
        if (
            self.instance is not None
            and self.instance.peer is not None
            and self.instance.at_boundary
            and not self.instance.said_error
            and not self.client.terminated
        ):
            self._fatal("57P02", "the connection to the instance was lost")
        self._finish()

    def end(self, sqlstate: str, message: str) -> None:
        """The proxy ends this session (shutdown): the client gets `message` where it may."""
        self._ending = (sqlstate, message)
        if self.waiting_task is not None:
            self.waiting_task.cancel()  # _wait turns it into this error
        elif self.lease is None or self.instance is None:
            # Still in its startup, or on a maintenance connection: just close.
            if self.client.transport is not None:
                self.client.transport.close()
        else:
            self._terminated(sqlstate, message)

    def _terminated(self, sqlstate: str, message: str) -> None:
        """The instance is going away (reset, crash, shutdown)."""
        if self.waiting_task is not None or self.done.done():
            # Still waiting (the wait itself fails), or the session has ended already: its
            # stream may have stopped inside a message, after which nothing may be added.
            return
        if self.pair is not None and self._native is not None:
            self._stop_with = (sqlstate, message)  # said once the relay reports a boundary
            self._native.stop(self.pair)
            return
        side = self.instance
        if side is None or (side.at_boundary and not side.said_error):
            if side is not None:
                side.detach()  # nothing of the instance may follow our error
            self._fatal(sqlstate, message)
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def forward_cancel(self) -> None:
        """A CancelRequest with our key: stop a wait, or pass it on to the instance."""
        if self.waiting_task is not None:
            self.waiting_task.cancel()
            return
        if self.lease is None or self.instance_key is None:
            return
        path = str(self.lease.instance.handle.socket_path)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                r, w = await asyncio.open_unix_connection(path)
                w.write(messages.cancel_request(*self.instance_key))
                await w.drain()
                # Postgres closes once it has signalled the backend (twice): only then is the
                # cancel done, and only then may the client (told by our close) go on.
                await r.read()
                w.close()
                await w.wait_closed()


class _Refused(TaidonError):
    """The instance refused the session and the client already has its ErrorResponse."""

    def __init__(self) -> None:
        super().__init__("refused by instance")
