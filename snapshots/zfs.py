"""The `zfs` backend: clones are `zfs clone`s, snapshots are promoted read-only state datasets.

Design (a zfs clone pins its origin snapshot, and a snapshot pins its dataset):
``snapshot(C, S)`` runs ``zfs snapshot DS/clones/C@S``, ``zfs clone`` of it into
``DS/states/S`` and ``zfs promote DS/states/S``, then sets it read-only. Promotion
moves ``@S`` onto the state dataset, so the working clone C becomes a clone *of the
state* and can be destroyed any time; ``clone(S, X)`` is ``zfs clone
DS/states/S@S DS/clones/X``. A state dataset is pinned by whatever was cloned from
it (clones, and later states of the same chain). Removing a snapshot whose dataset
is still pinned by later states hides it at once (its record goes) and destroys the
dataset lazily once nothing depends on it; removing one with live clones of it
raises InUse. Records live in ``meta/`` under the root (the dataset's mountpoint),
written last, so a crash leaves a state either listed and complete or not listed.
Options: ``dataset: POOL/NAME`` (required). When the dataset is mounted at root it is
used as it is; otherwise (the store lives on the dataset, or elsewhere) the backend uses
its child ``POOL/NAME/<root's name>`` mounted at root, creating it when missing (root
must then be empty): the user's dataset keeps its own mountpoint. ``placement()`` says
which;
``compression`` (default on: a chained state rewrites whole records, mostly
zeros and repeats; a pgbench state takes a fifth of its size) and ``recordsize``
(default: the pool's, 128K; 8K makes each chained state smaller still but
halves the speed of a full scan on zfs-fuse), set with ``atime=off`` (a read
would otherwise rewrite metadata in every clone) when the ``clones`` and
``states`` children are created (an existing store keeps what it has; the
properties only ever apply to blocks written later).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from snapshots.base import (
    AlreadyExists,
    Capabilities,
    InUse,
    NotFound,
    SnapshotError,
    UnsupportedBackend,
)
from snapshots.ids import check_id
from snapshots.proc import CommandFailed, run
from snapshots.store import Store
from snapshots.trees import remove_tree

_ZFS_TIMEOUT = 120.0
_GC_ROUNDS = 50
_BUSY_RETRIES = 40
_BUSY_PAUSE = 0.15
DEFAULT_COMPRESSION = "on"
_SIZE_SUFFIX = {"": 1, "K": 1024}


def _child_properties(options: Mapping[str, str]) -> list[str]:
    """`zfs create` flags for the clones/ and states/ children, from the backend options."""
    compression = options.get("compression", DEFAULT_COMPRESSION).strip().lower()
    if not compression or not all(ch.isalnum() or ch == "-" for ch in compression):
        raise SnapshotError(f"zfs backend: invalid compression {compression!r}")
    props = [f"compression={compression}", "atime=off"]
    if "recordsize" in options:
        size = options["recordsize"].strip().upper()
        digits, suffix = size.rstrip("K"), size[len(size.rstrip("K")) :]
        ok = digits.isdigit() and suffix in _SIZE_SUFFIX
        value = int(digits) * _SIZE_SUFFIX[suffix] if ok else 0
        if value < 512 or value > 128 * 1024 or value & (value - 1):
            raise SnapshotError(
                f"zfs backend: recordsize must be a power of 2, 512..128K: {size!r}"
            )
        props.append(f"recordsize={value}")
    return [arg for prop in props for arg in ("-o", prop)]


class ZfsBackend:
    """Needs the zfs tool and a dataset mounted at root; every operation is O(1) in data size."""

    def __init__(self, root: Path, options: Mapping[str, str] | None = None) -> None:
        dataset = (options or {}).get("dataset", "")
        if not dataset:
            raise UnsupportedBackend(
                "zfs backend: options must name a dataset (dataset: POOL/NAME)"
            )
        if shutil.which("zfs") is None:
            raise UnsupportedBackend("zfs backend: the zfs tool is missing (install zfs-fuse)")
        self._configured = dataset
        self._ds = dataset
        self._placement = ""
        self._child_props = _child_properties(options or {})
        self._store = Store(root)
        self._checked = False
        self._inflight_clones: Counter[str] = Counter()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            name="zfs",
            instant_clone=True,
            shares_blocks=True,
            needs_root=True,
            live_snapshot=True,
            atomic_snapshot=True,
        )

    @property
    def root(self) -> Path:
        return self._store.root

    # Protocol ------------------------------------------------------------

    async def create(self, clone_id: str) -> Path:
        await self._check()
        with self._store.claim("clone", clone_id):
            self._refuse_existing_clone(clone_id)
            rec = {"origin": None, "ready": False}
            await self._store.put_record("clone", clone_id, rec)
            await self._make_clone(clone_id, ["zfs", "create", self._clone_ds(clone_id)])
            os.chmod(self._store.clone_dir(clone_id), 0o755)
            await self._store.put_record("clone", clone_id, {**rec, "ready": True})
            return self._store.clone_dir(clone_id)

    async def clone(self, snap_id: str, clone_id: str) -> Path:
        await self._check()
        with self._store.claim("clone", clone_id):
            await self.snapshot_path(snap_id)
            if self._store.is_claimed("snap", snap_id):
                raise NotFound(f"snapshot {snap_id} is being made or removed")
            self._refuse_existing_clone(clone_id)
            self._inflight_clones[snap_id] += 1
            try:
                # One record, after the dataset: recovery destroys clone datasets no
                # record names, so a crash half-way leaves nothing behind.
                origin = f"{self._state_ds(snap_id)}@{snap_id}"
                argv = ["zfs", "clone", origin, self._clone_ds(clone_id)]
                await self._make_clone(clone_id, argv)
                try:
                    rec = {"origin": snap_id, "ready": True}
                    await self._store.put_record("clone", clone_id, rec)
                except BaseException:
                    with contextlib.suppress(SnapshotError, OSError):
                        await self._destroy_if_exists(self._clone_ds(clone_id))
                    raise
            finally:
                self._inflight_clones[snap_id] -= 1
            return self._store.clone_dir(clone_id)

    async def snapshot(self, clone_id: str, snap_id: str) -> Path:
        await self._check()
        check_id(clone_id, "clone id")
        with self._store.claim("snap", snap_id), self._store.claim("clone", clone_id):
            rec = self._store.record("clone", clone_id)
            if rec is None or not rec.get("ready"):
                raise NotFound(f"no clone {clone_id}")
            if self._store.record("snap", snap_id) is not None:
                raise AlreadyExists(f"snapshot {snap_id} already exists")
            zsnap = f"{self._clone_ds(clone_id)}@{snap_id}"
            state = self._state_ds(snap_id)
            try:
                await self._zfs("snapshot", zsnap)
                await self._zfs("clone", zsnap, state)
                # Promotion moves @snap to the state dataset: the clone no longer pins it.
                await self._zfs("promote", state)
                await self._zfs("set", "readonly=on", state)
            except SnapshotError as exc:
                with contextlib.suppress(SnapshotError):
                    await self._collect()
                raise SnapshotError(f"snapshot {snap_id} of clone {clone_id}: {exc}") from exc
            await self._store.put_record("snap", snap_id, {"source": clone_id})
        return self._state_dir(snap_id)

    async def remove_clone(self, clone_id: str) -> None:
        await self._check()
        with self._store.claim("clone", clone_id):
            await self._store.drop_record("clone", clone_id)
            await self._destroy_if_exists(self._clone_ds(clone_id))
            await remove_tree(self._store.clone_dir(clone_id))
        await self._collect()

    async def remove_snapshot(self, snap_id: str) -> None:
        await self._check()
        with self._store.claim("snap", snap_id):
            users = self._store.clones_of(snap_id)
            if users or self._inflight_clones[snap_id]:
                raise InUse(f"snapshot {snap_id} has clones: {', '.join(users) or 'in progress'}")
            await self._store.drop_record("snap", snap_id)
        await self._collect()

    async def snapshot_path(self, snap_id: str) -> Path:
        check_id(snap_id, "snapshot id")
        path = self._state_dir(snap_id)
        if self._store.record("snap", snap_id) is None or not path.is_dir():
            raise NotFound(f"no snapshot {snap_id}")
        return path

    async def list_snapshots(self) -> list[str]:
        names = self._store.record_ids("snap")
        return [s for s in names if self._state_dir(s).is_dir()]

    async def list_clones(self) -> list[str]:
        out = []
        for cid in self._store.record_ids("clone"):
            rec = self._store.record("clone", cid)
            if rec is not None and rec.get("ready"):
                out.append(cid)
        return out

    async def disk_usage(self, snap_id: str) -> int:
        await self.snapshot_path(snap_id)
        out = await run(
            ["zfs", "get", "-Hp", "-o", "value", "used", self._state_ds(snap_id)],
            time_limit=_ZFS_TIMEOUT,
        )
        return int(out.split()[0])

    async def recover(self) -> None:
        await self._check()
        store = self._store
        store.drop_stray_record_temps()
        with contextlib.suppress(CommandFailed):
            await run(["zfs", "mount", "-a"], time_limit=_ZFS_TIMEOUT)
        for name in sorted(os.listdir(store.tmp)):
            await remove_tree(store.tmp / name)
        datasets = await self._datasets()
        for sid in store.record_ids("snap"):
            if self._state_ds(sid) not in datasets:
                await store.drop_record("snap", sid)
        for cid in store.record_ids("clone"):
            rec = store.record("clone", cid)
            ok = rec is not None and rec.get("ready") and self._clone_ds(cid) in datasets
            if not ok and not store.is_claimed("clone", cid):
                await store.drop_record("clone", cid)
                await self._destroy_if_exists(self._clone_ds(cid))
        known = set(store.record_ids("clone"))
        prefix = f"{self._ds}/clones/"
        for name in sorted(datasets):
            cid = name[len(prefix) :]
            ours = name.startswith(prefix) and "/" not in cid
            if ours and cid not in known and not store.is_claimed("clone", cid):
                await self._destroy_if_exists(name)
        # Stray @snapshots of clones (a crash before promote) and unrecorded states go too.
        await self._collect()

    async def close(self) -> None:
        return None

    # Helpers -------------------------------------------------------------

    def _clone_ds(self, clone_id: str) -> str:
        return f"{self._ds}/clones/{check_id(clone_id, 'clone id')}"

    def _state_ds(self, snap_id: str) -> str:
        return f"{self._ds}/states/{check_id(snap_id, 'snapshot id')}"

    def _state_dir(self, snap_id: str) -> Path:
        return self._store.root / "states" / snap_id

    def _refuse_existing_clone(self, clone_id: str) -> None:
        if self._store.record("clone", clone_id) is not None:
            raise AlreadyExists(f"clone {clone_id} already exists")

    async def _zfs(self, *args: str) -> str:
        return await run(["zfs", *args], time_limit=_ZFS_TIMEOUT)

    async def _destroy(self, *args: str) -> None:
        """zfs destroy, retried briefly: zfs-fuse reports a just-used dataset as busy."""
        for attempt in range(_BUSY_RETRIES):
            try:
                await self._zfs("destroy", *args)
                return
            except CommandFailed as exc:
                if "busy" not in exc.stderr or attempt == _BUSY_RETRIES - 1:
                    raise
                await asyncio.sleep(_BUSY_PAUSE)

    async def placement(self) -> str:
        """Which dataset holds the states, and where it is mounted (checks it, once)."""
        await self._check()
        return self._placement

    async def _mountpoint(self, dataset: str) -> str:
        try:
            out = await self._zfs("get", "-H", "-o", "value", "mountpoint", dataset)
        except SnapshotError as exc:
            raise UnsupportedBackend(f"zfs backend: dataset {dataset}: {exc}") from exc
        return out.strip()

    async def _place(self) -> None:
        """Use the dataset if it is mounted at root, else its child mounted at root."""
        root = self._store.root
        mounted = await self._mountpoint(self._configured)
        if Path(mounted) == root:
            self._ds = self._configured
            self._placement = f"zfs dataset {self._configured} is mounted at {root}"
            return
        name = (
            root.name
            if root.name and all(c.isalnum() or c in "_-.:" for c in root.name)
            else "data"
        )
        child = f"{self._configured}/{name}"
        if child in await self._datasets(self._configured):
            at = await self._mountpoint(child)
            if Path(at) != root:
                raise UnsupportedBackend(
                    f"zfs backend: {self._configured} is mounted at {mounted}, and its child"
                    f" {child} at {at}; neither is {root} (set one's mountpoint to it)"
                )
            made = "its child dataset"
        else:
            if root.is_dir() and any(root.iterdir()):
                raise UnsupportedBackend(
                    f"zfs backend: {self._configured} is mounted at {mounted}, not {root};"
                    f" {root} is not empty, so a child dataset cannot be mounted there"
                )
            root.mkdir(parents=True, exist_ok=True)
            props = [] if Path(mounted) / name == root else ["-o", f"mountpoint={root}"]
            await self._zfs("create", *props, child)
            os.chmod(root, 0o755)
            made = "a child dataset made now:"
        self._ds = child
        self._placement = (
            f"zfs dataset {self._configured} is mounted at {mounted}, not {root}:"
            f" states live in {made} {child}, mounted at {root}"
        )

    async def _check(self) -> None:
        """Once: the dataset is placed at root, and has clones/ and states/ children."""
        if self._checked:
            return
        await self._place()
        existing = await self._datasets()
        for child in ("clones", "states"):
            if f"{self._ds}/{child}" not in existing:
                await self._zfs("create", *self._child_props, f"{self._ds}/{child}")
        self._store.ensure_layout("states")
        self._checked = True

    async def _datasets(self, under: str | None = None) -> set[str]:
        out = await self._zfs("list", "-H", "-o", "name", "-r", under or self._ds)
        return {line.strip() for line in out.splitlines() if line.strip()}

    async def _make_clone(self, clone_id: str, argv: list[str]) -> None:
        try:
            await run(argv, time_limit=_ZFS_TIMEOUT)
        except BaseException as exc:
            with contextlib.suppress(SnapshotError, OSError):
                await self._destroy_if_exists(self._clone_ds(clone_id))
                await self._store.drop_record("clone", clone_id)
            if isinstance(exc, SnapshotError):
                raise SnapshotError(f"clone {clone_id}: {exc}") from exc
            raise

    async def _destroy_if_exists(self, dataset: str) -> None:
        if dataset in await self._datasets():
            # -r takes the dataset's own snapshots; fails while something is cloned from them.
            await self._destroy("-r", dataset)

    async def _collect(self) -> None:
        """Destroy unrecorded state datasets and stray clone snapshots nothing depends on."""
        recorded = set(self._store.record_ids("snap"))
        for _ in range(_GC_ROUNDS):
            out = await self._zfs("list", "-H", "-t", "all", "-o", "name,origin", "-r", self._ds)
            rows = [line.split("\t") for line in out.splitlines() if line.strip()]
            origins = Counter(row[1] for row in rows if len(row) > 1 and row[1] != "-")
            victims = []
            for row in rows:
                name = row[0]
                if "@" in name:
                    ds, _, snap = name.partition("@")
                    stray = ds.startswith(f"{self._ds}/clones/") or (
                        ds.startswith(f"{self._ds}/states/") and snap not in recorded
                    )
                    if stray and not origins[name] and not self._store.is_claimed("snap", snap):
                        victims.append(name)
                elif name.startswith(f"{self._ds}/states/"):
                    sid = name.rsplit("/", 1)[1]
                    held = any(o.startswith(f"{name}@") for o in origins)
                    if sid not in recorded and not held and not self._store.is_claimed("snap", sid):
                        victims.append(name)
            if not victims:
                return
            for name in victims:
                with contextlib.suppress(CommandFailed):
                    await self._destroy(*(["-r"] if "@" not in name else []), name)
