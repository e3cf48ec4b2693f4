"""Running the snapshot backends' external commands (cp, mount, btrfs, zfs): argv lists,
bounded waits, stderr kept for the error (children start through `childproc`: vfork)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from childproc import run_child
from snapshots.base import SnapshotError

# Long enough for a full copy of a large data directory; callers pass less where it fits.
DEFAULT_TIMEOUT = 1800.0
_STDERR_LIMIT = 2000


class CommandFailed(SnapshotError):
    """An external command exited non-zero; carries its argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip()[-_STDERR_LIMIT:] or "(no error output)"
        super().__init__(f"command failed (exit {returncode}): {shlex.join(argv)}: {detail}")


async def run(
    argv: Sequence[str], *, time_limit: float = DEFAULT_TIMEOUT, cwd: str | None = None
) -> str:
    """Run argv without a shell and return its stdout; raise CommandFailed or SnapshotError."""
    try:
        rc, out, err = await run_child(argv, time_limit=time_limit, cwd=cwd)
    except FileNotFoundError as exc:
        raise SnapshotError(f"command not found: {argv[0]}") from exc
    except TimeoutError as exc:
        raise SnapshotError(f"command timed out after {time_limit:g}s: {shlex.join(argv)}") from exc
    if rc != 0:
        raise CommandFailed(argv, rc, err)
    return out
