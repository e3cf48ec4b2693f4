"""The mount table: which filesystem holds a path, what is mounted where, mount and unmount."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from snapshots.proc import CommandFailed, run

_MOUNTINFO = Path("/proc/self/mountinfo")
MS_RDONLY = 1  # linux/mount.h
# mount(2) copies at most one page of option data.
MOUNT_DATA_MAX = 4095


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the fields backends need."""

    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    """Parse the current mount table (later entries shadow earlier ones)."""
    entries = []
    for line in _MOUNTINFO.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        entries.append(MountEntry(_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return entries


def mount_of(path: Path) -> MountEntry:
    """The mount holding path (longest mountpoint prefix of its real path)."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for entry in mount_table():
        mp = entry.mountpoint
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mountpoint)):
            best = entry
    if best is None:  # pragma: no cover - "/" is always mounted
        raise RuntimeError(f"no mount holds {real}")
    return best


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding path ("ext4", "btrfs", "xfs", "fuse", ...)."""
    return mount_of(path).fstype


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted exactly at path."""
    real = os.path.realpath(path)
    return any(e.mountpoint == real for e in mount_table())


async def mount(argv_tail: list[str], *, time_limit: float = 60, cwd: Path | None = None) -> None:
    """Run the mount tool with the given arguments (relative paths resolve against cwd)."""
    await run(["mount", *argv_tail], time_limit=time_limit, cwd=str(cwd) if cwd else None)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _mount_syscall(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc().mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()):
        err = ctypes.get_errno()
        raise CommandFailed(
            ["mount", "-t", fstype, source, "-o", data, str(target)],
            err,
            f"mount(2): {os.strerror(err)}",
        )


async def mount_fs(
    source: str, target: Path, fstype: str, data: str, *, readonly: bool = False
) -> None:
    """mount(2) directly, without spawning the mount tool (no fork, no mount table parsing).

    Paths inside data must be absolute (the syscall resolves them against this process's
    cwd) and data must fit in a page (MOUNT_DATA_MAX bytes). Raises CommandFailed.
    """
    if len(data.encode()) > MOUNT_DATA_MAX:
        raise ValueError(f"mount options longer than {MOUNT_DATA_MAX} bytes")
    flags = MS_RDONLY if readonly else 0
    await asyncio.to_thread(_mount_syscall, source, target, fstype, flags, data)


def _umount_syscall(path: Path) -> None:
    if _libc().umount2(os.fsencode(path), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT) and not is_mountpoint(path):
        return  # nothing mounted there
    raise CommandFailed(["umount", str(path)], err, f"umount(2): {os.strerror(err)}")


async def unmount(path: Path) -> None:
    """Unmount path if mounted; raise CommandFailed (e.g. busy: EBUSY at once) otherwise.

    umount(2) directly, never lazy.
    """
    await asyncio.to_thread(_umount_syscall, path)


def overlay_supported() -> tuple[bool, str]:
    """Whether this process can use overlayfs (root and the module present)."""
    if os.geteuid() != 0:
        return False, "overlayfs needs root to mount"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["overlay"] for line in f):
                return False, "the kernel has no overlay filesystem"
    except OSError as exc:
        return False, f"cannot read /proc/filesystems: {exc}"
    return True, "root and overlay in /proc/filesystems"
