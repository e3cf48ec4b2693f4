"""The docker instance runtime: one container per instance from a Postgres image, no network."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import select
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from docker.errors import APIError, NotFound

from taidon_proxy.runtimes.base import (
    EngineInfo,
    InstanceHandle,
    InstanceStartError,
    RuntimeCapabilities,
    RuntimeError_,
)
from taidon_proxy.runtimes.docker_daemon import (
    DEFAULT_HOST,
    LABEL_INSTANCE,
    LABEL_ROLE,
    LABEL_SOCKET,
    DockerDaemon,
    ImageFacts,
)

# The same server and initdb settings as the process runtime: only the engine differs.
from taidon_proxy.runtimes.settings import initdb_options, server_settings

log = structlog.get_logger(__name__)

DATA_DIR = "/var/lib/postgresql/data"  # where the clone is mounted inside the container
SOCKET_DIR = "/var/run/postgresql"  # where the host's socket directory is mounted
PORT = 5432
SIGNALS = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}
START_TIMEOUT = 60.0  # container start until the server accepts connections
STOP_TIMEOUT = 60.0  # clean shutdown (checkpoint included) before SIGKILL
POLL_INTERVAL = 0.003
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL


@dataclass
class _Running:
    container_id: str
    socket_dir: Path
    pgdata: Path
    pidfd: int | None  # of the container's postmaster, seen from the host
    handle: InstanceHandle | None = None  # the one start() returned, for close()


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _name_part(text: str, limit: int) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", text)[:limit].strip("-.") or "x"


def _postgres_argv(settings: Mapping[str, str]) -> list[str]:
    merged = server_settings(settings)
    argv = ["postgres", "-D", DATA_DIR, "-c", "listen_addresses=", "-c", f"port={PORT}"]
    argv += ["-c", f"unix_socket_directories={SOCKET_DIR}"]
    for key, value in merged.items():
        argv += ["-c", f"{key}={value}"]
    return argv


def _initdb_argv(settings: Mapping[str, str]) -> list[str]:
    return ["initdb", "-D", DATA_DIR, "-A", "trust", "-U", "postgres", *initdb_options(settings)]


def _ready(pidfile: Path, before: bytes | None) -> bool:
    """True when a postmaster.pid other than the one found before start says "ready"."""
    try:
        raw = pidfile.read_bytes()
    except FileNotFoundError:
        return False
    lines = raw.split(b"\n")
    return raw != before and len(lines) > 7 and lines[7].strip() == b"ready"


def _exited(pidfd: int | None) -> bool:
    return pidfd is not None and bool(select.select([pidfd], [], [], 0)[0])


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


class DockerRuntime:
    """Runs each instance as a container; the proxy reaches it through a bind-mounted socket."""

    def __init__(
        self,
        *,
        image: str,
        run_dir: Path,
        store_label: str,
        memory: str | None = None,
        cpus: float | None = None,
        docker_host: str | None = None,
    ) -> None:
        if cpus is not None and cpus <= 0:
            raise RuntimeError_(f"runtime cpus must be positive, not {cpus}")
        self.image = image
        self.run_dir = _absolute(run_dir)
        self.store_label = store_label
        self.memory = memory
        self.cpus = cpus
        host = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self.daemon = DockerDaemon(host=host, image=image, store_label=store_label)
        self._running: dict[str, _Running] = {}

    @property
    def capabilities(self) -> RuntimeCapabilities:
        return RuntimeCapabilities(name="docker", can_freeze=True)

    async def image_facts(self) -> ImageFacts:
        return await self.daemon.image_facts()

    async def engine(self) -> EngineInfo:
        facts = await self.daemon.image_facts()
        source = f"docker:{self.image}@{facts.image_id}"
        return EngineInfo(version=facts.version, major=facts.major, source=source)

    # -- clusters -----------------------------------------------------------------------------

    async def init_cluster(self, pgdata: Path, settings: Mapping[str, str]) -> None:
        """initdb in a throwaway container as the image's postgres user, pgdata bind-mounted.

        Settings as for the process runtime (runtimes/settings.py).
        """
        argv = _initdb_argv(settings)
        facts = await self.daemon.image_facts()
        pgdata = _absolute(pgdata)
        if pgdata.exists():
            raise RuntimeError_(f"cannot initdb into {pgdata}: it exists")
        if not pgdata.parent.is_dir():
            raise RuntimeError_(f"cannot initdb into {pgdata}: no directory {pgdata.parent}")
        pgdata.mkdir(mode=0o700)
        try:
            os.chown(pgdata, facts.uid, facts.gid)
            code, out = await self.daemon.run_throwaway(
                "initdb",
                argv,
                user=f"{facts.uid}:{facts.gid}",
                binds={str(pgdata): {"bind": DATA_DIR, "mode": "rw"}},
            )
            if code != 0:
                raise RuntimeError_(f"initdb in {self.image} failed (exit {code}):\n{out}")
        except BaseException:
            shutil.rmtree(pgdata, ignore_errors=True)
            raise
        log.info("docker.cluster.initialized", pgdata=str(pgdata), image=self.image)

    # -- start --------------------------------------------------------------------------------

    def _prepare_dirs(self, facts: ImageFacts, pgdata: Path) -> Path:
        """Own the data dir as the image's postgres user; make a fresh socket dir it can write."""
        version_file = pgdata / "PG_VERSION"
        if not version_file.is_file():
            raise InstanceStartError(f"{pgdata} is not a Postgres data directory")
        data_major = version_file.read_text().strip()
        if data_major != str(facts.major):
            raise InstanceStartError(
                f"{pgdata} holds a Postgres {data_major} cluster; {self.image} runs {facts.major}"
            )
        if pgdata.stat().st_uid != facts.uid:
            _chown_tree(pgdata, facts.uid, facts.gid)
        pgdata.chmod(0o700)
        socket_dir = self.run_dir / secrets.token_hex(5)
        if len(os.fsencode(socket_dir / f".s.PGSQL.{PORT}")) > MAX_SOCKET_PATH:
            raise RuntimeError_(
                f"run directory {self.run_dir} is too long for a unix socket path "
                f"(limit {MAX_SOCKET_PATH} bytes): use a shorter run directory"
            )
        try:
            # Private: only root (the proxy) and the container's postgres reach the socket.
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            socket_dir.mkdir(mode=0o700)
            os.chown(socket_dir, facts.uid, facts.gid)
            # Some filesystems accept chown and ignore it (vfat with `quiet`, some FUSE mounts).
            if socket_dir.stat().st_uid != facts.uid:
                raise OSError(0, f"it stays owned by uid {socket_dir.stat().st_uid} after chown")
        except OSError as exc:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise RuntimeError_(
                f"cannot make a socket directory that the container's postgres (uid {facts.uid})"
                f" can write under {self.run_dir}: {exc.strerror or exc}"
            ) from exc
        return socket_dir

    def _host_config(self, api: Any, pgdata: Path, socket_dir: Path) -> Any:
        return api.create_host_config(
            binds={
                str(pgdata): {"bind": DATA_DIR, "mode": "rw"},
                str(socket_dir): {"bind": SOCKET_DIR, "mode": "rw"},
            },
            network_mode="none",
            mem_limit=self.memory,
            nano_cpus=round(self.cpus * 1e9) if self.cpus else None,
            # Postgres writes only to its data and socket dirs: nothing else needs to be writable.
            read_only=True,
            tmpfs={"/tmp": "size=64m"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )

    async def start(
        self, instance_id: str, pgdata: Path, settings: Mapping[str, str] | None = None
    ) -> InstanceHandle:
        """Run postgres in a container on pgdata; return once postmaster.pid says "ready"."""
        if not instance_id:
            raise RuntimeError_("empty instance id")
        if instance_id in self._running:
            raise RuntimeError_(f"instance {instance_id!r} is already running")
        argv = _postgres_argv(settings or {})
        facts = await self.daemon.image_facts()
        api = await self.daemon.api()
        pgdata = _absolute(pgdata)
        if any(r.pgdata == pgdata for r in self._running.values()):
            raise RuntimeError_(f"an instance is already running on {pgdata}")
        socket_dir = await asyncio.to_thread(self._prepare_dirs, facts, pgdata)
        pidfile = pgdata / "postmaster.pid"
        # A clone of a live server carries its postmaster.pid: readiness means a new one.
        before = pidfile.read_bytes() if pidfile.exists() else None
        name = f"taidon-{_name_part(self.store_label, 20)}-{_name_part(instance_id, 40)}"
        cid: str | None = None
        try:
            created = await self.daemon.call(
                api.create_container,
                self.image,
                command=argv[1:],
                entrypoint=argv[:1],
                user=f"{facts.uid}:{facts.gid}",
                labels=self.daemon.labels("instance", instance_id, str(socket_dir)),
                name=f"{name}-{socket_dir.name}",
                stop_signal=SIGNALS["fast"],
                host_config=self._host_config(api, pgdata, socket_dir),
            )
            cid = str(created["Id"])
            await self.daemon.call(api.start, cid)
            pid = int((await self.daemon.call(api.inspect_container, cid))["State"]["Pid"])
            running = _Running(cid, socket_dir, pgdata, self._pidfd(pid))
            self._running[instance_id] = running
            await self._wait_ready(running, pidfile, before)
        except BaseException as exc:
            last_lines = await self.daemon.logs(cid) if cid else ""
            await self._discard(instance_id, cid, socket_dir)
            if isinstance(exc, RuntimeError_ | asyncio.CancelledError):
                raise
            if isinstance(exc, TimeoutError):
                raise InstanceStartError(
                    f"Postgres in {self.image} did not accept connections within "
                    f"{START_TIMEOUT:.0f} s; last log lines:\n{last_lines}"
                ) from exc
            raise RuntimeError_(f"cannot start a container from {self.image}: {exc}") from exc
        log.info("docker.instance.started", instance=instance_id, container=cid[:12])
        running.handle = InstanceHandle(
            instance_id=instance_id,
            pgdata=pgdata,
            socket_dir=socket_dir,
            port=PORT,
            pid=pid,
            extra={"runtime": "docker", "container_id": cid, "image": self.image},
        )
        return running.handle

    def _pidfd(self, pid: int) -> int | None:
        """A pidfd for the container's postmaster: exits seen without asking the daemon."""
        if pid <= 0 or not self.daemon.host.startswith("unix://"):
            return None  # exited already, or a remote daemon whose pids are not ours
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return None

    async def _wait_ready(self, running: _Running, pidfile: Path, before: bytes | None) -> None:
        socket = running.socket_dir / f".s.PGSQL.{PORT}"
        api = await self.daemon.api()
        async with asyncio.timeout(START_TIMEOUT):
            for polls in itertools.count():
                if _ready(pidfile, before) and socket.exists():
                    return
                exited = _exited(running.pidfd)
                # Without a pidfd (or as a backstop, every ~0.1 s) ask the daemon.
                if not exited and (running.pidfd is None or polls % 30 == 29):
                    state = await self.daemon.call(api.inspect_container, running.container_id)
                    exited = not state["State"]["Running"]
                if exited:
                    raise InstanceStartError(await self._why_exited(running))
                await asyncio.sleep(POLL_INTERVAL)

    async def _why_exited(self, running: _Running) -> str:
        """A message for a server that died during start: status, likely cause, its last lines."""
        async with asyncio.timeout(10):
            state = await self._exit_state(running)
        last_lines = await self.daemon.logs(running.container_id)
        cause = f"exit status {state['ExitCode']}"
        if state.get("OOMKilled"):
            cause += f", killed at the memory limit ({self.memory})"
        if SOCKET_DIR in last_lines and "Permission denied" in last_lines:
            cause += f", it cannot write its socket directory {running.socket_dir}"
        return (
            f"Postgres in {self.image} exited during start ({cause}); last log lines:\n"
            f"{last_lines or '(none)'}"
        )

    async def _discard(self, instance_id: str, cid: str | None, socket_dir: Path) -> None:
        """Leave nothing behind: container, socket dir, pidfd."""
        running = self._running.pop(instance_id, None)
        if running is not None and running.pidfd is not None:
            os.close(running.pidfd)
        if cid:
            with contextlib.suppress(Exception):
                await self.daemon.remove(cid)
        shutil.rmtree(socket_dir, ignore_errors=True)

    # -- stop and exit ------------------------------------------------------------------------

    async def stop(self, handle: InstanceHandle, *, mode: str = "fast") -> None:
        """Signal postgres (fast: SIGINT, immediate: SIGQUIT), SIGKILL after the timeout; remove."""
        if mode not in SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}")
        cid = handle.extra["container_id"]
        running = self._running.get(handle.instance_id)
        if running is None or running.container_id != cid:
            running = _Running(cid, handle.socket_dir, handle.pgdata, None)
        api = await self.daemon.api()
        status = -1
        try:
            state = (await self.daemon.call(api.inspect_container, cid))["State"]
            if state["Paused"]:  # a frozen postgres cannot act on the signal
                await self.daemon.call(api.unpause, cid)
            if state["Running"]:
                with contextlib.suppress(APIError):  # it may exit between inspect and kill
                    await self.daemon.call(api.kill, cid, signal=SIGNALS[mode])
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    status = await self._container_exit(running)
            except TimeoutError:
                log.warning("docker.instance.stop_timeout", instance=handle.instance_id, mode=mode)
                with contextlib.suppress(APIError):
                    await self.daemon.call(api.kill, cid, signal="SIGKILL")
                status = await self._container_exit(running)
        except NotFound:
            pass
        # Before the removal, so a concurrent wait_exit that loses the container finds it.
        handle.extra["exit_status"] = str(status)
        if self._running.get(handle.instance_id) is running:
            await self._discard(handle.instance_id, cid, handle.socket_dir)
        else:  # a handle from an earlier runtime object, or stopped already
            await self.daemon.remove(cid)
            shutil.rmtree(handle.socket_dir, ignore_errors=True)
        log.info("docker.instance.stopped", instance=handle.instance_id, status=status)

    async def _container_exit(self, running: _Running) -> int:
        """Wait until the container's postmaster exits; return the container's exit status."""
        return int((await self._exit_state(running))["ExitCode"])

    async def _exit_state(self, running: _Running) -> dict[str, Any]:
        """Wait until the container's postmaster exits; return the daemon's State of it."""
        if running.pidfd is not None:
            # A private duplicate: stop() may close the original while this waits.
            fd = os.dup(running.pidfd)
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            loop.add_reader(fd, _set_once, exited)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        api = await self.daemon.api()
        while True:  # the daemon notices the exit a moment after the kernel does
            info = await self.daemon.call(api.inspect_container, running.container_id)
            if not info["State"]["Running"]:
                return dict(info["State"])
            await asyncio.sleep(0.02 if running.pidfd is not None else 0.5)

    async def wait_exit(self, handle: InstanceHandle) -> int:
        if "exit_status" in handle.extra:
            return int(handle.extra["exit_status"])
        cid = handle.extra["container_id"]
        running = self._running.get(handle.instance_id)
        if running is None or running.container_id != cid:
            running = _Running(cid, handle.socket_dir, handle.pgdata, None)
        try:
            return await self._container_exit(running)
        except NotFound:
            return int(handle.extra.get("exit_status", "-1"))

    # -- freeze -------------------------------------------------------------------------------

    async def freeze(self, handle: InstanceHandle) -> None:
        """Pause the container (cgroup freezer): every process of the instance at once."""
        api = await self.daemon.api()
        await self.daemon.call(api.pause, handle.extra["container_id"])

    async def thaw(self, handle: InstanceHandle) -> None:
        api = await self.daemon.api()
        await self.daemon.call(api.unpause, handle.extra["container_id"])

    # -- reap and close -----------------------------------------------------------------------

    async def reap(self, keep: set[str]) -> list[str]:
        """Remove this store's containers whose instance is not in `keep`; return their ids."""
        reaped: list[str] = []
        for container in await self.daemon.own_containers():
            labels = container.get("Labels") or {}
            instance_id = labels.get(LABEL_INSTANCE, "")
            role = labels.get(LABEL_ROLE, "")
            if role == "instance" and instance_id in keep:
                continue
            await self.daemon.remove(container["Id"])
            socket_dir = Path(labels.get(LABEL_SOCKET) or "/")
            if socket_dir.parent == self.run_dir:  # never trust a label with another path
                shutil.rmtree(socket_dir, ignore_errors=True)
            running = self._running.get(instance_id)
            if running is not None and running.container_id == container["Id"]:
                await self._discard(instance_id, None, running.socket_dir)
            if role == "instance":
                reaped.append(instance_id)
        if reaped:
            log.info("docker.reaped", count=len(reaped), instances=reaped)
        return reaped

    async def close(self) -> None:
        """Stop (fast) and remove every container this object started; close the connection."""
        handles = [r.handle for r in self._running.values() if r.handle is not None]
        results = await asyncio.gather(*(self.stop(h) for h in handles), return_exceptions=True)
        for handle, result in zip(handles, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "docker.close.stop_failed", instance=handle.instance_id, error=str(result)
                )
                await self._discard(
                    handle.instance_id, handle.extra["container_id"], handle.socket_dir
                )
        self.daemon.close()
