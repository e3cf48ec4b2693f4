"""Copying, removing, syncing and measuring directory trees (coreutils, off the event loop)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from snapshots.proc import CommandFailed, run

_FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h


async def copy_tree(src: Path, dst: Path, *, reflink: str = "auto") -> None:
    """Copy src's content into a new dir dst keeping owners, modes, links, xattrs and holes.

    reflink is "auto", "always" or "never" (cp's --reflink).
    """
    # cp -a keeps ownership, modes, timestamps, hard links, symlinks, device nodes
    # (overlay whiteouts) and xattrs; --sparse=auto keeps holes.
    argv = ["cp", "-a", f"--reflink={reflink}", "--sparse=auto", "--", f"{src}/.", str(dst)]
    os.makedirs(dst, exist_ok=False)
    st = os.stat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)
    await run(argv)


async def remove_tree(path: Path) -> None:
    """Remove path recursively without crossing into other mounts; missing is fine."""
    if not _lexists(path):
        return
    try:
        await run(["rm", "-rf", "--one-file-system", "--", str(path)])
    except CommandFailed:
        if _lexists(path):
            raise


def _lexists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


async def sync_fs(path: Path) -> None:
    """Flush the filesystem holding path (syncfs), so a rename that follows is not ahead of data."""
    await run(["sync", "-f", str(path)], time_limit=600)


async def du_bytes(path: Path) -> int:
    """Bytes allocated under path (hard links counted once)."""
    out = await run(["du", "-s", "-x", "--block-size=1", "--", str(path)], time_limit=600)
    return int(out.split()[0])


def reflink_works(directory: Path) -> bool:
    """Probe whether the filesystem holding directory can clone file extents (FICLONE)."""
    src = directory / f".reflink-probe-{os.getpid()}"
    dst = directory / f".reflink-probe-{os.getpid()}.copy"
    try:
        src.write_bytes(b"x" * 4096)
        with src.open("rb") as fin, dst.open("wb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            except OSError:
                return False
        return True
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)
