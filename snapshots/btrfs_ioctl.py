"""The three btrfs subvolume ioctls the backend needs (linux/btrfs.h), without the CLI.

Each call blocks for a transaction commit at most; callers run them in a worker thread.
Errors come back as SnapshotError naming the path and the OS error (ENOSPC included).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from snapshots.base import SnapshotError

_MAGIC = 0x94
_ARGS_SIZE = 4096  # both btrfs_ioctl_vol_args and btrfs_ioctl_vol_args_v2 are 4 KiB
_PATH_NAME_MAX = 4087  # btrfs_ioctl_vol_args.name is char[4088]
_SUBVOL_NAME_MAX = 4039  # btrfs_ioctl_vol_args_v2.name is char[4040]
_SUBVOL_RDONLY = 1 << 1


def _iow(nr: int) -> int:
    return (1 << 30) | (_ARGS_SIZE << 16) | (_MAGIC << 8) | nr


_IOC_SUBVOL_CREATE = _iow(14)
_IOC_SNAP_DESTROY = _iow(15)
_IOC_SNAP_CREATE_V2 = _iow(23)


def _vol_args(name: bytes, fd: int = 0) -> bytearray:
    """struct btrfs_ioctl_vol_args {s64 fd; char name[4088];}"""
    if not name or len(name) > _PATH_NAME_MAX or b"/" in name:
        raise SnapshotError(f"btrfs: bad subvolume name {name!r}")
    buf = bytearray(_ARGS_SIZE)
    struct.pack_into("=q", buf, 0, fd)
    buf[8 : 8 + len(name)] = name
    return buf


def _vol_args_v2(name: bytes, fd: int, flags: int) -> bytearray:
    """struct btrfs_ioctl_vol_args_v2 {s64 fd; u64 transid; u64 flags; u64 unused[4];
    char name[4040];}"""
    if not name or len(name) > _SUBVOL_NAME_MAX or b"/" in name:
        raise SnapshotError(f"btrfs: bad subvolume name {name!r}")
    buf = bytearray(_ARGS_SIZE)
    struct.pack_into("=qQQ", buf, 0, fd, 0, flags)
    buf[56 : 56 + len(name)] = name
    return buf


def _on_parent(path: Path, request: int, args: bytearray, what: str) -> None:
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(parent, request, args)
    except OSError as exc:
        raise SnapshotError(f"btrfs: cannot {what} {path}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(parent)


def create_subvolume(path: Path) -> None:
    """An empty subvolume at path (its parent must exist on btrfs)."""
    _on_parent(path, _IOC_SUBVOL_CREATE, _vol_args(os.fsencode(path.name)), "create subvolume")


def snapshot(src: Path, dst: Path, *, read_only: bool) -> None:
    """A snapshot of subvolume src at dst, read-only or writable."""
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = _SUBVOL_RDONLY if read_only else 0
        args = _vol_args_v2(os.fsencode(dst.name), src_fd, flags)
        _on_parent(dst, _IOC_SNAP_CREATE_V2, args, f"snapshot {src} to")
    finally:
        os.close(src_fd)


def delete_subvolume(path: Path) -> None:
    """Delete the subvolume at path (it may hold files; nested subvolumes are refused)."""
    _on_parent(path, _IOC_SNAP_DESTROY, _vol_args(os.fsencode(path.name)), "delete subvolume")
