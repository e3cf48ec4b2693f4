"""Events the server-side startup machine yields to its shell."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SSLRequested:
    """The client asked for TLS; the shell answers with `answer_ssl`."""


@dataclass(frozen=True)
class GSSENCRequested:
    """The client asked for GSSAPI encryption; the shell answers with `answer_gssenc`."""


@dataclass(frozen=True)
class CancelRequested:
    """A CancelRequest; nothing may follow it on this connection."""

    pid: int
    secret: bytes


@dataclass(frozen=True)
class StartupReceived:
    """A StartupMessage; `params` excludes the `_pq_.*` protocol options."""

    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)
    protocol_options: dict[str, str] = field(default_factory=dict)
    needs_negotiation: bool = False


@dataclass(frozen=True, repr=False)
class PasswordReceived:
    """The body of a 'p' message (password, SASLInitialResponse or SASLResponse)."""

    payload: bytes

    def __repr__(self) -> str:
        # Never put a password or SCRAM payload into a log line by accident.
        return f"PasswordReceived(<{len(self.payload)} bytes>)"


StartupEvent = SSLRequested | GSSENCRequested | CancelRequested | StartupReceived | PasswordReceived
