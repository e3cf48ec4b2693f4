"""The proxy's one error root and its domain errors: a SQLSTATE and a user-facing message.

Every error the proxy raises derives from TaidonError (runtime, admin API and CLI errors
too), so an edge catches one root. The two leaf libraries keep their own small roots, as
libraries do: `pgwire.ProtocolError` is translated here (`from_protocol`), by the session,
and `snapshots.SnapshotError` by the store and the services that call a backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taidon_proxy.pgwire.errors import ProtocolError

INVALID_PASSWORD = "28P01"


class TaidonError(Exception):
    """An error a client or operator should see, with the SQLSTATE the wire edge will use."""

    sqlstate = "XX000"

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint


class ConfigError(TaidonError):
    """The configuration file is unreadable or invalid (message names the key and line)."""

    sqlstate = "F0000"
    # Each problem as {file, line, key, message} (the admin API's reload answer lists them).
    problems: list[dict[str, object]] = []  # noqa: RUF012 - replaced per instance, never mutated


class UnknownDatabase(TaidonError):
    sqlstate = "3D000"


class RoutingError(TaidonError):
    """A startup packet asks for something the router cannot give (bad option, bad label)."""

    sqlstate = "42602"


class AuthFailed(TaidonError):
    """Authentication failed: 28P01 for a wrong password (or an unknown user), 28000 where
    Postgres uses it (a method the connection cannot use, such as cleartext without TLS)."""

    sqlstate = INVALID_PASSWORD


class ProtocolViolation(TaidonError):
    """The client or an instance broke the protocol (pgwire's RemoteProtocolError)."""

    sqlstate = "08P01"


class ProtocolMisuse(TaidonError):
    """We drove the protocol core wrongly: a bug of ours (pgwire's LocalProtocolError)."""

    sqlstate = "XX000"


class BuildFailed(TaidonError):
    """Preparing a state failed; the message quotes the tool's own error (file, line, SQL)."""

    sqlstate = "58000"
    # The input files the failed build read: the failure is remembered until one changes.
    inputs: list[str] = []  # noqa: RUF012 - replaced per instance, never mutated


class CapacityError(TaidonError):
    """Too many instances, or the store is full."""

    sqlstate = "53300"


class InstanceFailed(TaidonError):
    """An instance could not start, or crashed under its clients."""

    sqlstate = "57P03"


class Cancelled(TaidonError):
    """The client cancelled while waiting for a build."""

    sqlstate = "57014"


def from_protocol(exc: ProtocolError) -> TaidonError:
    """pgwire's error as ours: the peer's violation, a failed authentication, or our bug."""
    from taidon_proxy.pgwire.errors import LocalProtocolError

    if isinstance(exc, LocalProtocolError):
        return ProtocolMisuse(exc.message, sqlstate=exc.sqlstate)
    if exc.sqlstate.startswith("28"):  # invalid_authorization_specification, invalid_password
        return AuthFailed(exc.message, sqlstate=exc.sqlstate)
    return ProtocolViolation(exc.message, sqlstate=exc.sqlstate)
