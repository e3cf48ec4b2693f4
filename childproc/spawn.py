"""Starting children cheaply from an event loop: vfork and a pidfd.

uvloop (and asyncio's own subprocess transport) start a child with fork(): the whole
process's page tables are copied, 4+ ms once it holds some memory, and both the snapshot
backends (cp, mount, btrfs, zfs) and the process runtime (postgres itself) start children on
the connect path. `subprocess.Popen` uses vfork() instead (well under a millisecond), and a
pidfd in the event loop reports the exit without any child watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

_KILL_WAIT_S = 5.0
SETPRIV = "/usr/bin/setpriv"  # util-linux: on every Debian system


def dies_with_parent(argv: Sequence[str]) -> list[str]:
    """argv, prefixed so the kernel SIGKILLs it when the process that started it dies.

    A migration tool outliving a killed proxy would go on writing to a build server nobody
    will commit. setpriv sets PR_SET_PDEATHSIG and execs in place (no wrapper process stays;
    the signal follows the forking thread, here the event loop's). Without setpriv: argv as is.
    """
    if not os.access(SETPRIV, os.X_OK):
        return list(argv)
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


class Child:
    """A child process started with vfork and awaited through a pidfd in the running loop."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (reaps it if it has), else None."""
        return self._popen.poll()

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the exit without blocking the loop; cancelling a waiter is harmless."""
        rc = self._popen.poll()
        if rc is not None:
            return rc
        if self._exited is None:
            self._exited = self._watch()
        return await asyncio.shield(self._exited)

    def _watch(self) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        pidfd = os.pidfd_open(self._popen.pid)

        def readable() -> None:
            rc = self._popen.poll()
            if rc is None:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not done.done():
                done.set_result(rc)

        loop.add_reader(pidfd, readable)
        readable()
        return done


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> Child:
    """Start argv without a shell; stdin is /dev/null and no other descriptor leaks in."""
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        close_fds=True,
        start_new_session=new_session,
    )
    return Child(popen)


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def run_child(
    argv: Sequence[str],
    *,
    time_limit: float,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
    new_session: bool = False,
) -> tuple[int, str, str]:
    """Run argv to completion: (exit status, stdout, stderr).

    Output goes to anonymous in-memory files rather than pipes, so a daemon the command
    leaves behind (holding its stdout) cannot make us wait, and nothing needs draining.
    On timeout or cancellation the child (its process group with new_session) is killed.
    """
    out_fd = os.memfd_create("stdout", os.MFD_CLOEXEC)
    err_fd = out_fd if merge_stderr else os.memfd_create("stderr", os.MFD_CLOEXEC)
    try:
        child = spawn(argv, stdout=out_fd, stderr=err_fd, cwd=cwd, env=env, new_session=new_session)
        try:
            async with asyncio.timeout(time_limit):
                rc = await child.wait()
        except BaseException:
            if child.returncode is None:
                if new_session:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                child.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_KILL_WAIT_S):
                        await child.wait()
            raise
        out = _read_all(out_fd)
        err = out if merge_stderr else _read_all(err_fd)
        return rc, out, err
    finally:
        os.close(out_fd)
        if err_fd != out_fd:
            os.close(err_fd)
