"""The proxy's client-side startup towards an instance that trusts it."""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.messages import (
    AUTH_OK,
    TRANSACTION_STATUSES,
    MessageFramer,
    parse_error_fields,
    startup_message,
)
from taidon_proxy.pgwire.reader import BodyReader

_INT32 = struct.Struct("!i")

AUTH_NAMES = {
    2: "KerberosV5",
    3: "cleartext password",
    5: "MD5 password",
    6: "SCM credential",
    7: "GSSAPI",
    8: "GSSAPI continue",
    9: "SSPI",
    10: "SASL",
    11: "SASL continue",
    12: "SASL final",
}


@dataclass(frozen=True)
class InstanceAuthOk:
    pass


@dataclass(frozen=True)
class InstanceParameterStatus:
    name: str
    value: str
    raw: bytes


@dataclass(frozen=True, repr=False)
class InstanceBackendKey:
    pid: int
    secret: bytes

    def __repr__(self) -> str:
        return f"InstanceBackendKey(pid={self.pid}, <secret>)"


@dataclass(frozen=True)
class InstanceNotice:
    raw: bytes
    fields: dict[str, str]


@dataclass(frozen=True)
class InstanceError:
    """A startup ErrorResponse (FATAL): the instance closes the connection after it."""

    fields: dict[str, str]
    raw: bytes


@dataclass(frozen=True)
class InstanceReady:
    status: bytes
    raw: bytes


InstanceEvent = (
    InstanceAuthOk
    | InstanceParameterStatus
    | InstanceBackendKey
    | InstanceNotice
    | InstanceError
    | InstanceReady
)


class InstanceState(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    AUTHENTICATED = "authenticated"  # AuthenticationOk seen; parameters until ReadyForQuery
    READY = "ready"
    FAILED = "failed"  # the instance sent an ErrorResponse; nothing may follow
    ERROR = "error"


S = InstanceState
TRANSITIONS: dict[tuple[InstanceState, bytes], InstanceState] = {
    (S.AWAITING_AUTH, b"R"): S.AUTHENTICATED,
    (S.AWAITING_AUTH, b"N"): S.AWAITING_AUTH,
    (S.AWAITING_AUTH, b"E"): S.FAILED,
    (S.AUTHENTICATED, b"S"): S.AUTHENTICATED,
    (S.AUTHENTICATED, b"K"): S.AUTHENTICATED,
    (S.AUTHENTICATED, b"N"): S.AUTHENTICATED,
    (S.AUTHENTICATED, b"E"): S.FAILED,
    (S.AUTHENTICATED, b"Z"): S.READY,
}
del S


class InstanceStartup:
    """Sends a StartupMessage and turns the instance's answers into events until ReadyForQuery."""

    def __init__(self, params: Mapping[str, str], *, max_message_length: int = 65536) -> None:
        if any(name.startswith("_pq_.") for name in params):
            raise LocalProtocolError("protocol options are not forwarded to instances")
        self._initial = startup_message(params)
        self._framer = MessageFramer(max_message_length)
        self._state = InstanceState.AWAITING_AUTH
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> InstanceState:
        return self._state

    def initial_bytes(self) -> bytes:
        return self._initial

    def _fail(self, message: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(message)
        self._state = InstanceState.ERROR
        self._framer.take_remaining()
        return self._error

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._framer.receive_data(data)

    def next_event(self) -> InstanceEvent | None:
        """The next event, or None until more data arrives (always None once READY)."""
        if self._error is not None:
            raise self._error
        if self._state is InstanceState.READY:
            return None
        if self._state is InstanceState.FAILED:
            if self._framer.buffered:
                raise self._fail("instance sent data after a startup ErrorResponse")
            return None
        try:
            message = self._framer.next_message()
        except RemoteProtocolError as exc:
            raise self._fail(f"instance sent an invalid message: {exc.message}") from None
        if message is None:
            return None
        kind, body = message
        new_state = TRANSITIONS.get((self._state, kind))
        if new_state is None:
            raise self._fail(
                f"instance sent unexpected message type {kind!r} in state {self._state.name}"
            )
        raw = kind + _INT32.pack(len(body) + 4) + body
        try:
            event = self._decode(kind, body, raw)
        except RemoteProtocolError as exc:
            raise self._fail(exc.message) from None
        self._state = new_state
        return event

    def _decode(self, kind: bytes, body: bytes, raw: bytes) -> InstanceEvent:
        reader = BodyReader(body, f"instance {kind!r}")
        if kind == b"R":
            code = reader.int32()
            if code != AUTH_OK:
                name = AUTH_NAMES.get(code, "unknown")
                raise RemoteProtocolError(
                    f"instance requested {name} authentication (code {code}); "
                    "instances must trust the proxy"
                )
            reader.expect_end()
            return InstanceAuthOk()
        if kind == b"S":
            name = reader.cstring().decode("utf-8", errors="replace")
            value = reader.cstring().decode("utf-8", errors="replace")
            reader.expect_end()
            return InstanceParameterStatus(name=name, value=value, raw=raw)
        if kind == b"K":
            pid = reader.int32()
            secret = reader.take(4)
            reader.expect_end()
            return InstanceBackendKey(pid=pid, secret=secret)
        if kind == b"Z":
            status = reader.rest()
            if status not in TRANSACTION_STATUSES:
                raise RemoteProtocolError("instance sent an invalid ReadyForQuery status")
            return InstanceReady(status=status, raw=raw)
        fields = parse_error_fields(body)
        if kind == b"N":
            return InstanceNotice(raw=raw, fields=fields)
        return InstanceError(fields=fields, raw=raw)

    def take_remaining(self) -> bytes:
        """After InstanceReady: bytes received beyond ReadyForQuery, for the shell to forward."""
        if self._error is not None:
            raise self._error
        if self._state is not InstanceState.READY:
            raise LocalProtocolError(f"take_remaining() in state {self._state.name}")
        return self._framer.take_remaining()
