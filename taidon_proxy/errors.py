"""Domain errors: each carries a SQLSTATE and a user-facing message; the edge sends them."""

from __future__ import annotations


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
    sqlstate = "28P01"


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
