"""Where a relayed stream stands: message boundaries found from the length words alone.

The relays pass bytes on unparsed; this follows them cheaply (a header every message, never
a copy of a body), so the proxy knows whether it may add a message of its own (only at a
boundary), how the server's last ReadyForQuery left it, and how many messages of a few
types went by (the client's sync points, the server's ReadyForQuery). Sans-IO: feed bytes,
ask. The C relay (`net/_splice.c`) keeps the same account; both are held to MessageFramer's
answer by the same property test.
"""

from __future__ import annotations

import struct

READY_FOR_QUERY = ord("Z")
TERMINATE = ord("X")
ERROR_RESPONSE = ord("E")
# The length word (it counts itself) of the message whose type byte is at `pos`. Twice as
# fast as slicing + int.from_bytes, which matters for COPY OUT: one short message per row.
_MSG_LEN = struct.Struct("!xI").unpack_from


class BoundaryTracker:
    """Follows one direction's framing across arbitrary chunks."""

    __slots__ = (
        "_counts", "_hdr", "_need", "_pending", "counted", "last_type", "ready_status",
    )  # fmt: skip

    def __init__(self, counts: frozenset[int] = frozenset()) -> None:
        self._counts = counts  # message types to count, once whole, as they pass
        self._need = 0  # body bytes of the current message still to come
        self._hdr = b""  # a message header split across chunks
        self._pending = False  # the current message is of a counted type, not yet whole
        self.last_type = 0  # type byte of the last message whose header was whole
        self.ready_status = b""  # of the last ReadyForQuery, once its body arrived
        self.counted = 0

    @property
    def at_boundary(self) -> bool:
        return self._need == 0 and not self._hdr

    @property
    def idle(self) -> bool:
        """At a boundary right after a ReadyForQuery: the server waits for the client."""
        return self._need == 0 and not self._hdr and self.last_type == READY_FOR_QUERY

    def note_ready(self, status: bytes) -> None:
        """A ReadyForQuery that went by outside this tracker (the end of a startup)."""
        self.last_type, self.ready_status = READY_FOR_QUERY, status

    def feed(self, data: bytes) -> int:
        """Follow `data`; return where in it the last whole header starts (-1 if none)."""
        n = len(data)
        pos = self._need  # where the next message starts in `data`
        if pos:
            if pos == 1 and self.last_type == READY_FOR_QUERY:
                self.ready_status = data[:1]
            if pos > n:  # inside one body: nothing to look at (the hot case)
                self._need = pos - n
                return -1
            if self._pending:
                self.counted += 1
                self._pending = False
        start = -1
        hdr = self._hdr
        if hdr:
            take = 5 - len(hdr)
            hdr += data[:take]
            if len(hdr) < 5:
                self._hdr, self._need = hdr, 0
                return -1
            self.last_type = kind = hdr[0]
            if kind == READY_FOR_QUERY and take < n:
                self.ready_status = data[take : take + 1]
            pos = take + _MSG_LEN(hdr, 0)[0] - 4
            if kind in self._counts:
                if pos <= n:
                    self.counted += 1
                else:
                    self._pending = True
            self._hdr = b""
        last = n - 5
        msg_len, counts, c = _MSG_LEN, self._counts, 0
        while pos <= last:  # a length below 4 is the peer's bug; we still move on
            start = pos
            if data[pos] in counts:
                c += 1
            pos += msg_len(data, pos)[0] + 1
        if start >= 0:
            self.last_type = kind = data[start]
            if kind == READY_FOR_QUERY and start + 5 < n:
                self.ready_status = data[start + 5 : start + 6]
            if pos > n and kind in counts:  # the last one is not whole yet
                c -= 1
                self._pending = True
        self.counted += c
        if pos >= n:
            self._need = pos - n
        else:
            self._need, self._hdr = 0, bytes(data[pos:])
        return start
