"""Choosing a snapshot backend by name (imported lazily) and detecting the best one for a root."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from snapshots.base import SnapshotBackend, UnsupportedBackend
from snapshots.mounts import fs_type, overlay_supported
from snapshots.trees import reflink_works

_BACKENDS: dict[str, tuple[str, str]] = {
    "copy": ("snapshots.copy", "CopyBackend"),
    "overlayfs": ("snapshots.overlay", "OverlayBackend"),
    "btrfs": ("snapshots.btrfs", "BtrfsBackend"),
    "zfs": ("snapshots.zfs", "ZfsBackend"),
}
NAMES = ("auto", *_BACKENDS)


def open_backend(name: str, root: Path, options: Mapping[str, str]) -> SnapshotBackend:
    """Make the backend called name (or the detected one for "auto") owning root.

    Blocking (probes the filesystem for "auto"): call it off the event loop.
    """
    if name == "auto":
        name, _ = detect(root, options)
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        raise UnsupportedBackend(
            f"unknown snapshot backend {name!r}; choose one of {', '.join(NAMES)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cast(SnapshotBackend, cls(Path(root), options))


def detect(root: Path, options: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The backend "auto" picks for root, and why. Blocking: it probes the filesystem."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    kind = fs_type(root)
    if kind == "btrfs" and shutil.which("btrfs"):
        return "btrfs", f"{root} is on btrfs"
    dataset = (options or {}).get("dataset")
    mounted = _zfs_mountpoint(dataset) if dataset and shutil.which("zfs") else None
    if mounted == str(root.resolve()):
        return "zfs", f"{root} is the mountpoint of zfs dataset {dataset}"
    if mounted is not None:  # named but mounted elsewhere: the backend mounts a child at root
        return "zfs", f"zfs dataset {dataset} is named (mounted at {mounted})"
    if reflink_works(root):
        return "copy", f"{root} is on {kind}, which supports reflinks"
    ok, why = overlay_supported()
    if ok and _overlay_mount_works(root):
        return "overlayfs", f"{root} is on {kind} without reflinks; overlay mounts work ({why})"
    return "copy", f"{root} is on {kind}: no reflinks, no overlay mounts; plain copies"


def _zfs_mountpoint(dataset: str) -> str | None:
    try:
        proc = subprocess.run(
            ["zfs", "get", "-H", "-o", "value", "mountpoint", dataset],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _overlay_mount_works(root: Path) -> bool:
    """Mount and unmount a tiny overlay under root."""
    probe = Path(tempfile.mkdtemp(prefix=".overlay-probe-", dir=root))
    dirs = {name: probe / name for name in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["mnt"])],
                capture_output=True,
                timeout=30,
                check=False,
            ).returncode
            == 0
        )
        if mounted:
            subprocess.run(
                ["umount", str(dirs["mnt"])], capture_output=True, timeout=30, check=True
            )
        return mounted
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        # --one-file-system semantics: never descend into a mount left behind.
        if not os.path.ismount(dirs["mnt"]):
            shutil.rmtree(probe, ignore_errors=True)
