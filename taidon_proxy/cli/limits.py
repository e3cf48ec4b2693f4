"""Process limits a proxy with many instances meets first: open files and processes.

Measured with benchmarks/scale.py: each per-connection instance costs the proxy about three
descriptors (client socket, server socket, the server's pidfd) and the machine five
processes (postmaster, checkpointer, background writer, WAL writer, one backend; more with
autovacuum and background workers on).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import structlog

log = structlog.get_logger("taidon.limits")

FILES_PER_INSTANCE = 4  # three measured, one to spare
FILES_BASE = 256  # listeners, the store, logs, admin clients, build tools
PROCESSES_PER_INSTANCE = 6


def raise_open_files(instances_max: int) -> int:
    """Lift the soft open-files limit to the hard one (as nginx and PgBouncer's packaging
    do); warn when even that is short for `instances.max`. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    need = FILES_BASE + FILES_PER_INSTANCE * instances_max
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "limits.open_files_low", limit=soft, needed=need, instances_max=instances_max,
            hint="raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower instances.max",
        )  # fmt: skip
    return soft


def check_processes(instances_max: int) -> None:
    """Warn when the kernel's pid space cannot hold `instances.max` servers."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return
    need = PROCESSES_PER_INSTANCE * instances_max
    if pid_max < 2 * need:  # the rest of the machine needs pids too
        log.warning(
            "limits.pids_low", pid_max=pid_max, needed=need, instances_max=instances_max,
            hint="raise kernel.pid_max or lower instances.max",
        )  # fmt: skip
