"""Resetting a server session for its next client: DISCARD ALL and the server's answer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.messages import MessageFramer, parse_error_fields, query
from taidon_proxy.pgwire.reader import BodyReader

# Drops temp tables, prepared statements, cursors, LISTEN, advisory locks, plans and sequence
# state, and RESET ALL (every GUC back to the session's start, SET ROLE included).
RESET_SQL = "DISCARD ALL"


class ResetState(enum.Enum):
    SENT = "sent"  # waiting for the command's completion
    COMPLETED = "completed"  # waiting for ReadyForQuery
    DONE = "done"
    ERROR = "error"


S = ResetState
TRANSITIONS: dict[tuple[ResetState, bytes], ResetState] = {
    (S.SENT, b"C"): S.COMPLETED,
    (S.SENT, b"S"): S.SENT,
    (S.SENT, b"N"): S.SENT,
    (S.COMPLETED, b"S"): S.COMPLETED,
    (S.COMPLETED, b"N"): S.COMPLETED,
    (S.COMPLETED, b"Z"): S.DONE,
}
del S


@dataclass(frozen=True)
class ResetDone:
    """The session is as a new one; these parameters changed back on the way (name -> raw)."""

    parameter_status: dict[str, bytes]


class SessionReset:
    """Feeds the server's answer to RESET_SQL; `result()` says when it is done.

    Anything but a clean completion followed by an idle ReadyForQuery (an ErrorResponse, data
    left over, a message out of order) is a RemoteProtocolError: the connection is not reused.
    """

    def __init__(self, *, max_message_length: int = 65536) -> None:
        self._framer = MessageFramer(max_message_length)
        self._state = ResetState.SENT
        self._changed: dict[str, bytes] = {}

    @staticmethod
    def initial_bytes() -> bytes:
        return query(RESET_SQL)

    @property
    def state(self) -> ResetState:
        return self._state

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    def result(self) -> ResetDone | None:
        """ResetDone once the server is idle again; None while more data is needed."""
        while self._state is not ResetState.DONE:
            try:
                message = self._framer.next_message()
            except RemoteProtocolError:
                self._state = ResetState.ERROR
                raise
            if message is None:
                return None
            self._step(*message)
        if self._framer.buffered:
            self._state = ResetState.ERROR
            raise RemoteProtocolError("server sent data after its reset")
        return ResetDone(dict(self._changed))

    def _step(self, kind: bytes, body: bytes) -> None:
        new_state = TRANSITIONS.get((self._state, kind))
        if new_state is None:
            self._state = ResetState.ERROR
            if kind == b"E":
                msg = parse_error_fields(body).get("M", "")
                raise RemoteProtocolError(f"server refused its reset: {msg}")
            raise RemoteProtocolError(f"unexpected {kind!r} during a reset")
        if kind == b"S":
            name = BodyReader(body, "ParameterStatus").cstring().decode("utf-8", "replace")
            self._changed[name] = kind + (len(body) + 4).to_bytes(4, "big") + body
        elif kind == b"Z" and body != b"I":
            self._state = ResetState.ERROR
            raise RemoteProtocolError("server is not idle after its reset")
        self._state = new_state
