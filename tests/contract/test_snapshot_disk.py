"""Snapshot backends on the edges of their filesystems: full disks, reflinks, detection."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshots.base import SnapshotError, UnsupportedBackend
from snapshots.copy import CopyBackend
from snapshots.overlay import OverlayBackend
from snapshots.registry import detect, open_backend
from tests.contract.snapshot_fixtures import ZfsPool, loop_fs, make_tmp_dir_in, retry_busy, sh

pytestmark = [pytest.mark.contract, pytest.mark.root]

if os.geteuid() != 0:
    pytest.skip("needs root: loop-mounted filesystems", allow_module_level=True)

MIB = 1024 * 1024


@pytest.fixture
def small_fs() -> Iterator[Path]:
    with loop_fs("ext4", "64M") as mnt:
        yield mnt


def fill(path: Path) -> None:
    """Write into path until the filesystem is full."""
    chunk = b"\xa5" * MIB
    with path.open("wb") as f:
        for _ in range(1024):
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return
    raise AssertionError("filesystem never filled up")


@pytest.mark.parametrize("kind", ["copy", "overlayfs"])
async def test_full_disk_fails_cleanly(small_fs: Path, kind: str) -> None:
    root = small_fs / "store"
    b = CopyBackend(root) if kind == "copy" else OverlayBackend(root)
    c = await b.create("c")
    (c / "data").write_bytes(os.urandom(12 * MIB))
    await b.snapshot("c", "s1")
    hold = None
    if kind == "overlayfs":
        # Files held open force the live path, which copies the upper dir.
        hold = (c / "data").open("rb")
    try:
        fill(c / "filler")
        with pytest.raises(SnapshotError, match="No space left on device"):
            await b.snapshot("c", "s2")
    finally:
        if hold is not None:
            hold.close()
    assert await b.list_snapshots() == ["s1"]
    assert os.listdir(root / "tmp") == []
    if kind == "copy":
        with pytest.raises(SnapshotError, match="No space left on device"):
            await b.clone("s1", "k")
        assert await b.list_clones() == ["c"]
        assert sorted(os.listdir(root / "clones")) == ["c"]
    await b.recover()
    assert await b.list_snapshots() == ["s1"]
    # Once space is back, everything works again.
    (c / "filler").unlink()
    await b.snapshot("c", "s3")
    k = await b.clone("s1", "k2")
    assert (k / "data").stat().st_size == 12 * MIB
    await b.remove_clone("k2")
    await b.remove_clone("c")


async def test_copy_on_xfs_really_reflinks(xfs_mount: Path) -> None:
    root = make_tmp_dir_in(xfs_mount) / "store"
    b = CopyBackend(root)
    assert b.capabilities.shares_blocks and b.capabilities.instant_clone
    c = await b.create("c")
    (c / "big").write_bytes(os.urandom(64 * MIB))
    os.sync()
    before = os.statvfs(xfs_mount)
    await b.snapshot("c", "s")
    for i in range(3):
        await b.clone("s", f"k{i}")
    os.sync()
    after = os.statvfs(xfs_mount)
    used = (before.f_bfree - after.f_bfree) * after.f_frsize
    # Four full copies would take 256 MiB; reflinks take metadata only.
    assert used < 8 * MIB, used


async def test_copy_on_ext4_reports_no_reflink(tmp_path: Path) -> None:
    b = CopyBackend(tmp_path / "store")
    assert not b.capabilities.shares_blocks
    with pytest.raises(SnapshotError, match="reflink"):
        CopyBackend(tmp_path / "store2", {"reflink": "always"})


def test_detect_picks_by_filesystem(
    xfs_mount: Path, btrfs_mount: Path, zfs_store_pool: ZfsPool, tmp_path: Path
) -> None:
    assert detect(make_tmp_dir_in(btrfs_mount))[0] == "btrfs"
    name, why = detect(make_tmp_dir_in(xfs_mount))
    assert name == "copy" and "reflink" in why
    # ext4: no reflinks, but we are root with overlay available.
    assert detect(tmp_path / "store")[0] == "overlayfs"
    ds = f"{zfs_store_pool.name}/detect"
    root = zfs_store_pool.mountpoint / "detect"
    sh("zfs", "create", "-o", f"mountpoint={root}", ds)
    try:
        assert detect(root, {"dataset": ds})[0] == "zfs"
        assert detect(root)[0] != "zfs"  # no dataset named, no zfs
    finally:
        retry_busy("zfs", "destroy", "-r", ds)
    backend = open_backend("auto", make_tmp_dir_in(btrfs_mount), {})
    assert backend.capabilities.name == "btrfs"


def test_backends_refuse_the_wrong_store(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedBackend, match="not btrfs"):
        open_backend("btrfs", tmp_path / "b", {})
    with pytest.raises(UnsupportedBackend, match="dataset"):
        open_backend("zfs", tmp_path / "z", {})
    with pytest.raises(UnsupportedBackend, match="unknown snapshot backend"):
        open_backend("nfs", tmp_path / "n", {})
