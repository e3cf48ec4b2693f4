"""Wire message builders, ErrorResponse field parsing and the typed-message framer."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.reader import BodyReader

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")

# Request codes that take the place of a protocol version in an untyped startup packet.
CANCEL_REQUEST_CODE = (1234 << 16) | 5678
SSL_REQUEST_CODE = (1234 << 16) | 5679
GSSENC_REQUEST_CODE = (1234 << 16) | 5680

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

TRANSACTION_STATUSES = frozenset({b"I", b"T", b"E"})


def _cstr(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if b"\x00" in raw:
        raise LocalProtocolError(f"{what} must not contain a NUL byte")
    return raw + b"\x00"


def _typed(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def _fields(pairs: Iterable[tuple[str, str | None]]) -> bytes:
    out = bytearray()
    seen: set[str] = set()
    for code, value in pairs:
        if value is None:
            continue
        if len(code) != 1 or not code.isascii() or code == "\x00" or code in seen:
            raise LocalProtocolError(f"invalid or duplicate error field code {code!r}")
        seen.add(code)
        out += code.encode("ascii") + _cstr(value, f"error field {code}")
    out += b"\x00"
    return bytes(out)


def _notice_or_error(
    kind: bytes,
    sqlstate: str,
    *,
    message: str,
    severity: str,
    detail: str | None,
    hint: str | None,
    extra: Mapping[str, str] | None,
) -> bytes:
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise LocalProtocolError(f"invalid SQLSTATE {sqlstate!r}")
    pairs: list[tuple[str, str | None]] = [
        ("S", severity),
        ("V", severity),
        ("C", sqlstate),
        ("M", message),
        ("D", detail),
        ("H", hint),
    ]
    pairs.extend((extra or {}).items())
    return _typed(kind, _fields(pairs))


# --- backend messages (proxy -> client) -------------------------------------------------


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """ErrorResponse ('E'); `extra` adds further fields by their one-letter code."""
    return _notice_or_error(
        b"E", sqlstate, message=message, severity=severity, detail=detail, hint=hint, extra=extra
    )


def notice_response(
    message: str,
    *,
    severity: str = "NOTICE",
    sqlstate: str = "00000",
    detail: str | None = None,
) -> bytes:
    """NoticeResponse ('N'), e.g. build progress sent after AuthenticationOk."""
    return _notice_or_error(
        b"N", sqlstate, message=message, severity=severity, detail=detail, hint=None, extra=None
    )


def _auth(code: int, payload: bytes = b"") -> bytes:
    return _typed(b"R", _INT32.pack(code) + payload)


def authentication_ok() -> bytes:
    return _auth(AUTH_OK)


def authentication_cleartext_password() -> bytes:
    return _auth(AUTH_CLEARTEXT_PASSWORD)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    names = [_cstr(m, "SASL mechanism") for m in mechanisms]
    if not names or any(n == b"\x00" for n in names):
        raise LocalProtocolError("AuthenticationSASL needs at least one non-empty mechanism")
    return _auth(AUTH_SASL, b"".join(names) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _auth(AUTH_SASL_CONTINUE, data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _auth(AUTH_SASL_FINAL, data)


def negotiate_protocol_version(newest_minor: int, unrecognized_options: Iterable[str]) -> bytes:
    options = [_cstr(o, "protocol option") for o in unrecognized_options]
    body = _INT32.pack(newest_minor) + _INT32.pack(len(options)) + b"".join(options)
    return _typed(b"v", body)


def backend_key_data(pid: int, secret: bytes) -> bytes:
    if not 4 <= len(secret) <= 256:
        raise LocalProtocolError("cancel key secret must be 4 to 256 bytes")
    return _typed(b"K", _INT32.pack(pid) + secret)


def parameter_status(name: str, value: str) -> bytes:
    return _typed(b"S", _cstr(name, "parameter name") + _cstr(value, "parameter value"))


def ready_for_query(status: bytes = b"I") -> bytes:
    if status not in TRANSACTION_STATUSES:
        raise LocalProtocolError(f"invalid transaction status {status!r}")
    return _typed(b"Z", status)


# --- frontend messages (proxy -> instance, and test clients) ----------------------------


def startup_message(params: Mapping[str, str], version: tuple[int, int] = (3, 0)) -> bytes:
    major, minor = version
    body = bytearray(_INT32.pack((major << 16) | minor))
    for name, value in params.items():
        if not name:
            raise LocalProtocolError("startup parameter names must not be empty")
        body += _cstr(name, "startup parameter name") + _cstr(value, "startup parameter value")
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + bytes(body)


def ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: bytes) -> bytes:
    if not 4 <= len(secret) <= 256:
        raise LocalProtocolError("cancel key secret must be 4 to 256 bytes")
    return (
        _INT32.pack(12 + len(secret)) + _INT32.pack(CANCEL_REQUEST_CODE) + _INT32.pack(pid) + secret
    )


def terminate() -> bytes:
    return b"X\x00\x00\x00\x04"


def query(sql: str) -> bytes:
    return _typed(b"Q", _cstr(sql, "query"))


def password_message(password: str) -> bytes:
    return _typed(b"p", _cstr(password, "password"))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _typed(b"p", _cstr(mechanism, "SASL mechanism") + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _typed(b"p", data)


# --- parsing -------------------------------------------------------------------------------


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, by one-letter code.

    Text is decoded leniently (the server's encoding may not be UTF-8); the raw bytes are what
    gets forwarded, this is for routing and logs.
    """
    reader = BodyReader(bytes(body), "error/notice")
    fields: dict[str, str] = {}
    while True:
        code = reader.byte()
        if code == 0:
            break
        fields[chr(code)] = reader.cstring().decode("utf-8", errors="replace")
    reader.expect_end()
    return fields


class MessageFramer:
    """Incremental splitter of typed messages (1-byte type, int32 length) from chunked input.

    `max_length` bounds a message body (excluding type and length word); a longer one is the
    peer's violation, detected from the header alone so nothing is allocated from it.
    """

    __slots__ = ("_buf", "_error", "_max_length", "_pos")

    def __init__(self, max_length: int) -> None:
        if max_length < 0:
            raise ValueError("max_length must be >= 0")
        self._buf = bytearray()
        self._pos = 0
        self._max_length = max_length
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf) - self._pos

    def next_message(self) -> tuple[bytes, bytes] | None:
        """The next complete `(type, body)`, or None until more data arrives."""
        if self._error is not None:
            raise self._error
        avail = len(self._buf) - self._pos
        if avail < 5:
            return None
        kind, length = _HEADER.unpack_from(self._buf, self._pos)
        if length < 4:
            self._error = RemoteProtocolError(f"invalid message length {length}")
            raise self._error
        if length - 4 > self._max_length:
            self._error = RemoteProtocolError(
                f"message of type {kind!r} too long ({length - 4} bytes, limit {self._max_length})"
            )
            raise self._error
        if avail < 1 + length:
            return None
        start = self._pos + 5
        body = bytes(self._buf[start : self._pos + 1 + length])
        self._pos += 1 + length
        return bytes(kind), body

    def take_remaining(self) -> bytes:
        """Everything buffered and not yet framed; the framer is empty afterwards."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest
