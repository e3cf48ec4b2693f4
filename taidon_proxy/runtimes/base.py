"""The instance runtime interface: run a Postgres server on a data directory, privately."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from taidon_proxy.errors import TaidonError


class RuntimeError_(TaidonError):
    """A runtime operation failed; the message is safe to show to a user. The services that
    call a runtime wrap it (InstanceFailed, BuildFailed), as they did before it had a root."""

    sqlstate = "XX000"


class InstanceStartError(RuntimeError_):
    """The server did not come up; message carries the last lines of its log."""


@dataclass(frozen=True)
class EngineInfo:
    """The Postgres that a runtime runs: part of every state id."""

    version: str  # e.g. "15.18" (major.minor)
    major: int
    # Where the engine comes from ("/usr/lib/postgresql/15/bin", "docker:taidon/pg15@sha256:…").
    source: str


@dataclass(frozen=True)
class RuntimeCapabilities:
    name: str
    can_freeze: bool


@dataclass
class InstanceHandle:
    """A running server. The proxy connects to `socket_path` (a unix socket)."""

    instance_id: str
    pgdata: Path
    socket_dir: Path
    port: int
    pid: int  # postmaster pid (host pid for process runtime; container pid for docker)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"


@runtime_checkable
class InstanceRuntime(Protocol):
    @property
    def capabilities(self) -> RuntimeCapabilities: ...

    async def engine(self) -> EngineInfo: ...

    async def init_cluster(self, pgdata: Path, settings: Mapping[str, str]) -> None:
        """initdb into `pgdata` (which must not exist yet; its parent does)."""
        ...

    async def start(
        self, instance_id: str, pgdata: Path, settings: Mapping[str, str] | None = None
    ) -> InstanceHandle:
        """Start a server on pgdata; return once it accepts connections on its socket."""
        ...

    async def stop(self, handle: InstanceHandle, *, mode: str = "fast") -> None:
        """Stop cleanly (mode fast: checkpoint, shutdown) or immediate; idempotent."""
        ...

    async def wait_exit(self, handle: InstanceHandle) -> int:
        """Wait until the server exits for any reason; return its exit status."""
        ...

    async def freeze(self, handle: InstanceHandle) -> None:
        """Pause every process of the instance (for a consistent live snapshot)."""
        ...

    async def thaw(self, handle: InstanceHandle) -> None: ...

    async def reap(self, keep: set[str]) -> list[str]:
        """Stop instances this runtime started earlier that are not in `keep`; return their ids."""
        ...

    async def close(self) -> None:
        """Stop every instance this runtime object started."""
        ...
