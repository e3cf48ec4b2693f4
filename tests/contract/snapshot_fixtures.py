"""Real filesystems for the snapshot backend contract suite: loop images, overlay, zfs-fuse."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshots.base import SnapshotBackend
from snapshots.registry import open_backend

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts and loop devices")

BACKEND_KINDS = ["copy-ext4", "copy-xfs", "overlayfs", "btrfs", "zfs"]


def sh(*argv: str, timeout: float = 120) -> str:
    """Run a setup command; fail the test (not skip) when the tool is missing or fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def retry_busy(*argv: str, attempts: int = 50) -> None:
    """Run a zfs/zpool teardown command, retrying while zfs-fuse says busy."""
    for _ in range(attempts):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode == 0 or "busy" not in proc.stderr:
            return
        time.sleep(0.2)


def make_tmp_dir(prefix: str = "taidon-t-") -> Path:
    """A dir under /tmp that the postgres user can traverse."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    path.chmod(0o755)
    return path


def mounts_under(prefix: Path) -> list[str]:
    """Mountpoints at or under prefix, deepest (latest) first."""
    found = []
    base = str(prefix)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == base or mp.startswith(base + "/"):
                found.append(mp)
    return list(reversed(found))


def unmount_all(prefix: Path) -> None:
    """Unmount everything at or under prefix (used in teardown, also after failures)."""
    for _ in range(3):
        left = mounts_under(prefix)
        if not left:
            return
        for mp in left:
            subprocess.run(["umount", mp], capture_output=True, timeout=60, check=False)
    left = mounts_under(prefix)
    for mp in left:
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=60, check=False)


def detach_loops(image: Path) -> None:
    out = subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    for line in out.splitlines():
        dev = line.split(":", 1)[0]
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def loop_fs(kind: str, size: str) -> Iterator[Path]:
    """A freshly made filesystem of kind on a loop-mounted image under /tmp."""
    base = make_tmp_dir(f"taidon-t-{kind}-")
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    try:
        sh("truncate", "-s", size, str(image))
        if kind == "xfs":
            sh("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
        elif kind == "btrfs":
            sh("mkfs.btrfs", "-q", str(image))
        elif kind == "ext4":
            sh("mkfs.ext4", "-q", "-F", str(image))
        else:
            raise ValueError(kind)
        sh("mount", "-o", "loop", str(image), str(mnt))
        mnt.chmod(0o755)
        yield mnt
    finally:
        unmount_all(mnt)
        detach_loops(image)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class ZfsPool:
    name: str
    mountpoint: Path


def _zfs_daemon_running() -> bool:
    proc = subprocess.run(["zpool", "list"], capture_output=True, timeout=30, check=False)
    return proc.returncode == 0


@contextlib.contextmanager
def zfs_pool(size: str = "1G") -> Iterator[ZfsPool]:
    """A zfs-fuse pool on an image file; starts the daemon when needed and stops it after."""
    if shutil.which("zfs-fuse") is None:
        raise RuntimeError("zfs-fuse is not installed: run scripts/setup --full")
    base = make_tmp_dir("taidon-t-zfs-")
    daemon: subprocess.Popen[bytes] | None = None
    log = None
    name = f"taidon_t_{secrets.token_hex(3)}"
    try:
        if not _zfs_daemon_running():
            log = (base / "zfs-fuse.log").open("wb")
            daemon = subprocess.Popen(["zfs-fuse", "--no-daemon"], stdout=log, stderr=log)
            deadline = time.monotonic() + 20
            while not _zfs_daemon_running():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("zfs-fuse did not start")
                time.sleep(0.2)
        image = base / "pool.img"
        sh("truncate", "-s", size, str(image))
        mnt = base / "mnt"
        sh("zpool", "create", "-m", str(mnt), name, str(image))
        mnt.chmod(0o755)
        yield ZfsPool(name, mnt)
    finally:
        retry_busy("zpool", "destroy", "-f", name)
        unmount_all(base)
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=20)
        if log is not None:
            log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def xfs_mount() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounted XFS")
    with loop_fs("xfs", "1G") as mnt:
        yield mnt


@pytest.fixture(scope="session")
def btrfs_mount() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounted btrfs")
    with loop_fs("btrfs", "1G") as mnt:
        yield mnt


@pytest.fixture(scope="session")
def zfs_store_pool() -> Iterator[ZfsPool]:
    if os.geteuid() != 0:
        pytest.skip("needs root: zfs-fuse pool")
    with zfs_pool() as pool:
        yield pool


@dataclass
class BackendCase:
    """A backend under test plus what the suite needs to reopen it and fake crashes."""

    kind: str
    root: Path
    options: dict[str, str]
    backend: SnapshotBackend

    def reopen(self) -> SnapshotBackend:
        """A new backend object on the same root, as after a process restart."""
        return open_backend(self.backend.capabilities.name, self.root, self.options)


@pytest.fixture(params=BACKEND_KINDS)
async def backend_case(request: pytest.FixtureRequest) -> AsyncIterator[BackendCase]:
    kind: str = request.param
    if os.geteuid() != 0:
        pytest.skip("needs root: every backend runs on a real mounted filesystem")
    options: dict[str, str] = {}
    cleanup_dataset: str | None = None
    if kind == "copy-ext4" or kind == "overlayfs":
        holder = make_tmp_dir()
        root = holder / "store"
    elif kind == "copy-xfs":
        holder = make_tmp_dir_in(request.getfixturevalue("xfs_mount"))
        root = holder / "store"
    elif kind == "btrfs":
        holder = make_tmp_dir_in(request.getfixturevalue("btrfs_mount"))
        root = holder / "store"
    else:
        pool: ZfsPool = request.getfixturevalue("zfs_store_pool")
        ident = secrets.token_hex(3)
        cleanup_dataset = f"{pool.name}/s{ident}"
        holder = pool.mountpoint / f"s{ident}"
        root = holder
        sh("zfs", "create", "-o", f"mountpoint={root}", cleanup_dataset)
        root.chmod(0o755)
        options = {"dataset": cleanup_dataset}
    name = kind.split("-", maxsplit=1)[0]
    backend = open_backend(name, root, options)
    try:
        yield BackendCase(kind, root, options, backend)
    finally:
        await backend.close()
        if cleanup_dataset is not None:
            retry_busy("zfs", "destroy", "-r", "-f", cleanup_dataset)
        unmount_all(holder)
        if cleanup_dataset is None:
            subprocess.run(
                ["rm", "-rf", "--one-file-system", str(holder)], check=False, timeout=300
            )


def make_tmp_dir_in(parent: Path) -> Path:
    path = Path(tempfile.mkdtemp(dir=parent, prefix="t-"))
    path.chmod(0o755)
    return path
