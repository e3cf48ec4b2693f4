"""Error families of the protocol core: the peer's violations vs our own misuse.

The library's own root, as h11 has one; the proxy translates it into its errors at one place.
"""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"
INTERNAL_ERROR = "XX000"
INVALID_PASSWORD = "28P01"


class ProtocolError(Exception):
    """Base of every protocol error; carries a SQLSTATE and a user-facing message."""

    def __init__(self, message: str, *, sqlstate: str) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol, or failed the exchange it runs (a wrong SCRAM proof:
    SQLSTATE 28P01); the edge answers with an ErrorResponse and closes."""

    def __init__(self, message: str, *, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message, sqlstate=sqlstate)

    def __repr__(self) -> str:
        return f"RemoteProtocolError({self.message!r}, sqlstate={self.sqlstate!r})"


class LocalProtocolError(ProtocolError):
    """We tried to do something illegal in the current state: a bug in the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sqlstate=INTERNAL_ERROR)
