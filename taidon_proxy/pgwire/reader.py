"""Bounds-checked reading of primitive wire values (int16/int32, C strings) from a message body."""

from __future__ import annotations

import struct

from taidon_proxy.pgwire.errors import RemoteProtocolError

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")


class BodyReader:
    """Cursor over one message body; every read past the end is the peer's violation."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _truncated(self) -> RemoteProtocolError:
        return RemoteProtocolError(f"invalid {self._what} message: truncated")

    def int16(self) -> int:
        if self._pos + 2 > len(self._data):
            raise self._truncated()
        (value,) = _INT16.unpack_from(self._data, self._pos)
        self._pos += 2
        return int(value)

    def int32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise self._truncated()
        (value,) = _INT32.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(value)

    def byte(self) -> int:
        if self._pos >= len(self._data):
            raise self._truncated()
        value = self._data[self._pos]
        self._pos += 1
        return value

    def cstring(self) -> bytes:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            raise RemoteProtocolError(f"invalid {self._what} message: unterminated string")
        value = self._data[self._pos : end]
        self._pos = end + 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise self._truncated()
        value = self._data[self._pos : self._pos + n]
        self._pos += n
        return value

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    def at_end(self) -> bool:
        return self._pos >= len(self._data)

    def expect_end(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError(f"invalid {self._what} message: unexpected trailing data")


def decode_text(raw: bytes, what: str) -> str:
    """Strict UTF-8 decoding for values we route on; invalid text is the peer's violation."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"invalid {what}: not valid UTF-8") from None
