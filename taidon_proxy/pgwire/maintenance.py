"""The wire of a maintenance connection: which client messages the proxy answers itself.

A maintenance connection (database `postgres` or `template1`) is forwarded to a real server,
except `CREATE DATABASE` / `DROP DATABASE` statements, which the proxy carries out and
answers. `MaintenanceFilter` reads the client's messages and the server's replies (to know
when the server is idle and in which transaction state), and says what to do next: forward
bytes, wait for the server, or run a command and send `reply(...)`. It never does IO.

Simple Query: a `Query` whose whole text is one such statement is answered by the proxy
(CommandComplete or ErrorResponse, then ReadyForQuery) once the server has answered
everything sent before it and is outside a transaction block; inside one it is forwarded, so
the server says "cannot run inside a transaction block" itself.

Extended Query: a `Parse` of such a statement that starts a batch (nothing forwarded since
the last Sync) makes the batch the proxy's: it answers Parse/Bind/Describe/Execute/Close of
that statement and the Sync. A message for anything else in the batch is forwarded, and from
then on the whole batch is (so replies can never come out of order).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from taidon_proxy.pgwire.boundaries import ERROR_RESPONSE, BoundaryTracker
from taidon_proxy.pgwire.dbcommands import DatabaseCommand, recognize_bytes
from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.messages import error_response, notice_response, ready_for_query
from taidon_proxy.pgwire.reader import BodyReader

_HEADER = struct.Struct("!ci")
_INT32 = struct.Struct("!i")
_INT16 = struct.Struct("!h")

# Query and Parse messages up to this size are looked at; longer ones pass through unread.
INSPECT_LIMIT = 1 << 20
# Messages after which the server sends exactly one ReadyForQuery.
_READY_AFTER = frozenset({b"Q", b"S", b"F"})
_EXTENDED = frozenset({b"P", b"B", b"D", b"E", b"C", b"H"})


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """Send these bytes to the server."""

    data: bytes


@dataclass(frozen=True)
class WaitServer:
    """Nothing can be decided until the server has answered what was sent before."""


@dataclass(frozen=True)
class Run:
    """Carry out `command`, then send `reply(self, outcome)` to the client."""

    command: DatabaseCommand
    simple: bool  # a simple Query (reply ends with ReadyForQuery) or an Execute


@dataclass(frozen=True)
class Reply:
    """Bytes for the client that answer messages of the proxy's own batch."""

    data: bytes


FilterEvent = Forward | WaitServer | Run | Reply


@dataclass(frozen=True)
class Outcome:
    """How a command ended: `tag` on success, else an error; notices go first either way."""

    tag: str | None = None
    sqlstate: str | None = None
    message: str | None = None
    detail: str | None = None
    hint: str | None = None
    notices: tuple[str, ...] = ()

    @classmethod
    def ok(cls, tag: str, notices: tuple[str, ...] = ()) -> Outcome:
        return cls(tag=tag, notices=notices)

    @classmethod
    def error(
        cls, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
    ) -> Outcome:
        return cls(sqlstate=sqlstate, message=message, detail=detail, hint=hint)


# --- message builders the proxy's own replies need ------------------------------------------


def _typed(kind: bytes, body: bytes = b"") -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def command_complete(tag: str) -> bytes:
    return _typed(b"C", tag.encode("ascii") + b"\x00")


PARSE_COMPLETE = _typed(b"1")
BIND_COMPLETE = _typed(b"2")
CLOSE_COMPLETE = _typed(b"3")
NO_DATA = _typed(b"n")
NO_PARAMETERS = _typed(b"t", _INT16.pack(0))


def outcome_bytes(outcome: Outcome) -> bytes:
    out = b"".join(notice_response(n) for n in outcome.notices)
    if outcome.tag is not None:
        return out + command_complete(outcome.tag)
    assert outcome.sqlstate is not None and outcome.message is not None
    return out + error_response(
        outcome.sqlstate, outcome.message, severity="ERROR", detail=outcome.detail,
        hint=outcome.hint,
    )  # fmt: skip


# --- the server's side: ReadyForQuery count and transaction status --------------------------


# --- the client's side ----------------------------------------------------------------------


