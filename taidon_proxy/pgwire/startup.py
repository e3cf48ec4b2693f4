"""Server-side startup phase of one client connection as an explicit state machine."""

from __future__ import annotations

import enum
import struct

from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
)
from taidon_proxy.pgwire.reader import BodyReader, decode_text
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupEvent,
    StartupReceived,
)

_HEADER = struct.Struct("!ii")
_TYPED = struct.Struct("!ci")
_TLS_HANDSHAKE = 0x16
PROTOCOL_OPTION_PREFIX = "_pq_."
INVALID_AUTHORIZATION = "28000"
FEATURE_NOT_SUPPORTED = "0A000"


class StartupState(enum.Enum):
    START = "start"  # SSLRequest and GSSENCRequest both still possible
    SSL_REFUSED = "ssl_refused"  # only GSSENCRequest may still come
    GSSENC_REFUSED = "gssenc_refused"  # only SSLRequest may still come
    AWAITING_STARTUP = "awaiting_startup"  # negotiation over: StartupMessage or CancelRequest
    SSL_REQUESTED = "ssl_requested"  # waiting for answer_ssl; GSSENC still possible after N
    SSL_REQUESTED_LAST = "ssl_requested_last"  # waiting for answer_ssl; GSSENC already refused
    GSSENC_REQUESTED = "gssenc_requested"
    GSSENC_REQUESTED_LAST = "gssenc_requested_last"
    AWAITING_TLS = "awaiting_tls"  # 'S' sent; the shell runs the handshake
    AUTHENTICATING = "authenticating"  # StartupReceived; the shell drives authentication
    AWAITING_PASSWORD = "awaiting_password"
    DONE = "done"
    CANCELLED = "cancelled"
    ERROR = "error"


class Trigger(enum.Enum):
    SSL_REQUEST = "SSLRequest"
    GSSENC_REQUEST = "GSSENCRequest"
    STARTUP = "StartupMessage"
    CANCEL = "CancelRequest"
    ACCEPT_SSL = "answer_ssl(True)"
    REFUSE_SSL = "answer_ssl(False)"
    REFUSE_GSSENC = "answer_gssenc()"
    TLS_ESTABLISHED = "tls_established()"
    DIRECT_TLS = "direct_tls_established()"
    EXPECT_PASSWORD = "expect_password()"
    PASSWORD = "password message"
    AUTH_DONE = "auth_done()"


S = StartupState
T = Trigger
# Follows Postgres: SSL and GSSENC may each be tried once, in either order, but nothing may
# follow an accepted SSLRequest except the handshake.
TRANSITIONS: dict[tuple[StartupState, Trigger], StartupState] = {
    (S.START, T.SSL_REQUEST): S.SSL_REQUESTED,
    (S.START, T.GSSENC_REQUEST): S.GSSENC_REQUESTED,
    (S.GSSENC_REFUSED, T.SSL_REQUEST): S.SSL_REQUESTED_LAST,
    (S.SSL_REFUSED, T.GSSENC_REQUEST): S.GSSENC_REQUESTED_LAST,
    (S.SSL_REQUESTED, T.REFUSE_SSL): S.SSL_REFUSED,
    (S.SSL_REQUESTED, T.ACCEPT_SSL): S.AWAITING_TLS,
    (S.SSL_REQUESTED_LAST, T.REFUSE_SSL): S.AWAITING_STARTUP,
    (S.SSL_REQUESTED_LAST, T.ACCEPT_SSL): S.AWAITING_TLS,
    (S.GSSENC_REQUESTED, T.REFUSE_GSSENC): S.GSSENC_REFUSED,
    (S.GSSENC_REQUESTED_LAST, T.REFUSE_GSSENC): S.AWAITING_STARTUP,
    (S.AWAITING_TLS, T.TLS_ESTABLISHED): S.AWAITING_STARTUP,
    # PostgreSQL 17 direct TLS: the handshake came first, before any packet.
    (S.START, T.DIRECT_TLS): S.AWAITING_STARTUP,
    **{(s, T.STARTUP): S.AUTHENTICATING for s in (S.START, S.SSL_REFUSED, S.GSSENC_REFUSED)},
    **{(s, T.CANCEL): S.CANCELLED for s in (S.START, S.SSL_REFUSED, S.GSSENC_REFUSED)},
    (S.AWAITING_STARTUP, T.STARTUP): S.AUTHENTICATING,
    (S.AWAITING_STARTUP, T.CANCEL): S.CANCELLED,
    (S.AUTHENTICATING, T.EXPECT_PASSWORD): S.AWAITING_PASSWORD,
    (S.AWAITING_PASSWORD, T.PASSWORD): S.AUTHENTICATING,
    (S.AUTHENTICATING, T.AUTH_DONE): S.DONE,
}
del S, T

# States in which an untyped startup-phase packet is read from the buffer.
_PACKET_STATES = frozenset(
    {
        StartupState.START,
        StartupState.SSL_REFUSED,
        StartupState.GSSENC_REFUSED,
        StartupState.AWAITING_STARTUP,
    }
)


class FrontendStartup:
    """Turns a client's first bytes into startup events; the shell answers through methods.

    Sans-IO: `receive_data` buffers (bounded by `max_buffer`), `next_event` parses. Every
    violation raises RemoteProtocolError and leaves the machine in ERROR, where every later
    call raises again.
    """

    def __init__(
        self,
        *,
        tls_available: bool,
        max_startup_length: int = 10000,
        max_password_length: int = 8192,
        max_buffer: int = 65536,
    ) -> None:
        self.tls_available = tls_available
        self.max_startup_length = max_startup_length
        self.max_password_length = max_password_length
        self.max_buffer = max_buffer
        self._state = StartupState.START
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None
        self.tls = False

    @property
    def state(self) -> StartupState:
        return self._state

    # --- internals -------------------------------------------------------------------------

    def _fail(self, message: str, sqlstate: str = "08P01") -> RemoteProtocolError:
        self._error = RemoteProtocolError(message, sqlstate=sqlstate)
        self._state = StartupState.ERROR
        self._buf.clear()
        return self._error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _transition(self, trigger: Trigger) -> None:
        new = TRANSITIONS.get((self._state, trigger))
        if new is None:
            raise LocalProtocolError(f"cannot apply {trigger.value} in state {self._state.name}")
        self._state = new

    def _consume(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    # --- feeding -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._raise_if_failed()
        if not data:
            return
        if self._state is StartupState.AWAITING_TLS:
            raise self._fail("received unencrypted data after SSL request")
        if self._state is StartupState.CANCELLED:
            raise self._fail("unexpected data after CancelRequest")
        if len(self._buf) + len(data) > self.max_buffer:
            raise self._fail("too much data received during connection startup")
        self._buf += data

    def next_event(self) -> StartupEvent | None:
        """The next event, or None when more data (or an answer from the shell) is needed."""
        self._raise_if_failed()
        state = self._state
        if state in _PACKET_STATES:
            return self._next_packet()
        if state is StartupState.AWAITING_PASSWORD:
            return self._next_password()
        if state is StartupState.CANCELLED and self._buf:
            raise self._fail("unexpected data after CancelRequest")
        return None

    def _next_packet(self) -> StartupEvent | None:
        buf = self._buf
        if buf and buf[0] == _TLS_HANDSHAKE:
            raise self._fail(
                "TLS handshake without SSLRequest: direct TLS is not accepted at this point"
            )
        if len(buf) < 4:
            return None
        (length,) = struct.unpack_from("!i", buf)
        if length < 8 or length > self.max_startup_length:
            raise self._fail("invalid length of startup packet")
        if len(buf) < length:
            return None
        _, code = _HEADER.unpack_from(buf)
        packet = self._consume(length)
        if code == SSL_REQUEST_CODE:
            return self._negotiation(Trigger.SSL_REQUEST, length, SSLRequested())
        if code == GSSENC_REQUEST_CODE:
            return self._negotiation(Trigger.GSSENC_REQUEST, length, GSSENCRequested())
        if code == CANCEL_REQUEST_CODE:
            if length != 16:
                raise self._fail("invalid length of cancel request packet")
            (pid,) = struct.unpack_from("!i", packet, 8)
            self._transition(Trigger.CANCEL)
            return CancelRequested(pid=pid, secret=packet[12:16])
        return self._startup(code, packet[8:])

    def _negotiation(
        self, trigger: Trigger, length: int, event: SSLRequested | GSSENCRequested
    ) -> StartupEvent:
        if length != 8:
            raise self._fail(f"invalid length of {trigger.value} packet")
        if (self._state, trigger) not in TRANSITIONS:
            raise self._fail(f"unexpected {trigger.value}: encryption was already negotiated")
        self._transition(trigger)
        return event

    def _startup(self, code: int, body: bytes) -> StartupReceived:
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            raise self._fail(
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0",
                FEATURE_NOT_SUPPORTED,
            )
        layout_error = "invalid startup packet layout: expected terminator as last byte"
        reader = BodyReader(body, "startup")
        raw_pairs: list[tuple[bytes, bytes]] = []
        try:
            while raw_name := reader.cstring():
                raw_pairs.append((raw_name, reader.cstring()))
        except RemoteProtocolError:
            raise self._fail(layout_error) from None
        if not reader.at_end():
            raise self._fail(layout_error)
        params: dict[str, str] = {}
        options: dict[str, str] = {}
        try:
            for raw_name, raw_value in raw_pairs:
                name = decode_text(raw_name, "startup packet parameter name")
                value = decode_text(raw_value, "startup packet parameter value")
                # Repeated names: the last one wins, as in Postgres.
                (options if name.startswith(PROTOCOL_OPTION_PREFIX) else params)[name] = value
        except RemoteProtocolError as exc:
            raise self._fail(exc.message) from None
        if not params.get("user"):
            raise self._fail(
                "no PostgreSQL user name specified in startup packet", INVALID_AUTHORIZATION
            )
        self._transition(Trigger.STARTUP)
        return StartupReceived(
            major=major,
            minor=minor,
            params=params,
            protocol_options=options,
            needs_negotiation=minor > 0 or bool(options),
        )

    def _next_password(self) -> PasswordReceived | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        kind, length = _TYPED.unpack_from(buf)
        if kind != b"p":
            raise self._fail(f"expected password response, got message type {kind!r}")
        if length < 4 or length - 4 > self.max_password_length:
            raise self._fail("invalid length of password packet")
        if len(buf) < 1 + length:
            return None
        payload = self._consume(1 + length)[5:]
        self._transition(Trigger.PASSWORD)
        return PasswordReceived(payload=payload)

    # --- answers from the shell ---------------------------------------------------------------

    def answer_ssl(self, accept: bool) -> bytes:
        """Bytes to send for the pending SSLRequest: b"S" (then run TLS) or b"N"."""
        self._raise_if_failed()
        if accept and not self.tls_available:
            raise LocalProtocolError("cannot accept SSL: no TLS configured")
        self._transition(Trigger.ACCEPT_SSL if accept else Trigger.REFUSE_SSL)
        # Bytes sent before the handshake were not encrypted and may have been injected.
        # After 'N' the connection stays plaintext anyway, so pipelined data is harmless.
        if accept and self._buf:
            raise self._fail("received unencrypted data after SSL request")
        return b"S" if accept else b"N"

    def tls_established(self) -> None:
        self._raise_if_failed()
        self._transition(Trigger.TLS_ESTABLISHED)
        self.tls = True

    def direct_tls_established(self) -> None:
        """The connection began with a TLS handshake (direct TLS); only a startup may follow."""
        self._raise_if_failed()
        self._transition(Trigger.DIRECT_TLS)
        self.tls = True

    def answer_gssenc(self) -> bytes:
        """Bytes to send for the pending GSSENCRequest: always b"N" (not supported)."""
        self._raise_if_failed()
        self._transition(Trigger.REFUSE_GSSENC)
        return b"N"

    def expect_password(self) -> None:
        """The shell sent an authentication request; the next message must be 'p'."""
        self._raise_if_failed()
        self._transition(Trigger.EXPECT_PASSWORD)

    def auth_done(self) -> None:
        """Authentication succeeded; later bytes belong to the session."""
        self._raise_if_failed()
        self._transition(Trigger.AUTH_DONE)

    def take_remaining(self) -> bytes:
        """In DONE: every byte received after the startup phase, for the shell to forward."""
        self._raise_if_failed()
        if self._state is not StartupState.DONE:
            raise LocalProtocolError(f"take_remaining() in state {self._state.name}")
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
