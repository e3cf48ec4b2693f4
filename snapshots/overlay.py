"""The `overlayfs` backend: snapshots are chains of layer dirs, clones are overlay mounts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snapshots.base import (
    AlreadyExists,
    Capabilities,
    InUse,
    NotFound,
    SnapshotError,
    UnsupportedBackend,
)
from snapshots.ids import check_id
from snapshots.mounts import (
    MOUNT_DATA_MAX,
    is_mountpoint,
    mount,
    mount_fs,
    mount_table,
    overlay_supported,
    unmount,
)
from snapshots.proc import CommandFailed
from snapshots.store import Kind, Store
from snapshots.trees import copy_tree, du_bytes, remove_tree, sync_fs

# The kernel caps the lowerdir option at a page and the stack depth; flatten well before.
DEFAULT_MAX_LAYERS = 32
# Explicit so layers stay plain trees: no index/origin checks, no metadata-only copy-ups.
_MOUNT_OPTS = "index=off,metacopy=off"


class OverlayBackend:
    """Snapshot = ordered layers (newest first, recorded in meta/snap/ID.json).

    A clone is an overlay mount at ``clones/ID`` with the snapshot's layers as
    lowerdirs and a fresh upper and work dir under ``cw/ID``. Snapshotting a clone
    unmounts it, moves its upper dir into ``layers/`` (no copy) and remounts it on
    the new chain; when the mount is busy (a frozen server holds files open) the
    upper dir is copied instead and the clone is left mounted. A snapshot whose
    chain would exceed ``max_layers`` gets one merged layer instead. Layers are
    garbage-collected once no record names them. A snapshot's read-only view is
    its only layer or a read-only overlay mount at ``snaps/ID``, made on demand.
    Options: ``max_layers`` (default 32).

    Mounts live only as long as the process that made them: ``close()`` unmounts every
    snapshot view and clone mount (a clone keeps its record, layers and upper dir), and
    ``recover()`` unmounts views left by a crashed process and mounts kept clones again.
    Open, then ``recover()``, before using clones made by an earlier process.
    """

    def __init__(self, root: Path, options: Mapping[str, str] | None = None) -> None:
        ok, why = overlay_supported()
        if not ok:
            raise UnsupportedBackend(f"overlayfs backend: {why}")
        raw = (options or {}).get("max_layers", str(DEFAULT_MAX_LAYERS))
        if not raw.isdigit() or not 2 <= int(raw) <= 100:
            raise SnapshotError(f"overlayfs backend: max_layers must be 2..100, not {raw!r}")
        self._max_layers = int(raw)
        self._store = Store(root)
        self._layers = self._store.root / "layers"
        self._cw = self._store.root / "cw"
        self._empty = self._store.root / "empty"
        self._store.ensure_layout("layers", "cw", "empty")
        self._pending_layers: set[str] = set()
        self._inflight_clones: Counter[str] = Counter()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            name="overlayfs",
            instant_clone=True,
            shares_blocks=True,
            needs_root=True,
            live_snapshot=True,
        )

    @property
    def root(self) -> Path:
        return self._store.root

    # Protocol ------------------------------------------------------------

    async def create(self, clone_id: str) -> Path:
        with self._store.claim("clone", clone_id):
            return await self._make_clone(clone_id, None, [])

    async def clone(self, snap_id: str, clone_id: str) -> Path:
        with self._store.claim("clone", clone_id):
            layers = self._snap_layers(snap_id)
            if self._store.is_claimed("snap", snap_id):
                raise NotFound(f"snapshot {snap_id} is being made or removed")
            self._inflight_clones[snap_id] += 1
            try:
                return await self._make_clone(clone_id, snap_id, layers)
            finally:
                self._inflight_clones[snap_id] -= 1

    async def snapshot(self, clone_id: str, snap_id: str) -> Path:
        check_id(clone_id, "clone id")
        with self._store.claim("snap", snap_id), self._store.claim("clone", clone_id):
            rec = self._ready_clone(clone_id)
            if self._store.record("snap", snap_id) is not None:
                raise AlreadyExists(f"snapshot {snap_id} already exists")
            try:
                await self._snapshot(clone_id, snap_id, rec)
            except (OSError, SnapshotError) as exc:
                raise SnapshotError(f"snapshot {snap_id} of clone {clone_id}: {exc}") from exc
        return await self.snapshot_path(snap_id)

    async def remove_clone(self, clone_id: str) -> None:
        with self._store.claim("clone", clone_id):
            mnt = self._store.clone_dir(clone_id)
            try:
                await unmount(mnt)
            except CommandFailed as exc:
                raise SnapshotError(f"clone {clone_id} is still in use: {exc}") from exc
            await self._store.drop_record("clone", clone_id)
            await remove_tree(self._cw / clone_id)
            await remove_tree(mnt)
        await self._collect_layers()

    async def remove_snapshot(self, snap_id: str) -> None:
        with self._store.claim("snap", snap_id):
            users = self._store.clones_of(snap_id)
            if users or self._inflight_clones[snap_id]:
                raise InUse(f"snapshot {snap_id} has clones: {', '.join(users) or 'in progress'}")
            view = self._store.snap_dir(snap_id)
            try:
                await unmount(view)
            except CommandFailed as exc:
                raise SnapshotError(f"snapshot {snap_id} view is in use: {exc}") from exc
            await self._store.drop_record("snap", snap_id)
            await remove_tree(view)
        await self._collect_layers()

    async def snapshot_path(self, snap_id: str) -> Path:
        layers = self._snap_layers(snap_id)
        if len(layers) == 1:
            return self._layers / layers[0]
        view = self._store.snap_dir(snap_id)
        if not is_mountpoint(view):
            view.mkdir(mode=0o755, exist_ok=True)
            await self._mount(view, layers, upper=None)
        return view

    async def list_snapshots(self) -> list[str]:
        out = []
        for sid in self._store.record_ids("snap"):
            rec = self._store.record("snap", sid)
            if rec is not None and self._layers_present(rec.get("layers")):
                out.append(sid)
        return out

    async def list_clones(self) -> list[str]:
        out = []
        for cid in self._store.record_ids("clone"):
            rec = self._store.record("clone", cid)
            if rec is not None and rec.get("ready"):
                out.append(cid)
        return out

    async def disk_usage(self, snap_id: str) -> int:
        # The newest layer is what this snapshot adds over its parent chain.
        return await du_bytes(self._layers / self._snap_layers(snap_id)[0])

    async def recover(self) -> None:
        store = self._store
        store.ensure_layout("layers", "cw", "empty")
        store.drop_stray_record_temps()
        tmp_prefix = str(store.tmp) + "/"
        for entry in reversed(mount_table()):
            if entry.mountpoint.startswith(tmp_prefix):
                await unmount(Path(entry.mountpoint))
        for name in sorted(os.listdir(store.tmp)):
            await remove_tree(store.tmp / name)
        live_snaps = set(await self.list_snapshots())
        for sid in store.record_ids("snap"):
            if sid not in live_snaps:
                await store.drop_record("snap", sid)
        # Views are made again on demand: none is left from an earlier process.
        for name in sorted(os.listdir(store.snaps)):
            await unmount(store.snaps / name)
            if name not in live_snaps:
                await remove_tree(store.snaps / name)
        for cid in store.record_ids("clone"):
            if not store.is_claimed("clone", cid):
                await self._recover_clone(cid)
        known = set(store.record_ids("clone"))
        for parent in (store.clones, self._cw):
            for name in sorted(os.listdir(parent)):
                if name not in known and not store.is_claimed("clone", name):
                    await unmount(store.clones / name)
                    await remove_tree(parent / name)
        await self._collect_layers()

    async def close(self) -> None:
        """Unmount every view and clone mount; what is busy stays (SnapshotError after all)."""
        busy: list[str] = []
        for parent in (self._store.clones, self._store.snaps):
            for name in sorted(os.listdir(parent)):
                try:
                    await unmount(parent / name)
                except CommandFailed as exc:
                    busy.append(f"{parent.name}/{name}: {exc}")
        if busy:
            raise SnapshotError("still mounted (in use): " + "; ".join(busy))

    # Clones --------------------------------------------------------------

    async def _make_clone(self, clone_id: str, origin: str | None, layers: list[str]) -> Path:
        mnt = self._store.clone_dir(clone_id)
        if self._store.record("clone", clone_id) is not None:
            raise AlreadyExists(f"clone {clone_id} already exists")
        # One record, written once the mount is up: recovery unmounts and removes clone
        # dirs that no record names, so a crash half-way leaves nothing behind.
        rec: dict[str, Any] = {"origin": origin, "layers": layers, "ready": True}
        try:
            await self._reset_clone_dirs(clone_id)
            await self._mount(mnt, layers, upper=self._cw / clone_id)
        except BaseException as exc:
            with contextlib.suppress(OSError, SnapshotError):
                await self._drop_clone(clone_id)
            if isinstance(exc, OSError | SnapshotError):
                raise SnapshotError(f"clone {clone_id}: {exc}") from exc
            raise
        try:
            await self._store.put_record("clone", clone_id, rec)
        except BaseException:
            with contextlib.suppress(OSError, SnapshotError):
                await self._drop_clone(clone_id)
            raise
        return mnt

    async def _reset_clone_dirs(self, clone_id: str) -> None:
        """Fresh upper and work dirs for a clone (and its mountpoint)."""
        cw = self._cw / clone_id
        await remove_tree(cw)
        cw.mkdir(mode=0o755)
        (cw / "upper").mkdir(mode=0o755)
        (cw / "work").mkdir(mode=0o700)
        self._store.clone_dir(clone_id).mkdir(mode=0o755, exist_ok=True)

    async def _drop_clone(self, clone_id: str) -> None:
        await unmount(self._store.clone_dir(clone_id))
        await remove_tree(self._cw / clone_id)
        await remove_tree(self._store.clone_dir(clone_id))
        await self._store.drop_record("clone", clone_id)

    async def _recover_clone(self, clone_id: str) -> None:
        rec = self._store.record("clone", clone_id)
        mnt = self._store.clone_dir(clone_id)
        layers = rec.get("layers") if rec else None
        usable = (
            rec is not None
            and rec.get("ready")
            and self._layers_present(layers)
            and (self._cw / clone_id / "upper").is_dir()
        )
        if usable and is_mountpoint(mnt):
            return
        if usable and isinstance(layers, list):
            with contextlib.suppress(SnapshotError, OSError):
                await remove_tree(self._cw / clone_id / "work")
                (self._cw / clone_id / "work").mkdir(mode=0o700)
                mnt.mkdir(mode=0o755, exist_ok=True)
                await self._mount(mnt, layers, upper=self._cw / clone_id)
                return
        # Clones are throwaway: the service recreates what it still needs.
        await self._drop_clone(clone_id)

    def _ready_clone(self, clone_id: str) -> dict[str, Any]:
        rec = self._store.record("clone", clone_id)
        if rec is None or not rec.get("ready"):
            raise NotFound(f"no clone {clone_id}")
        return rec

    # Snapshots -----------------------------------------------------------

    async def _snapshot(self, clone_id: str, snap_id: str, rec: dict[str, Any]) -> None:
        mnt = self._store.clone_dir(clone_id)
        upper = self._cw / clone_id / "upper"
        base: list[str] = list(rec["layers"])
        lid = self._new_layer_id()
        try:
            await unmount(mnt)
            moved = True
        except CommandFailed:
            moved = False  # busy: files held open, copy the upper dir live
        done = False
        try:
            if moved:
                os.rename(upper, self._layers / lid)
            else:
                staging = self._store.staging(f"layer-{lid}")
                try:
                    await copy_tree(upper, staging)
                    os.rename(staging, self._layers / lid)
                except BaseException:
                    with contextlib.suppress(OSError, SnapshotError):
                        await remove_tree(staging)
                    raise
            await self._drop_unchanged(self._layers / lid, base)
            await sync_fs(self._layers / lid)
            chain = [lid, *base]
            if len(chain) > self._max_layers:
                chain = [await self._flatten(chain)]
            await self._store.put_record("snap", snap_id, {"layers": chain, "source": clone_id})
            done = True
            if moved:
                await self._store.put_record("clone", clone_id, {**rec, "layers": chain})
        finally:
            if moved and not done and (self._layers / lid).is_dir() and not upper.exists():
                os.rename(self._layers / lid, upper)  # give the clone its changes back
            self._pending_layers.discard(lid)
            if moved:
                await self._remount_after_move(clone_id)

    async def _remount_after_move(self, clone_id: str) -> None:
        rec = self._ready_clone(clone_id)
        cw = self._cw / clone_id
        upper = cw / "upper"
        if not upper.exists():
            upper.mkdir(mode=0o755)
        await remove_tree(cw / "work")
        (cw / "work").mkdir(mode=0o700)
        await self._mount(self._store.clone_dir(clone_id), rec["layers"], upper=cw)

    async def _drop_unchanged(self, layer: Path, base: list[str]) -> None:
        """Remove the files of a new layer that equal what the base chain already shows.

        A program that opens a file read-write (Postgres opens every relation that way)
        makes overlayfs copy the whole file up even if it never writes to it. Dropping
        such copies lets the lower file show through again: the view is the same, the
        layer keeps only what changed. A best-effort saving: any error leaves the rest.
        """
        if not base:
            return
        if len(base) == 1:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_drop_unchanged_files, layer, self._layers / base[0])
            return
        view = self._store.staging("base-view")
        view.mkdir(mode=0o755)
        try:
            await self._mount(view, base, upper=None)
            try:
                await asyncio.to_thread(_drop_unchanged_files, layer, view)
            finally:
                await unmount(view)
        except (OSError, SnapshotError):
            pass
        finally:
            with contextlib.suppress(OSError):
                view.rmdir()

    async def _flatten(self, chain: list[str]) -> str:
        """Merge a chain of layers into one new layer (through a read-only overlay view)."""
        flat = self._new_layer_id()
        view = self._store.staging(f"view-{flat}")
        staging = self._store.staging(f"layer-{flat}")
        view.mkdir(mode=0o755)
        try:
            await self._mount(view, chain, upper=None)
            try:
                await copy_tree(view, staging)
            finally:
                await unmount(view)
            await sync_fs(staging)
            os.rename(staging, self._layers / flat)
        except BaseException:
            self._pending_layers.discard(flat)
            with contextlib.suppress(OSError, SnapshotError):
                await remove_tree(staging)
            raise
        finally:
            with contextlib.suppress(OSError):
                view.rmdir()
        return flat

    # Layers and mounts -----------------------------------------------------

    def _new_layer_id(self) -> str:
        lid = secrets.token_hex(6)
        self._pending_layers.add(lid)
        return lid

    def _snap_layers(self, snap_id: str) -> list[str]:
        rec = self._store.record("snap", check_id(snap_id, "snapshot id"))
        layers = rec.get("layers") if rec else None
        if not isinstance(layers, list) or not self._layers_present(layers):
            raise NotFound(f"no snapshot {snap_id}")
        return [str(x) for x in layers]

    def _layers_present(self, layers: object) -> bool:
        return isinstance(layers, list) and all(
            isinstance(x, str) and (self._layers / x).is_dir() for x in layers
        )

    async def _mount(self, target: Path, layers: list[str], *, upper: Path | None) -> None:
        if upper is None and len(layers) < 2:
            raise SnapshotError("a read-only overlay view needs at least two layers")
        rw = f",upperdir={upper}/upper,workdir={upper}/work" if upper is not None else ""
        lower = ":".join(str(self._layers / x) for x in layers) if layers else str(self._empty)
        data = f"lowerdir={lower}{rw},{_MOUNT_OPTS}"
        if len(data.encode()) <= MOUNT_DATA_MAX:
            await mount_fs("overlay", target, "overlay", data, readonly=upper is None)
            return
        # A deep root and a long chain: relative lowerdirs (cwd = layers/) keep the option
        # string under a page, and only a child process can mount from another cwd.
        lower = ":".join(layers)
        opts = f"{'ro,' if upper is None else ''}lowerdir={lower}{rw},{_MOUNT_OPTS}"
        await mount(["-t", "overlay", "overlay", "-o", opts, str(target)], cwd=self._layers)

    async def _collect_layers(self) -> None:
        """Remove layers no snapshot or clone record names."""
        used: set[str] = set(self._pending_layers)
        kinds: tuple[Kind, ...] = ("snap", "clone")
        for kind in kinds:
            for ident in self._store.record_ids(kind):
                rec = self._store.record(kind, ident)
                if rec and isinstance(rec.get("layers"), list):
                    used.update(str(x) for x in rec["layers"])
        for name in sorted(os.listdir(self._layers)):
            if name not in used:
                await remove_tree(self._layers / name)


# Copy-ups that changed nothing ------------------------------------------------------

_OVERLAY_XATTR = "trusted.overlay."
# What makes a lookup not fall through to the same path below (origin, impure and the
# like only keep inode numbers stable and do not matter here).
_HIDES_LOWER = {f"{_OVERLAY_XATTR}{n}" for n in ("opaque", "redirect", "metacopy")}
_CHUNK = 1 << 20


def _drop_unchanged_files(layer: Path, lower: Path) -> None:
    """Unlink each regular file under layer equal to the file at the same path under lower
    (type, size, mode, owner, mtime, xattrs and bytes). Opaque or redirected directories
    are skipped whole: there a lower file would not show through."""
    for dirpath, dirnames, filenames in os.walk(layer):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not _hides_lower(_xattrs(here / d))]
        for name in filenames:
            path = here / name
            if _same_file(path, lower / path.relative_to(layer)):
                path.unlink()


def _hides_lower(xattrs: dict[str, bytes]) -> bool:
    return not _HIDES_LOWER.isdisjoint(xattrs)


def _xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def _plain(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in xattrs.items() if not k.startswith(_OVERLAY_XATTR)}


def _same_file(upper: Path, lower: Path) -> bool:
    try:
        su, sl = os.lstat(upper), os.lstat(lower)
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(su.st_mode) and stat.S_ISREG(sl.st_mode)) or su.st_nlink != 1:
        return False
    same_meta = (su.st_mode, su.st_uid, su.st_gid, su.st_size, su.st_mtime_ns) == (
        sl.st_mode,
        sl.st_uid,
        sl.st_gid,
        sl.st_size,
        sl.st_mtime_ns,
    )
    if not same_meta:
        return False
    xu = _xattrs(upper)
    if _hides_lower(xu) or _plain(xu) != _plain(_xattrs(lower)):
        return False
    with open(upper, "rb") as fu, open(lower, "rb") as fl:
        while True:
            a, b = fu.read(_CHUNK), fl.read(_CHUNK)
            if a != b:
                return False
            if not a:
                return True