class _Mode(enum.Enum):
    NORMAL = "normal"  # forwarding; a batch may be partly forwarded (`dirty`)
    OURS = "ours"  # a batch the proxy answers itself
    SKIP = "skip"  # our batch failed: discard until Sync, as the server would


@dataclass
class _Large:
    """A message longer than INSPECT_LIMIT, streamed through as it comes."""

    left: int


class MaintenanceFilter:
    """Client bytes in, events out; server bytes in (`server_data`) to track its readiness."""

    def __init__(
        self,
        ours: Callable[[DatabaseCommand], bool] = lambda _c: True,
        inspect_limit: int = INSPECT_LIMIT,
    ) -> None:
        self.ours = ours  # which recognised commands the proxy answers (else: forwarded)
        self.inspect_limit = inspect_limit
        self.client_terminated = False  # the client sent Terminate
        self._buf = bytearray()
        self._large: _Large | None = None
        self._tracker = BoundaryTracker(frozenset(b"Z"))  # counts the server's ReadyForQuery
        self._tracker.note_ready(b"I")
        self._outstanding = 0  # ReadyForQuery messages the server still owes
        self._dirty = False  # something of the current extended batch went to the server
        self._mode = _Mode.NORMAL
        self._statements: dict[str, DatabaseCommand] = {}
        self._portals: dict[str, DatabaseCommand] = {}
        self._pending: tuple[bytes, bytes] | None = None  # waits for the server to be idle

    # --- feeding --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def server_data(self, data: bytes) -> None:
        before = self._tracker.counted
        self._tracker.feed(data)
        self._outstanding = max(0, self._outstanding - (self._tracker.counted - before))

    @property
    def server_idle(self) -> bool:
        return self._outstanding == 0

    @property
    def server_at_boundary(self) -> bool:
        """Between two server messages: an ErrorResponse of ours may be added there."""
        return self._tracker.at_boundary

    @property
    def server_said_error(self) -> bool:
        """The server's stream ended with a whole ErrorResponse (its FATAL: its last word)."""
        t = self._tracker
        return t.at_boundary and t.last_type == ERROR_RESPONSE

    @property
    def buffered(self) -> int:
        """Client bytes received and not yet handed out."""
        return len(self._buf)

    # --- deciding -------------------------------------------------------------------------

    def next_event(self) -> FilterEvent | None:
        """The next thing to do, or None until the client sends more."""
        if self._pending is not None:
            kind, body = self._pending
            if not self.server_idle:
                return WaitServer()
            self._pending = None
            return self._decide(kind, body)
        if self._large is not None:
            return self._stream_large()
        if len(self._buf) < 5:
            return None
        kind, length = _HEADER.unpack_from(self._buf, 0)
        if length < 4:
            raise RemoteProtocolError(f"invalid message length {length}")
        if length - 4 > self.inspect_limit:
            self._large = _Large(left=1 + length)
            return self._stream_large(kind)
        if len(self._buf) < 1 + length:
            return None
        body = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return self._decide(kind, body)

    def _stream_large(self, kind: bytes | None = None) -> FilterEvent | None:
        assert self._large is not None
        if not self._buf:
            return None
        if kind is not None and self._mode is not _Mode.SKIP:
            self._note_forwarded(kind)
        chunk = bytes(self._buf[: self._large.left])
        del self._buf[: len(chunk)]
        self._large.left -= len(chunk)
        if self._large.left == 0:
            self._large = None
        if self._mode is _Mode.SKIP:
            return self.next_event()
        return Forward(chunk)

    def _note_forwarded(self, kind: bytes) -> None:
        if kind == b"X":
            self.client_terminated = True
        if kind in _READY_AFTER:
            self._outstanding += 1
        if kind == b"S":
            self._dirty = False
            if self._mode is not _Mode.NORMAL:
                self._mode = _Mode.NORMAL
        elif kind in _EXTENDED:
            self._dirty = True

    def _forward(self, kind: bytes, body: bytes) -> Forward:
        if kind == b"P":
            self._statements.pop(_first_cstring(body), None)
        elif kind == b"B":
            self._portals.pop(_first_cstring(body), None)
        self._note_forwarded(kind)
        if self._mode is _Mode.OURS and kind in _EXTENDED:
            self._mode = _Mode.NORMAL  # mixed batch: the server answers the rest of it
        return Forward(_typed(kind, body))

    def _wait(self, kind: bytes, body: bytes) -> WaitServer:
        self._pending = (kind, body)
        return WaitServer()

    def _decide(self, kind: bytes, body: bytes) -> FilterEvent | None:
        if self._mode is _Mode.SKIP:
            if kind == b"S":
                self._mode = _Mode.NORMAL
                return Reply(ready_for_query(b"I"))
            return self.next_event()
        if kind == b"Q":
            command = recognize_bytes(_first_cstring_raw(body))
            if command is None or not self.ours(command):
                return self._forward(kind, body)
            if not self.server_idle:
                return self._wait(kind, body)
            if self._tracker.ready_status != b"I" or self._dirty:
                return self._forward(kind, body)
            return Run(command, simple=True)
        if self._mode is _Mode.OURS:
            return self._ours(kind, body)
        if kind == b"P" and not self._dirty:
            command = _parse_command(body, self.ours)
            if command is not None:
                if not self.server_idle:
                    return self._wait(kind, body)
                if self._tracker.ready_status == b"I":
                    self._mode = _Mode.OURS
                    return self._ours(kind, body)
        if kind == b"B" and not self._dirty and _bind_statement(body) in self._statements:
            if not self.server_idle:
                return self._wait(kind, body)
            if self._tracker.ready_status == b"I":
                self._mode = _Mode.OURS
                return self._ours(kind, body)
        return self._forward(kind, body)

    def _ours(self, kind: bytes, body: bytes) -> FilterEvent | None:
        """A message of the proxy's own extended batch."""
        try:
            if kind == b"P":
                command = _parse_command(body, self.ours)
                if command is not None:
                    self._statements[_first_cstring(body)] = command
                    return Reply(PARSE_COMPLETE)
            elif kind == b"B":
                r = BodyReader(body, "Bind")
                portal = r.cstring().decode("utf-8", "replace")
                stmt = r.cstring().decode("utf-8", "replace")
                if stmt in self._statements:
                    self._portals[portal] = self._statements[stmt]
                    return Reply(BIND_COMPLETE)
            elif kind == b"D":
                what, name = body[:1], _first_cstring(body[1:])
                if what == b"S" and name in self._statements:
                    return Reply(NO_PARAMETERS + NO_DATA)
                if what == b"P" and name in self._portals:
                    return Reply(NO_DATA)
            elif kind == b"E":
                name = _first_cstring(body)
                if name in self._portals:
                    return Run(self._portals[name], simple=False)
            elif kind == b"C":
                what, name = body[:1], _first_cstring(body[1:])
                table = self._statements if what == b"S" else self._portals
                if what in (b"S", b"P") and name in table:
                    del table[name]
                    return Reply(CLOSE_COMPLETE)
            elif kind == b"H":
                return self.next_event()  # our replies are written at once
            elif kind == b"S":
                self._mode = _Mode.NORMAL
                self._portals.pop("", None)
                return Reply(ready_for_query(b"I"))
        except RemoteProtocolError:
            pass  # malformed: let the server say so
        return self._forward(kind, body)

    def reply(self, run: Run, outcome: Outcome) -> bytes:
        """What the client gets for a finished `Run`."""
        out = outcome_bytes(outcome)
        if run.simple:
            return out + ready_for_query(b"I")
        if outcome.tag is None:
            self._mode = _Mode.SKIP
        return out


def _first_cstring_raw(body: bytes) -> bytes:
    end = body.find(b"\x00")
    return body if end < 0 else body[:end]


def _first_cstring(body: bytes) -> str:
    return _first_cstring_raw(body).decode("utf-8", "replace")


def _parse_command(body: bytes, ours: Callable[[DatabaseCommand], bool]) -> DatabaseCommand | None:
    """The command a Parse message prepares, if it is one of ours (and takes no parameters)."""
    try:
        r = BodyReader(body, "Parse")
        r.cstring()
        sql = r.cstring()
        nparams = r.int16()
    except RemoteProtocolError:
        return None
    if nparams != 0:
        return None
    command = recognize_bytes(sql)
    return command if command is not None and ours(command) else None


def _bind_statement(body: bytes) -> str | None:
    try:
        r = BodyReader(body, "Bind")
        r.cstring()
        return r.cstring().decode("utf-8", "replace")
    except RemoteProtocolError:
        return None
