"""The docker runtime's daemon link: bounded SDK calls, labels, throwaway runs, image facts."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from taidon_proxy.runtimes.base import RuntimeError_

T = TypeVar("T")

DEFAULT_HOST = "unix:///var/run/docker.sock"
LABEL_STORE = "org.taidon.store"
LABEL_INSTANCE = "org.taidon.instance"
LABEL_ROLE = "org.taidon.role"  # instance | initdb | probe
LABEL_SOCKET = "org.taidon.socket-dir"

API_TIMEOUT = 30.0  # one docker API call
THROWAWAY_TIMEOUT = 120.0  # an initdb or probe container, start to exit
LOG_TAIL = 20
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
# One shell line so the probe costs one container: version, initdb present, postgres uid/gid.
_PROBE = "postgres --version && command -v initdb >/dev/null && id -u postgres && id -g postgres"


@dataclass(frozen=True)
class ImageFacts:
    """What the runtime needs to know about its image, read from the image itself."""

    image_id: str
    version: str  # major.minor
    major: int
    uid: int  # of the image's postgres user
    gid: int


def tail(raw: bytes | str, lines: int = LOG_TAIL) -> str:
    """The last lines of a container's output, as text."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return "\n".join(text.strip().splitlines()[-lines:])


class DockerDaemon:
    """One daemon connection for one image and one store label; every call off the event loop."""

    def __init__(self, *, host: str, image: str, store_label: str) -> None:
        self.host = host
        self.image = image
        self.store_label = store_label
        self._api: Any = None
        self._lock = asyncio.Lock()
        self._facts: ImageFacts | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking SDK call in a thread, bounded (the SDK's HTTP timeout bounds the thread)."""
        async with asyncio.timeout(API_TIMEOUT + 5):
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def api(self) -> Any:
        """The low-level client, connected on first use (version negotiated with the daemon)."""
        if self._api is None:
            async with self._lock:
                if self._api is None:
                    self._api = await self.call(self._connect)
        return self._api

    def _connect(self) -> Any:
        if self.host.startswith("unix://"):
            # Checked with our own socket: the SDK leaks its socket when connect() fails.
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(API_TIMEOUT)
                    probe.connect(self.host.removeprefix("unix://"))
            except OSError as exc:
                raise RuntimeError_(self.unreachable_reason(str(exc))) from exc
        try:
            return docker.APIClient(base_url=self.host, version="auto", timeout=API_TIMEOUT)
        except DockerException as exc:
            raise RuntimeError_(self.unreachable_reason(str(exc))) from exc

    def unreachable_reason(self, detail: str) -> str:
        if not self.host.startswith("unix://"):
            return f"cannot reach the Docker daemon at {self.host}: {detail}"
        sock = Path(self.host.removeprefix("unix://"))
        if not sock.exists() and shutil.which("dockerd") is None:
            return (
                f"Docker is not installed: no daemon socket at {sock} and no dockerd on PATH "
                "(install docker.io, e.g. scripts/setup --full)"
            )
        if not sock.exists():
            return (
                f"the Docker daemon is not running: no socket at {sock} "
                "(start it, e.g. scripts/dockerd-up)"
            )
        return f"the Docker daemon does not answer on {sock} (is dockerd running?): {detail}"

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def labels(self, role: str, instance_id: str = "", socket_dir: str = "") -> dict[str, str]:
        return {
            LABEL_STORE: self.store_label,
            LABEL_ROLE: role,
            LABEL_INSTANCE: instance_id,
            LABEL_SOCKET: socket_dir,
        }

    async def own_containers(self) -> list[dict[str, Any]]:
        """Every container (running or not) that carries this store's label."""
        api = await self.api()
        found = await self.call(
            api.containers, all=True, filters={"label": f"{LABEL_STORE}={self.store_label}"}
        )
        return list(found)

    async def remove(self, container_id: str) -> None:
        """Remove a container, killing it if it runs; a missing one is already removed."""
        api = await self.api()
        with contextlib.suppress(NotFound):
            await self.call(api.remove_container, container_id, force=True, v=True)

    async def logs(self, container_id: str) -> str:
        api = await self.api()
        try:
            raw = await self.call(api.logs, container_id, tail=LOG_TAIL)
        except DockerException as exc:
            return f"(no log: {exc})"
        return tail(raw)

    def _missing_image(self) -> RuntimeError_:
        return RuntimeError_(
            f"Docker image {self.image} not found (build it with scripts/docker-image)"
        )

    async def run_throwaway(
        self, role: str, argv: list[str], *, user: str | None = None, binds: dict[str, Any] | None
    ) -> tuple[int, str]:
        """Run one short command in a network-less container; return (exit status, its output)."""
        api = await self.api()
        host_config = api.create_host_config(network_mode="none", binds=binds or {})
        try:
            created = await self.call(
                api.create_container,
                self.image,
                command=argv[1:],
                entrypoint=argv[:1],
                user=user,
                labels=self.labels(role),
                host_config=host_config,
            )
        except ImageNotFound as exc:
            raise self._missing_image() from exc
        cid = created["Id"]
        try:
            try:
                await self.call(api.start, cid)
            except APIError as exc:  # e.g. the entrypoint is not in the image
                return 127, str(exc.explanation or exc)
            async with asyncio.timeout(THROWAWAY_TIMEOUT):
                result = await asyncio.to_thread(api.wait, cid, timeout=THROWAWAY_TIMEOUT + 5)
            return int(result["StatusCode"]), await self.logs(cid)
        finally:
            await self.remove(cid)

    async def image_facts(self) -> ImageFacts:
        """Version and postgres uid/gid of the image, from one throwaway container (cached)."""
        if self._facts is not None:
            return self._facts
        api = await self.api()
        try:
            info = await self.call(api.inspect_image, self.image)
        except ImageNotFound as exc:
            raise self._missing_image() from exc
        code, out = await self.run_throwaway("probe", ["sh", "-c", _PROBE], binds=None)
        lines = out.splitlines()
        match = _VERSION_RE.search(lines[0]) if lines else None
        if code != 0 or match is None or len(lines) < 3:
            raise RuntimeError_(
                f"Docker image {self.image} has no usable Postgres (it needs postgres and initdb "
                f"on PATH and a postgres user); the probe exited {code}: {tail(out, 5)}"
            )
        major = int(match.group(1))
        self._facts = ImageFacts(
            image_id=str(info["Id"]),
            version=f"{major}.{match.group(2)}" if match.group(2) else str(major),
            major=major,
            uid=int(lines[-2]),
            gid=int(lines[-1]),
        )
        return self._facts
