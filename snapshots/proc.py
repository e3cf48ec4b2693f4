"""Running the external commands backends drive (cp, mount, btrfs, zfs) under a timeout."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence

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

    @property
    def no_space(self) -> bool:
        """Whether the command ran out of disk space (ENOSPC)."""
        text = self.stderr.lower()
        return "no space left" in text or "out of space" in text or "enospc" in text


async def run(
    argv: Sequence[str], *, time_limit: float = DEFAULT_TIMEOUT, cwd: str | None = None
) -> str:
    """Run argv without a shell and return its stdout; raise CommandFailed or SnapshotError."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise SnapshotError(f"command not found: {argv[0]}") from exc
    try:
        async with asyncio.timeout(time_limit):
            out, err = await proc.communicate()
    except BaseException as exc:
        # Timeout or cancellation: never leave the child running behind us.
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise SnapshotError(
                f"command timed out after {time_limit:g}s: {shlex.join(argv)}"
            ) from exc
        raise
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode or 0, err.decode(errors="replace"))
    return out.decode(errors="replace")
