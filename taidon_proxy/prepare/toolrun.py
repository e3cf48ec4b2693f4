"""Run a migration tool against a build server: argv, environment, streamed output, a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from childproc import dies_with_parent
from taidon_proxy.runtimes.base import InstanceHandle

TAIL_LINES = 40
MAX_LINE = 4096  # longer lines are cut: a tool printing one huge line must not grow memory


@dataclass(frozen=True)
class ToolResult:
    returncode: int | None  # None: killed at the deadline
    tail: list[str]  # the last output lines, stdout and stderr interleaved

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def server_env(handle: InstanceHandle, database: str, user: str = "postgres") -> dict[str, str]:
    """libpq variables and a DATABASE_URL naming the build server's unix socket."""
    return libpq_env(str(handle.socket_dir), handle.port, database, user)


def libpq_env(host: str, port: int, database: str, user: str = "postgres") -> dict[str, str]:
    return {
        "PGHOST": host,
        "PGPORT": str(port),
        "PGUSER": user,
        "PGDATABASE": database,
        "PGAPPNAME": "taidon-prepare",
        "DATABASE_URL": f"postgresql://{user}@/{database}?host={host}&port={port}",
    }


async def run_tool(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    deadline_s: float,
    on_line: Callable[[str], None],
) -> ToolResult:
    """Run argv in its own process group; every output line goes to on_line as it comes.

    At the deadline the whole group is killed (a tool's children too), so nothing keeps
    writing to a build server that is about to be discarded.
    """
    proc = await asyncio.create_subprocess_exec(
        *dies_with_parent(argv),
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        limit=MAX_LINE * 4,
    )
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    async def pump() -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the buffer limit: take what is there
                raw = await proc.stdout.read(MAX_LINE)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")[:MAX_LINE]
            tail.append(line)
            on_line(line)

    try:
        async with asyncio.timeout(deadline_s):
            await pump()
            await proc.wait()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        return ToolResult(None, list(tail))
    except BaseException:
        _kill_group(proc.pid)
        await proc.wait()
        raise
    return ToolResult(proc.returncode, list(tail))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
