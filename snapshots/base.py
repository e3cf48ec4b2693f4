"""The snapshot backend interface: immutable snapshots of a directory, writable clones of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


class SnapshotError(Exception):
    """A backend operation failed; the message is safe to show to an operator."""


class UnsupportedBackend(SnapshotError):
    """The backend cannot run on this store (wrong filesystem, missing tool, no mount rights)."""


class NotFound(SnapshotError):
    """No snapshot or clone with that id."""


class InUse(SnapshotError):
    """A snapshot still has clones (or dependent snapshots) and cannot be removed."""


class AlreadyExists(SnapshotError):
    """A snapshot or clone with that id already exists."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so the service layer can choose policy without knowing the backend."""

    name: str
    # Clone cost does not grow with the snapshot's size (btrfs, zfs, overlayfs, reflink).
    instant_clone: bool
    # Snapshots of related states share unchanged blocks on disk.
    shares_blocks: bool
    # Needs root (mounts, subvolume or dataset management).
    needs_root: bool
    # A snapshot can be taken while processes hold files open in the clone (frozen server).
    live_snapshot: bool
    # The snapshot is one point in time of the whole clone (btrfs, zfs): what a running
    # server wrote is crash-consistent in it without pausing the server. Copies are not.
    atomic_snapshot: bool = False


@runtime_checkable
class SnapshotBackend(Protocol):
    """Turns a directory into an immutable snapshot and a snapshot into writable clones.

    Ids are caller-chosen strings of [A-Za-z0-9_-] (at most 80 characters). Every
    method is idempotent where that makes sense: removing what is already gone is
    not an error.
    """

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def root(self) -> Path:
        """The directory (or mountpoint) the backend owns."""
        ...

    async def create(self, clone_id: str) -> Path:
        """Make a new, empty writable directory (a clone of nothing) and return its path."""
        ...

    async def clone(self, snap_id: str, clone_id: str) -> Path:
        """Make a writable clone of a snapshot and return its path."""
        ...

    async def snapshot(self, clone_id: str, snap_id: str) -> Path:
        """Make an immutable snapshot of a clone's current content; the clone stays usable.

        Processes may hold files open in the clone when the backend's capabilities
        say live_snapshot; it is the caller's job to make the content consistent
        (stop or freeze the server). Returns the snapshot's read-only path.
        """
        ...

    async def remove_clone(self, clone_id: str) -> None: ...

    async def remove_snapshot(self, snap_id: str) -> None:
        """Remove a snapshot; raises InUse while clones of it exist."""
        ...

    async def snapshot_path(self, snap_id: str) -> Path:
        """The read-only path of a snapshot's content; raises NotFound."""
        ...

    async def list_snapshots(self) -> list[str]: ...

    async def list_clones(self) -> list[str]: ...

    async def disk_usage(self, snap_id: str) -> int:
        """Bytes this snapshot adds on disk beyond what it shares (best effort)."""
        ...

    async def recover(self) -> None:
        """Repair after a crash: remount, drop half-made snapshots, forget dead mounts."""
        ...

    async def close(self) -> None:
        """Release what the process holds. A backend whose clones are mounts may unmount
        them (overlayfs does); recover() after the next open makes them usable again."""
        ...
