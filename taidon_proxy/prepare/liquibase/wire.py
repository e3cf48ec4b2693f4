"""Sans-IO watch of Liquibase's JDBC conversation: finds each changeset's commit boundary."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_MESSAGE = 1 << 30  # what Postgres itself accepts
HEAD_LIMIT = 512  # bytes of a message body kept for inspection; the rest only streams through
_INT32 = struct.Struct("!i")

# The row Liquibase writes after a changeset ran ("INSERT INTO public.databasechangelog (...").
# databasechangeloglock does not match: no word boundary inside "databasechangeloglock".
_MARK_RAN = re.compile(
    rb'^\s*insert\s+into\s+(?:"?[\w$]+"?\s*\.\s*)?"?databasechangelog\b"?\s*\(', re.IGNORECASE
)


class WireError(Exception):
    """The byte stream is not the Postgres protocol we expect (a length out of bounds)."""


@dataclass
class _Frame:
    kind: int  # message type byte; 0 for the untyped startup-phase messages
    length: int  # body length
    head: bytearray
    end: int = 0  # offset just past this message in the chunk that completed it


class _Framer:
    """Splits a stream into messages, keeping only a bounded head of each body."""

    def __init__(self, *, untyped_first: bool) -> None:
        self.untyped = untyped_first
        self._hdr = bytearray()
        self._cur: _Frame | None = None
        self._left = 0

    def feed(self, data: bytes) -> list[_Frame]:
        done: list[_Frame] = []
        view = memoryview(data)
        while view:
            if self._cur is None:
                need = (4 if self.untyped else 5) - len(self._hdr)
                self._hdr += view[:need]
                view = view[need:]
                if len(self._hdr) < (4 if self.untyped else 5):
                    break
                kind = 0 if self.untyped else self._hdr[0]
                (length,) = _INT32.unpack_from(self._hdr, 0 if self.untyped else 1)
                self._hdr.clear()
                if length < 4 or length > MAX_MESSAGE:
                    raise WireError(f"message length {length} out of bounds")
                self._cur = _Frame(kind, length - 4, bytearray())
                self._left = length - 4
            take = min(self._left, len(view))
            room = HEAD_LIMIT - len(self._cur.head)
            if room > 0:
                self._cur.head += view[: min(take, room)]
            view = view[take:]
            self._left -= take
            if self._left == 0:
                self._cur.end = len(data) - len(view)
                if self.untyped and _code(self._cur) not in (SSL_REQUEST, GSSENC_REQUEST):
                    self.untyped = False  # the StartupMessage: typed messages follow
                done.append(self._cur)
                self._cur = None
        return done


@dataclass(frozen=True)
class ClientChunk:
    forward: bytes  # bytes to pass on to the server
    reply: bytes  # bytes to answer the client with ourselves (refused SSL/GSS negotiation)


class BoundaryTracker:
    """Counts changeset boundaries: the first idle ReadyForQuery after a databasechangelog INSERT.

    Liquibase inserts a changeset's databasechangelog row and then commits; the server's
    ReadyForQuery with status 'I' after that insert is the moment the changeset is durable
    and the next one has not started (the client waits for that ReadyForQuery).
    """

    def __init__(self) -> None:
        self._client = _Framer(untyped_first=True)
        self._server = _Framer(untyped_first=False)
        self._startup = bytearray()
        self._pending = False
        self.boundaries = 0

    def feed_client(self, data: bytes) -> ClientChunk:
        if not self._client.untyped:
            for frame in self._client.feed(data):
                if frame.kind in (ord("P"), ord("Q")) and _MARK_RAN.match(_query_of(frame)):
                    self._pending = True
            return ClientChunk(data, b"")
        # Startup phase: hold bytes until a whole message is seen, to drop negotiation requests.
        base = len(self._startup)
        held = bytes(self._startup) + data
        if len(held) > 10000:
            raise WireError("startup packet too long")
        self._startup.clear()
        forward = bytearray()
        reply = bytearray()
        start = 0
        for frame in self._client.feed(data):
            end = base + frame.end
            if frame.kind == 0 and _code(frame) in (SSL_REQUEST, GSSENC_REQUEST):
                reply += b"N"  # no TLS on a loopback relay; the client goes on in plain text
            else:
                forward += held[start:end]
                if frame.kind in (ord("P"), ord("Q")) and _MARK_RAN.match(_query_of(frame)):
                    self._pending = True
            start = end
        if self._client.untyped:
            self._startup += held[start:]  # an incomplete startup-phase message: keep holding
        else:
            forward += held[start:]
        return ClientChunk(bytes(forward), bytes(reply))

    def feed_server(self, data: bytes) -> bool:
        """Feed server→client bytes; True when they complete a changeset boundary."""
        boundary = False
        for frame in self._server.feed(data):
            if frame.kind == ord("E"):
                self._pending = False  # the insert (or its transaction) failed
            elif frame.kind == ord("Z") and frame.head[:1] == b"I" and self._pending:
                self._pending = False
                self.boundaries += 1
                boundary = True
        return boundary


def _code(frame: _Frame) -> int:
    """The request code of an untyped startup-phase message."""
    return int(_INT32.unpack_from(frame.head, 0)[0]) if len(frame.head) >= 4 else 0


def _query_of(frame: _Frame) -> bytes:
    """The (head of the) SQL text of a Parse ('P': name, query) or Query ('Q': query)."""
    head = bytes(frame.head)
    if frame.kind == ord("P"):
        nul = head.find(b"\x00")
        head = head[nul + 1 :] if nul >= 0 else b""
    return head
