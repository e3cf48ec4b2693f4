"""Pid records of running instances (`<run_dir>/instances/<name>.json`): write, read, kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from taidon_proxy.runtimes import proctree
from taidon_proxy.runtimes.freezer import kill_tree, thaw_tree

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Record:
    instance_id: str
    pid: int
    start_ticks: int  # guards against pid reuse
    pgdata: str
    socket_dir: str
    started_at: float

    def is_live(self) -> bool:
        """The recorded postmaster still runs on its data directory."""
        return proctree.is_postmaster_of(self.pid, Path(self.pgdata), self.start_ticks)


class Records:
    """One JSON file per running instance, so a later proxy can find and reap it."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "instances"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def write(self, name: str, instance_id: str, pid: int, pgdata: Path, socket_dir: Path) -> None:
        st = proctree.read_stat(pid)
        record = Record(
            instance_id=instance_id,
            pid=pid,
            start_ticks=st.start_ticks if st else -1,
            pgdata=str(pgdata),
            socket_dir=str(socket_dir),
            started_at=time.time(),
        )
        self.dir.mkdir(mode=0o755, exist_ok=True)
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.path(name))

    def read(self, name: str) -> Record | None:
        """The record, or None when absent; an unreadable record is dropped with a warning."""
        path = self.path(name)
        try:
            data = json.loads(path.read_text())
            return Record(
                instance_id=str(data["instance_id"]),
                pid=int(data["pid"]),
                start_ticks=int(data["start_ticks"]),
                pgdata=str(data["pgdata"]),
                socket_dir=str(data["socket_dir"]),
                started_at=float(data["started_at"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("instance.bad_record", path=str(path))
            path.unlink(missing_ok=True)
            return None

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)


async def kill_recorded(record: Record, grace_s: float = 5.0) -> None:
    """Stop a server known only by its record: immediate shutdown, then SIGKILL of it all.

    Does nothing to the pid unless it is still that postmaster (binary, data dir, start
    time); leftover postgres processes in its data directory are killed either way.
    """
    if record.is_live():
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGQUIT)
        thaw_tree(
            [record.pid, *proctree.descendants(record.pid)]
        )  # a dead proxy may have frozen it
        if not await _gone(record, grace_s):
            kill_tree(record.pid, signal.SIGKILL)
            await _gone(record, grace_s)
    await kill_leftovers(Path(record.pgdata), grace_s)


async def kill_leftovers(pgdata: Path, within: float = 5.0) -> None:
    """SIGKILL postgres processes still running in `pgdata`; wait until they are gone.

    A killed process drops its working directory early in its exit, while it still runs:
    so the ones signalled are waited for by pid (and start time), not by directory.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    signalled: dict[int, int] = {}
    while loop.time() < deadline:
        for pid in proctree.postgres_in(pgdata):
            st = proctree.read_stat(pid)
            if st is not None:
                signalled[pid] = st.start_ticks
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        signalled = {p: t for p, t in signalled.items() if _running(p, t)}
        if not signalled and not proctree.postgres_in(pgdata):
            return
        await asyncio.sleep(0.005)


def _running(pid: int, start_ticks: int) -> bool:
    st = proctree.read_stat(pid)
    return st is not None and st.start_ticks == start_ticks and st.state not in ("Z", "X")


async def _gone(record: Record, within: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if not _running(record.pid, record.start_ticks):
            return True
        await asyncio.sleep(0.01)
    return False
