"""The `btrfs` backend: clones are writable subvolume snapshots, snapshots read-only ones."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from snapshots import btrfs_ioctl
from snapshots.base import Capabilities, UnsupportedBackend
from snapshots.dirbackend import DirBackend
from snapshots.mounts import fs_type
from snapshots.proc import run
from snapshots.trees import remove_tree

_SUBVOLUME_ROOT_INODE = 256


class BtrfsBackend(DirBackend):
    """Needs the root on btrfs and the btrfs tool; every operation is O(1) in data size.

    A btrfs snapshot is atomic, so snapshots are made in place and become visible
    when their record is written.
    """

    def __init__(self, root: Path, options: Mapping[str, str] | None = None) -> None:
        if shutil.which("btrfs") is None:
            raise UnsupportedBackend(
                "btrfs backend: the btrfs tool is missing (install btrfs-progs)"
            )
        probe = Path(root)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        kind = fs_type(probe)
        if kind != "btrfs":
            raise UnsupportedBackend(f"btrfs backend: {root} is on {kind}, not btrfs")
        super().__init__(root)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            name="btrfs",
            instant_clone=True,
            shares_blocks=True,
            needs_root=True,
            live_snapshot=True,
            atomic_snapshot=True,
        )

    # Subvolume operations are ioctls (what the btrfs tool does), run in a worker thread:
    # a snapshot waits for a transaction commit, and a spawned tool would add a process.
    async def _make_empty(self, dst: Path) -> None:
        await asyncio.to_thread(btrfs_ioctl.create_subvolume, dst)
        os.chmod(dst, 0o755)

    async def _make_clone(self, src: Path, dst: Path) -> None:
        await asyncio.to_thread(btrfs_ioctl.snapshot, src, dst, read_only=False)

    async def _make_snapshot(self, src: Path, dst: Path) -> None:
        await asyncio.to_thread(btrfs_ioctl.snapshot, src, dst, read_only=True)

    async def _remove_content(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if st.st_ino == _SUBVOLUME_ROOT_INODE:
            await asyncio.to_thread(btrfs_ioctl.delete_subvolume, path)
        else:
            await remove_tree(path)

    async def _usage(self, path: Path) -> int:
        out = await run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)], time_limit=600)
        # Header "Total Exclusive Set shared Filename", then one row per path.
        rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
        return int(rows[0][1]) if rows else 0
