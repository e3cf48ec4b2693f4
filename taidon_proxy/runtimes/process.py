"""The process runtime: one host `postgres` server per instance, on a private unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from childproc import Child, run_child, spawn
from taidon_proxy.runtimes import proctree
from taidon_proxy.runtimes.base import (
    EngineInfo,
    InstanceHandle,
    InstanceStartError,
    RuntimeCapabilities,
    RuntimeError_,
)
from taidon_proxy.runtimes.freezer import freeze_tree, kill_tree, thaw_tree
from taidon_proxy.runtimes.osuser import check_reachable, resolve_identity
from taidon_proxy.runtimes.records import Records, kill_leftovers, kill_recorded
from taidon_proxy.runtimes.settings import initdb_options, server_settings

log = structlog.get_logger(__name__)

DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
SETPRIV = "/usr/bin/setpriv"  # util-linux, always there on Debian
PORT = 5432
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
LOG_TAIL_LINES = 20
READY_POLL_S = 0.002

# Throwaway instances: durability off, small memory, no replication. Callers may override.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,23}")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass
class _Instance:
    handle: InstanceHandle
    proc: Child
    frozen_pids: list[int] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def short_name(instance_id: str) -> str:
    """A short file-name-safe name for an instance id (socket dir and record file)."""
    if _SAFE_ID.fullmatch(instance_id) and instance_id != "instances":
        return instance_id
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', instance_id)[:12]}-{digest}"


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class ProcessRuntime:
    """Runs each instance as a `postgres` child process of this one."""

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        os_user: str | None = None,
        run_dir: Path,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self._bin_dir = bin_dir
        self._ident = resolve_identity(os_user)
        self._run_dir = Path(os.path.abspath(run_dir))
        self._records = Records(self._run_dir)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._engine: EngineInfo | None = None
        self._instances: dict[str, _Instance] = {}
        self._starting: set[str] = set()

    @property
    def capabilities(self) -> RuntimeCapabilities:
        return RuntimeCapabilities(name="process", can_freeze=True)

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def os_user(self) -> str:
        return self._ident.name

    # -- engine -------------------------------------------------------------------------------

    async def bin_dir(self) -> Path:
        """The directory of `postgres` and `initdb`: given, else `pg_config --bindir`."""
        if self._bin_dir is None:
            found = DEFAULT_BIN_DIR
            pg_config = shutil.which("pg_config")
            if pg_config is not None:
                with contextlib.suppress(OSError, TimeoutError, RuntimeError_):
                    out = await self._run([pg_config, "--bindir"], limit_s=10.0, as_user=False)
                    candidate = Path(out.strip())
                    if (candidate / "postgres").is_file():
                        found = candidate
            self._bin_dir = found
        for tool in ("postgres", "initdb"):
            if not os.access(self._bin_dir / tool, os.X_OK):
                raise RuntimeError_(f"no executable {tool} in {self._bin_dir}")
        return self._bin_dir

    async def engine(self) -> EngineInfo:
        if self._engine is None:
            bin_dir = await self.bin_dir()
            out = await self._run([str(bin_dir / "postgres"), "--version"], limit_s=10.0)
            m = _VERSION.search(out)
            if m is None:
                raise RuntimeError_(f"cannot parse postgres --version output: {out.strip()!r}")
            major = int(m.group(1))
            version = f"{major}.{m.group(2)}" if m.group(2) else str(major)
            self._engine = EngineInfo(version=version, major=major, source=str(bin_dir))
        return self._engine

    # -- clusters -----------------------------------------------------------------------------

    async def init_cluster(self, pgdata: Path, settings: Mapping[str, str]) -> None:
        """initdb into `pgdata` (must not exist; its parent must), as the os user.

        Defaults: locale C, encoding UTF8, so a state does not depend on the host's locale.
        """
        initdb_options(settings)  # refuse bad settings before touching the disk
        pgdata = _absolute(pgdata)
        if pgdata.exists():
            raise RuntimeError_(f"cannot initdb into {pgdata}: it exists")
        if not pgdata.parent.is_dir():
            raise RuntimeError_(f"cannot initdb into {pgdata}: no directory {pgdata.parent}")
        self._open_parent(pgdata.parent)
        self._check_reachable(pgdata.parent, "data directory")
        bin_dir = await self.bin_dir()
        argv = [str(bin_dir / "initdb"), "-D", str(pgdata), "-A", "trust", "-U", "postgres"]
        argv += initdb_options(settings)
        # We create the directory so the os user needs no write access to its parent.
        pgdata.mkdir(mode=0o700)
        try:
            if self._ident.switch:
                os.chown(pgdata, self._ident.uid, self._ident.gid)
            await self._run(argv, limit_s=120.0)
        except BaseException as exc:
            shutil.rmtree(pgdata, ignore_errors=True)
            if isinstance(exc, RuntimeError_ | TimeoutError | OSError):
                raise RuntimeError_(f"initdb failed for {pgdata}: {exc}") from exc
            raise
        log.info("cluster.initialized", pgdata=str(pgdata))

    # -- start --------------------------------------------------------------------------------

    async def start(
        self, instance_id: str, pgdata: Path, settings: Mapping[str, str] | None = None
    ) -> InstanceHandle:
        """Spawn `postgres -D pgdata` and return once its status in postmaster.pid is ready."""
        if not instance_id:
            raise RuntimeError_("empty instance id")
        if instance_id in self._instances or instance_id in self._starting:
            raise RuntimeError_(f"instance {instance_id!r} is already running")
        self._starting.add(instance_id)
        try:
            return await self._start(instance_id, pgdata, settings or {})
        finally:
            self._starting.discard(instance_id)

    async def _start(
        self, instance_id: str, pgdata: Path, settings: Mapping[str, str]
    ) -> InstanceHandle:
        t0 = time.perf_counter()
        guc = server_settings(settings)
        pgdata = _absolute(pgdata)
        name = short_name(instance_id)
        socket_dir = self._run_dir / name
        socket_path = socket_dir / f".s.PGSQL.{PORT}"
        if len(os.fsencode(socket_path)) > SOCKET_PATH_MAX:
            raise RuntimeError_(
                f"socket path {socket_path} is longer than {SOCKET_PATH_MAX} bytes; "
                "use a shorter run directory"
            )
        if not (pgdata / "PG_VERSION").is_file():
            raise InstanceStartError(f"{pgdata} is not a Postgres data directory")
        self._ensure_run_dir()
        self._check_reachable(pgdata.parent, "data directory")
        self._check_reachable(self._run_dir, "run directory")
        self._clear_previous(instance_id, name, pgdata)
        await asyncio.to_thread(self._own_pgdata, pgdata)

        socket_dir.mkdir(mode=0o700)
        if self._ident.switch:
            os.chown(socket_dir, self._ident.uid, self._ident.gid)
        log_path = socket_dir / "postgres.log"
        bin_dir = await self.bin_dir()
        argv = [str(bin_dir / "postgres"), "-D", str(pgdata)]
        argv += ["-c", "listen_addresses=", "-c", f"unix_socket_directories={socket_dir}"]
        argv += ["-c", f"port={PORT}"]
        for key, value in guc.items():
            argv += ["-c", f"{key}={value}"]
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            proc = spawn(
                self._as_user(argv),
                stdout=log_fd,
                stderr=log_fd,
                cwd="/",
                env=self._child_env(),
                new_session=True,
            )
        except BaseException:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        finally:
            os.close(log_fd)
        handle = InstanceHandle(
            instance_id=instance_id,
            pgdata=pgdata,
            socket_dir=socket_dir,
            port=PORT,
            pid=proc.pid,
            extra={"runtime": "process", "log_path": str(log_path)},
        )
        inst = _Instance(handle, proc)
        self._instances[instance_id] = inst
        try:
            self._records.write(name, instance_id, proc.pid, pgdata, socket_dir)
            await self._wait_ready(inst, log_path)
        except BaseException:
            await self._kill_now(inst)
            self._forget(inst)
            raise
        ready_ms = (time.perf_counter() - t0) * 1000
        handle.extra["ready_ms"] = f"{ready_ms:.1f}"
        log.info(
            "instance.started", instance=instance_id, pid=proc.pid, ready_ms=round(ready_ms, 1)
        )
        return handle

    async def _wait_ready(self, inst: _Instance, log_path: Path) -> None:
        """Poll postmaster.pid's status line (what pg_ctl does, but every 2 ms)."""
        pid_file = inst.handle.pgdata / "postmaster.pid"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        while True:
            if inst.proc.returncode is not None:
                raise InstanceStartError(
                    f"postgres exited with status {inst.proc.returncode} during startup:\n"
                    + _tail(log_path)
                )
            with contextlib.suppress(FileNotFoundError):
                lines = pid_file.read_text().splitlines()
                ours = len(lines) >= 8 and lines[0].strip() == str(inst.proc.pid)
                if ours and lines[7].strip() == "ready":
                    return
            if loop.time() > deadline:
                raise InstanceStartError(
                    f"postgres was not ready after {self._start_timeout:.0f}s:\n" + _tail(log_path)
                )
            await asyncio.sleep(READY_POLL_S)

    def _clear_previous(self, instance_id: str, name: str, pgdata: Path) -> None:
        """Refuse a live server on the same id or data dir; remove what dead ones left."""
        record = self._records.read(name)
        if record is not None:
            if record.is_live():
                raise RuntimeError_(
                    f"instance {instance_id!r} is still running as pid {record.pid} "
                    "(started by an earlier runtime); reap it first"
                )
            self._records.remove(name)
        # A clone of a live server carries its postmaster.pid: safe to drop, the clone is
        # private, unless a server really runs on this very directory.
        pid_file = pgdata / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            old_pid = int(pid_file.read_text().splitlines()[0])
            if proctree.is_postmaster_of(old_pid, pgdata):
                raise InstanceStartError(f"a server (pid {old_pid}) is already running on {pgdata}")
        pid_file.unlink(missing_ok=True)
        shutil.rmtree(self._run_dir / name, ignore_errors=True)

    def _open_parent(self, parent: Path) -> None:
        """Let the os user traverse the parent we were given, when it is ours to change."""
        st = parent.stat()
        if self._ident.switch and st.st_uid == os.geteuid() and not st.st_mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def _own_pgdata(self, pgdata: Path) -> None:
        """Postgres wants its data dir owned by its user and not group/world accessible."""
        st = pgdata.stat()
        if self._ident.switch and st.st_uid != self._ident.uid:
            uid, gid = self._ident.uid, self._ident.gid
            os.chown(pgdata, uid, gid)
            for root, dirs, files in os.walk(pgdata):
                for entry in (*dirs, *files):
                    os.lchown(os.path.join(root, entry), uid, gid)
        if st.st_mode & 0o027:
            pgdata.chmod(0o700)

    # -- stop and exit ------------------------------------------------------------------------

    async def stop(self, handle: InstanceHandle, *, mode: str = "fast") -> None:
        """Stop cleanly (fast: SIGINT) or immediate (SIGQUIT); SIGKILL after the timeout."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}.get(
            mode
        )
        if sig is None:
            raise ValueError(f"unknown stop mode {mode!r}")
        inst = self._instances.get(handle.instance_id)
        if inst is None or inst.handle.pid != handle.pid:
            await self._stop_foreign(handle)
            return
        async with inst.lock:
            if inst.proc.returncode is None:
                inst.proc.send_signal(sig)
                thaw_tree(inst.frozen_pids)
                inst.frozen_pids = []
                try:
                    async with asyncio.timeout(self._stop_timeout):
                        await inst.proc.wait()
                except TimeoutError:
                    log.warning("instance.stop_timeout", instance=handle.instance_id, mode=mode)
                    await self._kill_now(inst)
            # After a crash, backends can outlive the postmaster for a moment.
            await kill_leftovers(handle.pgdata)
            self._forget(inst)
        log.info("instance.stopped", instance=handle.instance_id, status=inst.proc.returncode)

    async def _stop_foreign(self, handle: InstanceHandle) -> None:
        """A handle this object did not start: stop it through its record, if it is live."""
        name = short_name(handle.instance_id)
        record = self._records.read(name)
        if record is None or record.pid != handle.pid:
            return  # gone already, or the record belongs to a newer server with the same id
        await kill_recorded(record)
        self._records.remove(name)
        shutil.rmtree(self._run_dir / name, ignore_errors=True)

    async def wait_exit(self, handle: InstanceHandle) -> int:
        inst = self._instances.get(handle.instance_id)
        if inst is not None and inst.handle.pid == handle.pid:
            return await inst.proc.wait()
        if "exit_status" in handle.extra:
            return int(handle.extra["exit_status"])
        # Not our child (or already forgotten): nothing to wait on but the pid itself.
        while proctree.is_postmaster_of(handle.pid, handle.pgdata):  # noqa: ASYNC110 - no event source
            await asyncio.sleep(0.2)
        return int(handle.extra.get("exit_status", "-1"))

    async def _kill_now(self, inst: _Instance) -> None:
        """SIGKILL the server and every process of it; return once they are gone (bounded)."""
        kill_tree(inst.proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                await inst.proc.wait()
        await kill_leftovers(inst.handle.pgdata)

    def _forget(self, inst: _Instance) -> None:
        handle = inst.handle
        if inst.proc.returncode is not None:
            handle.extra["exit_status"] = str(inst.proc.returncode)
        if self._instances.get(handle.instance_id) is inst:
            del self._instances[handle.instance_id]
        name = short_name(handle.instance_id)
        self._records.remove(name)
        shutil.rmtree(self._run_dir / name, ignore_errors=True)

    # -- freeze -------------------------------------------------------------------------------

    async def freeze(self, handle: InstanceHandle) -> None:
        """SIGSTOP the postmaster, then every descendant; return once all are stopped."""
        inst = self._running(handle)
        async with inst.lock:
            if not inst.frozen_pids:
                inst.frozen_pids = await freeze_tree(inst.proc.pid)

    async def thaw(self, handle: InstanceHandle) -> None:
        """SIGCONT in reverse order of freezing; a no-op when not frozen."""
        inst = self._running(handle)
        async with inst.lock:
            thaw_tree(inst.frozen_pids)
            inst.frozen_pids = []

    def _running(self, handle: InstanceHandle) -> _Instance:
        inst = self._instances.get(handle.instance_id)
        if inst is None or inst.handle.pid != handle.pid or inst.proc.returncode is not None:
            raise RuntimeError_(f"instance {handle.instance_id!r} is not running here")
        return inst

    # -- records, reap, close -----------------------------------------------------------------

    def _ensure_run_dir(self) -> None:
        self._run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = self._run_dir.lstat()
        # Often under /tmp with a predictable name: refuse one someone else planted.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise RuntimeError_(
                f"run directory {self._run_dir} is not a directory owned by uid {os.geteuid()}"
            )
        self._run_dir.chmod(0o755)
        self._records.dir.mkdir(mode=0o755, exist_ok=True)

    async def reap(self, keep: set[str]) -> list[str]:
        """Stop recorded instances not in `keep` (an earlier proxy's leftovers); return ids."""
        reaped: list[str] = []
        for name in self._records.names():
            record = self._records.read(name)
            if record is None or record.instance_id in keep:
                continue
            inst = self._instances.get(record.instance_id)
            if inst is not None and inst.handle.pid == record.pid:
                await self.stop(inst.handle, mode="immediate")
            else:
                await kill_recorded(record)
                self._records.remove(name)
                shutil.rmtree(self._run_dir / name, ignore_errors=True)
            reaped.append(record.instance_id)
        if reaped:
            log.info("instance.reaped", instances=reaped)
        return reaped

    async def close(self) -> None:
        """Stop every instance this object started: fast, in parallel, bounded."""
        insts = list(self._instances.values())
        if not insts:
            return
        try:
            async with asyncio.timeout(self._stop_timeout + 15.0):
                await asyncio.gather(*(self.stop(i.handle) for i in insts), return_exceptions=True)
        except TimeoutError:
            for inst in insts:
                await self._kill_now(inst)
                self._forget(inst)

    # -- subprocesses -------------------------------------------------------------------------

    def _check_reachable(self, path: Path, what: str) -> None:
        check_reachable(path, self._ident, what)

    def _as_user(self, argv: list[str], as_user: bool = True) -> list[str]:
        """Prefix argv to drop to the OS user. setpriv execs in place: no wrapper process
        stays, and it works on every event loop (uvloop has no user=/group= for children)."""
        if not (as_user and self._ident.switch):
            return argv
        i = self._ident
        return [SETPRIV, f"--reuid={i.uid}", f"--regid={i.gid}", "--clear-groups", "--", *argv]

    def _child_env(self) -> dict[str, str]:
        bin_dir = self._bin_dir or DEFAULT_BIN_DIR
        return {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    async def _run(self, argv: list[str], *, limit_s: float, as_user: bool = True) -> str:
        """Run a short command to completion; return its output, raise with it on failure."""
        rc, text, _ = await run_child(
            self._as_user(argv, as_user),
            time_limit=limit_s,
            cwd="/",
            env=self._child_env(),
            merge_stderr=True,
            new_session=True,
        )
        if rc != 0:
            tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
            raise RuntimeError_(f"{Path(argv[0]).name} exited with {rc}:\n{tail}")
        return text
