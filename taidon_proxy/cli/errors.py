"""Exit codes of `sqlrs` and the one error type commands raise to end with one of them."""

from __future__ import annotations

from typing import Any

import click

from taidon_proxy.errors import TaidonError

EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and failed (a build error, a server error)
EXIT_USAGE = 2  # bad arguments or an invalid value (click's own code too)
EXIT_CONFIG = 3  # the config file is missing or invalid
EXIT_NO_PROXY = 4  # no proxy is running at the configured admin address
EXIT_NOT_FOUND = 5  # no such alias, state, instance or job
EXIT_CONFLICT = 6  # in use, ambiguous prefix, name taken, file exists
EXIT_AUTH = 7  # the admin token was refused

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "the operation failed (build error, server error)",
    EXIT_USAGE: "bad arguments or invalid value",
    EXIT_CONFIG: "config file missing or invalid",
    EXIT_NO_PROXY: "no proxy is running at the configured admin address",
    EXIT_NOT_FOUND: "no such alias, state, instance or job",
    EXIT_CONFLICT: "in use, ambiguous prefix, name taken, or file exists",
    EXIT_AUTH: "the admin token was refused",
}
_BY_STATUS = {401: EXIT_AUTH, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT, 422: EXIT_USAGE}


class CliError(TaidonError, click.ClickException):  # type: ignore[misc]  # both set .message
    """One line for the user on stderr, and a documented exit code (click ends with it)."""

    def __init__(
        self,
        message: str,
        code: int = EXIT_FAILED,
        *,
        hint: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click reads it per instance
        self.hint = hint
        self.payload = payload

    def show(self, file: Any = None) -> None:
        click.echo(f"sqlrs: {self.message}", err=True)
        if self.hint:
            click.echo(f"hint: {self.hint}", err=True)


def api_failure(status: int, error: dict[str, Any]) -> CliError:
    """An API error body as a CLI error: its message, candidates or blockers, its exit code."""
    message = str(error.get("message") or f"HTTP {status}")
    if error.get("candidates"):
        message += "; candidates: " + ", ".join(str(c) for c in error["candidates"])
    if error.get("detail"):
        message += f" ({error['detail']})"
    code = _BY_STATUS.get(status, EXIT_FAILED)
    return CliError(message, code, hint=error.get("hint"), payload={"status": status, **error})
