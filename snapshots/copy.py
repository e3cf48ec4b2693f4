"""The `copy` backend: snapshots and clones are full copies (reflinked where the filesystem can)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from snapshots.base import Capabilities, SnapshotError
from snapshots.dirbackend import DirBackend
from snapshots.trees import copy_tree, du_bytes, reflink_works, remove_tree, sync_fs

_REFLINK_MODES = ("auto", "always", "never")


class CopyBackend(DirBackend):
    """Works on any filesystem; `cp -a --reflink=auto` shares extents on XFS and btrfs.

    Snapshots are read-only by convention only. Copies are built under tmp/, synced
    and renamed into place, so a crash leaves either a whole copy or none.
    Options: ``reflink: auto|always|never`` (default auto).
    """

    def __init__(self, root: Path, options: Mapping[str, str] | None = None) -> None:
        super().__init__(root)
        mode = (options or {}).get("reflink", "auto")
        if mode not in _REFLINK_MODES:
            raise SnapshotError(
                f"copy backend: reflink must be one of {_REFLINK_MODES}, not {mode!r}"
            )
        self._reflink_detected = reflink_works(self._store.tmp)
        if mode == "always" and not self._reflink_detected:
            raise SnapshotError("copy backend: reflink=always but the filesystem cannot reflink")
        self._mode = mode

    @property
    def capabilities(self) -> Capabilities:
        shares = self._reflink_detected and self._mode != "never"
        return Capabilities(
            name="copy",
            instant_clone=shares,
            shares_blocks=shares,
            needs_root=False,
            # A frozen server's writes are already in the page cache, which cp reads.
            live_snapshot=True,
        )

    @property
    def reflink(self) -> bool:
        """Whether copies share extents (reflink detected and not disabled)."""
        return self.capabilities.shares_blocks

    async def _make_empty(self, dst: Path) -> None:
        os.mkdir(dst, 0o755)
        os.chmod(dst, 0o755)

    async def _copy_into_place(self, src: Path, dst: Path, *, durable: bool) -> None:
        staging = self._store.staging(dst.name)
        try:
            await copy_tree(src, staging, reflink=self._mode)
            if durable:
                await sync_fs(staging)
            os.rename(staging, dst)
        except BaseException:
            with contextlib.suppress(SnapshotError, OSError):
                await remove_tree(staging)
            raise

    async def _make_clone(self, src: Path, dst: Path) -> None:
        # Clones are throwaway: no sync, recovery drops unfinished ones.
        await self._copy_into_place(src, dst, durable=False)

    async def _make_snapshot(self, src: Path, dst: Path) -> None:
        await self._copy_into_place(src, dst, durable=True)

    async def _remove_content(self, path: Path) -> None:
        await remove_tree(path)

    async def _usage(self, path: Path) -> int:
        # Counts reflinked extents in full: a best-effort upper bound.
        return await du_bytes(path)
