"""Snapshot backends: immutable snapshots of a directory and writable copy-on-write clones."""

from snapshots.base import (
    AlreadyExists,
    Capabilities,
    InUse,
    NotFound,
    SnapshotBackend,
    SnapshotError,
    UnsupportedBackend,
)
from snapshots.registry import detect, open_backend

__all__ = [
    "AlreadyExists",
    "Capabilities",
    "InUse",
    "NotFound",
    "SnapshotBackend",
    "SnapshotError",
    "UnsupportedBackend",
    "detect",
    "open_backend",
]
