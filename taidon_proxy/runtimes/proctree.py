"""Linux /proc inspection for runtimes: process state, start time, descendants, identity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # R S D T t Z X ...
    ppid: int
    pgid: int
    start_ticks: int  # clock ticks after boot: with the pid, identifies one process for good


def read_stat(pid: int) -> ProcStat | None:
    """Return the process's /proc stat, or None when there is no such process."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=rest[0],
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        start_ticks=int(rest[19]),
    )


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    st = read_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def is_stopped(pid: int) -> bool:
    """True when the process is in the stopped state (or gone: nothing left to wait for)."""
    st = read_stat(pid)
    return st is None or st.state in ("T", "t", "Z", "X")


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, parents before children (breadth first)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        st = read_stat(int(entry.name))
        if st is not None and st.state not in ("Z", "X"):
            children.setdefault(st.ppid, []).append(st.pid)
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in sorted(children.get(queue.pop(0), [])):
            found.append(child)
            queue.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def cwd(pid: int) -> Path | None:
    """The process's working directory (a postmaster's is its data directory)."""
    try:
        return Path(os.readlink(PROC / str(pid) / "cwd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def uid(pid: int) -> int | None:
    """The real uid of the process."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def is_postmaster_of(pid: int, pgdata: Path, start_ticks: int | None = None) -> bool:
    """True when `pid` is a live postgres postmaster running on `pgdata`.

    Checked by the binary name, the `-D` argument or the working directory (the postmaster
    chdirs into its data directory), and the start time when known (guards pid reuse).
    """
    st = read_stat(pid)
    if st is None or st.state in ("Z", "X"):
        return False
    if start_ticks is not None and st.start_ticks != start_ticks:
        return False
    argv = cmdline(pid)
    if not argv or Path(argv[0]).name != "postgres":
        return False
    want = os.path.realpath(pgdata)
    if cwd(pid) == Path(want):
        return True
    return any(
        a == "-D" and i + 1 < len(argv) and os.path.realpath(argv[i + 1]) == want
        for i, a in enumerate(argv)
    )


def postgres_in(pgdata: Path) -> list[int]:
    """Live postgres processes whose working directory is `pgdata` (all of one server's).

    Postgres children are session leaders of their own (setsid), so a process group does
    not hold them; their inherited working directory does, even after the postmaster died.
    """
    want = Path(os.path.realpath(pgdata))
    found: list[int] = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if cwd(pid) == want and is_alive(pid):
            argv = cmdline(pid)
            if argv and argv[0].split()[0].rsplit("/", 1)[-1] in ("postgres", "postgres:"):
                found.append(pid)
    return found


def listening_tcp_ports(pid: int) -> list[int]:
    """TCP ports on which `pid` holds a listening socket (IPv4 and IPv6)."""
    inodes: set[str] = set()
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports: list[int] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / str(pid) / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            # fields: sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
            if fields[3] == "0A" and fields[9] in inodes:
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
