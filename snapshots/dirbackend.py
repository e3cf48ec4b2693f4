"""Shared logic of backends whose snapshots and clones are plain dirs (copy, btrfs)."""

from __future__ import annotations

import abc
import contextlib
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from snapshots.base import AlreadyExists, Capabilities, InUse, NotFound, SnapshotError
from snapshots.ids import check_id
from snapshots.store import Store


class DirBackend(abc.ABC):
    """Bookkeeping, crash safety and errors; subclasses only make and remove content.

    Every snapshot is made at ``snaps/ID`` and becomes visible only when its record
    is written afterwards; clones carry a record naming their origin, written before
    their content (``ready: false``) and completed after, so recovery can drop
    half-made ones.
    """

    def __init__(self, root: Path) -> None:
        self._store = Store(root)
        self._store.ensure_layout()
        self._inflight_clones: Counter[str] = Counter()

    @property
    def root(self) -> Path:
        return self._store.root

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    # Content hooks -------------------------------------------------------

    @abc.abstractmethod
    async def _make_empty(self, dst: Path) -> None: ...

    @abc.abstractmethod
    async def _make_clone(self, src: Path, dst: Path) -> None: ...

    @abc.abstractmethod
    async def _make_snapshot(self, src: Path, dst: Path) -> None: ...

    @abc.abstractmethod
    async def _remove_content(self, path: Path) -> None: ...

    @abc.abstractmethod
    async def _usage(self, path: Path) -> int: ...

    # Protocol ------------------------------------------------------------

    async def create(self, clone_id: str) -> Path:
        with self._store.claim("clone", clone_id):
            dst = self._new_clone_path(clone_id)
            await self._store.put_record("clone", clone_id, {"origin": None, "ready": False})
            await self._fill_clone(clone_id, dst, lambda: self._make_empty(dst), "create")
            await self._store.put_record("clone", clone_id, {"origin": None, "ready": True})
            return dst

    async def clone(self, snap_id: str, clone_id: str) -> Path:
        check_id(snap_id, "snapshot id")
        with self._store.claim("clone", clone_id):
            src = await self.snapshot_path(snap_id)
            if self._store.is_claimed("snap", snap_id):
                raise NotFound(f"snapshot {snap_id} is being made or removed")
            dst = self._new_clone_path(clone_id)
            self._inflight_clones[snap_id] += 1
            try:
                rec = {"origin": snap_id, "ready": False}
                await self._store.put_record("clone", clone_id, rec)
                await self._fill_clone(clone_id, dst, lambda: self._make_clone(src, dst), "clone")
                await self._store.put_record("clone", clone_id, {**rec, "ready": True})
            finally:
                self._inflight_clones[snap_id] -= 1
            return dst

    async def snapshot(self, clone_id: str, snap_id: str) -> Path:
        check_id(clone_id, "clone id")
        with self._store.claim("snap", snap_id):
            src = self._ready_clone_path(clone_id)
            dst = self._store.snap_dir(snap_id)
            if self._store.record("snap", snap_id) is not None:
                raise AlreadyExists(f"snapshot {snap_id} already exists")
            # Leftover of a crashed attempt that recover() has not seen yet.
            await self._remove_content(dst)
            try:
                await self._make_snapshot(src, dst)
            except BaseException as exc:
                with contextlib.suppress(SnapshotError, OSError):
                    await self._remove_content(dst)
                if isinstance(exc, SnapshotError | OSError):
                    raise SnapshotError(f"snapshot {snap_id} of clone {clone_id}: {exc}") from exc
                raise
            await self._store.put_record("snap", snap_id, {"source": clone_id})
            return dst

    async def remove_clone(self, clone_id: str) -> None:
        with self._store.claim("clone", clone_id):
            await self._store.drop_record("clone", clone_id)
            await self._remove_content(self._store.clone_dir(clone_id))

    async def remove_snapshot(self, snap_id: str) -> None:
        with self._store.claim("snap", snap_id):
            users = self._store.clones_of(snap_id)
            if users or self._inflight_clones[snap_id]:
                raise InUse(f"snapshot {snap_id} has clones: {', '.join(users) or 'in progress'}")
            await self._store.drop_record("snap", snap_id)
            await self._remove_content(self._store.snap_dir(snap_id))

    async def snapshot_path(self, snap_id: str) -> Path:
        path = self._store.snap_dir(snap_id)
        if self._store.record("snap", snap_id) is None or not path.is_dir():
            raise NotFound(f"no snapshot {snap_id}")
        return path

    async def list_snapshots(self) -> list[str]:
        return [s for s in self._store.record_ids("snap") if self._store.snap_dir(s).is_dir()]

    async def list_clones(self) -> list[str]:
        out = []
        for cid in self._store.record_ids("clone"):
            rec = self._store.record("clone", cid)
            if rec is not None and rec.get("ready") and self._store.clone_dir(cid).is_dir():
                out.append(cid)
        return out

    async def disk_usage(self, snap_id: str) -> int:
        return await self._usage(await self.snapshot_path(snap_id))

    async def recover(self) -> None:
        store = self._store
        store.ensure_layout()
        store.drop_stray_record_temps()
        for entry in sorted(os.listdir(store.tmp)):
            await self._remove_content(store.tmp / entry)
        snap_records = set(store.record_ids("snap"))
        for name in sorted(os.listdir(store.snaps)):
            if name not in snap_records and not store.is_claimed("snap", name):
                await self._remove_content(store.snaps / name)
        for sid in snap_records:
            if not store.snap_dir(sid).is_dir() and not store.is_claimed("snap", sid):
                await store.drop_record("snap", sid)
        ready = set(await self.list_clones())
        for cid in store.record_ids("clone"):
            if cid not in ready and not store.is_claimed("clone", cid):
                await self._remove_content(store.clone_dir(cid))
                await store.drop_record("clone", cid)
        for name in sorted(os.listdir(store.clones)):
            if name not in ready and not store.is_claimed("clone", name):
                await self._remove_content(store.clones / name)

    async def close(self) -> None:
        return None

    # Helpers -------------------------------------------------------------

    def _new_clone_path(self, clone_id: str) -> Path:
        dst = self._store.clone_dir(clone_id)
        if self._store.record("clone", clone_id) is not None:
            raise AlreadyExists(f"clone {clone_id} already exists")
        return dst

    def _ready_clone_path(self, clone_id: str) -> Path:
        rec = self._store.record("clone", clone_id)
        path = self._store.clone_dir(clone_id)
        if rec is None or not rec.get("ready") or not path.is_dir():
            raise NotFound(f"no clone {clone_id}")
        return path

    async def _fill_clone(
        self, clone_id: str, dst: Path, make: Callable[[], Awaitable[None]], what: str
    ) -> None:
        """Run make (which creates dst); on failure undo dst and the clone's record."""
        try:
            await self._remove_content(dst)  # leftover of a crashed attempt
            await make()
        except BaseException as exc:
            with contextlib.suppress(SnapshotError, OSError):
                await self._remove_content(dst)
                await self._store.drop_record("clone", clone_id)
            if isinstance(exc, SnapshotError | OSError):
                raise SnapshotError(f"{what} of clone {clone_id}: {exc}") from exc
            raise
