"""A backend root's bookkeeping: directory layout, atomic JSON records, staging and id claims."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from snapshots.base import SnapshotError
from snapshots.ids import check_id

Kind = Literal["snap", "clone"]
_DIR_MODE = 0o755  # postgres (uid 101) must traverse down to clones' data dirs


class Store:
    """Paths and records under a backend root.

    Layout: ``snaps/ID`` (snapshot content), ``clones/ID`` (clone content or mountpoint),
    ``meta/snap/ID.json`` and ``meta/clone/ID.json`` (records), ``tmp/`` (staging and
    trash, emptied by recovery). A snapshot exists only once its record is written,
    which is always the last step of making one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.snaps = self.root / "snaps"
        self.clones = self.root / "clones"
        self.meta = self.root / "meta"
        self.tmp = self.root / "tmp"
        self._claimed: set[tuple[Kind, str]] = set()

    def ensure_layout(self, *extra: str) -> None:
        """Create the layout directories (cheap, idempotent)."""
        dirs = [self.root, self.snaps, self.clones, self.meta, self.tmp]
        dirs += [self.meta / "snap", self.meta / "clone"]
        dirs += [self.root / name for name in extra]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            if d.stat().st_mode & 0o777 != _DIR_MODE:
                d.chmod(_DIR_MODE)

    def snap_dir(self, snap_id: str) -> Path:
        return self.snaps / check_id(snap_id, "snapshot id")

    def clone_dir(self, clone_id: str) -> Path:
        return self.clones / check_id(clone_id, "clone id")

    def staging(self, label: str) -> Path:
        """A fresh, unused path under tmp/ (not created)."""
        return self.tmp / f"{label}.{secrets.token_hex(4)}"

    # Records -----------------------------------------------------------

    def _record_path(self, kind: Kind, ident: str) -> Path:
        return self.meta / kind / f"{check_id(ident)}.json"

    def record(self, kind: Kind, ident: str) -> dict[str, Any] | None:
        """The record of a snapshot or clone, or None."""
        try:
            data = json.loads(self._record_path(kind, ident).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            # A torn record cannot exist (atomic rename); treat garbage as absent.
            return None
        return data if isinstance(data, dict) else None

    def record_ids(self, kind: Kind) -> list[str]:
        """Ids with a record, sorted."""
        names = []
        for entry in os.scandir(self.meta / kind):
            if entry.name.endswith(".json"):
                names.append(entry.name[: -len(".json")])
        return sorted(names)

    async def put_record(self, kind: Kind, ident: str, data: dict[str, Any]) -> None:
        """Write a record atomically (temp file, rename); snapshot records also durably.

        Clone records are not fsynced: clones are throwaway, a clone whose record a power
        loss took away is removed by recover(), and two fsyncs per clone cost milliseconds
        on the connect path. A process crash keeps them (they are in the page cache).
        """
        path = self._record_path(kind, ident)
        await asyncio.to_thread(self._write_record, path, data, kind != "clone")

    @staticmethod
    def _write_record(path: Path, data: dict[str, Any], durable: bool = True) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        payload = json.dumps(data, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if not durable:
            return
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def drop_record(self, kind: Kind, ident: str) -> None:
        """Remove a record (missing is fine)."""
        await asyncio.to_thread(self._record_path(kind, ident).unlink, True)

    def clones_of(self, snap_id: str) -> list[str]:
        """Clones whose record names snap_id as their origin."""
        found = []
        for cid in self.record_ids("clone"):
            rec = self.record("clone", cid)
            if rec is not None and rec.get("origin") == snap_id:
                found.append(cid)
        return found

    def drop_stray_record_temps(self) -> None:
        """Remove temp files of record writes interrupted by a crash."""
        for kind in ("snap", "clone"):
            for entry in os.scandir(self.meta / kind):
                if entry.name.startswith("."):
                    os.unlink(entry.path)

    # Claims ------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, kind: Kind, ident: str) -> Iterator[None]:
        """Refuse a second concurrent operation on the same id within this process."""
        key = (kind, check_id(ident, f"{kind} id"))
        if key in self._claimed:
            raise SnapshotError(f"another operation on {kind} {ident} is in progress")
        self._claimed.add(key)
        try:
            yield
        finally:
            self._claimed.discard(key)

    def is_claimed(self, kind: Kind, ident: str) -> bool:
        return (kind, ident) in self._claimed
