"""The contract every snapshot backend must meet, run on a real filesystem of its kind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from snapshots.base import InUse, NotFound, SnapshotError
from tests.contract.snapshot_fixtures import BackendCase, mounts_under, sh

PG_UID = 101  # the postgres OS user owns data dirs
SPARSE_SIZE = 64 * 1024 * 1024


def populate(root: Path) -> None:
    """A tree with the things a Postgres data dir has: owners, modes, links, holes."""
    data = root / "pgdata"
    data.mkdir(mode=0o700)
    (data / "base").mkdir(mode=0o700)
    (data / "base" / "1").write_bytes(b"table page " * 1000)
    (data / "PG_VERSION").write_text("15\n")
    os.chmod(data / "PG_VERSION", 0o600)
    os.link(data / "PG_VERSION", data / "hardlink")
    os.symlink("base/1", data / "symlink")
    with open(data / "sparse", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE // 2)
        f.write(b"middle")
    (data / "empty_dir").mkdir(mode=0o750)
    for dirpath, dirnames, filenames in os.walk(data):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), PG_UID, PG_UID)
    os.chown(data, PG_UID, PG_UID)


def signature(root: Path) -> dict[str, Any]:
    """Everything a copy must preserve, per relative path (hard links as link groups)."""
    sig: dict[str, Any] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            entry: dict[str, Any] = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                entry["sha"] = hashlib.sha256(p.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    entry["link_group"] = inodes.setdefault(st.st_ino, rel)
            sig[rel] = entry
    return sig


def read(path: Path) -> str:
    return path.read_text()


class SnapshotContract:
    """Inherit in a test module; needs the `backend_case` fixture."""

    async def test_round_trip_keeps_content_owner_mode(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c1 = await b.create("c1")
        assert c1.is_dir() and os.listdir(c1) == []
        await asyncio.to_thread(populate, c1)
        before = signature(c1)
        snap = await b.snapshot("c1", "s1")
        assert signature(snap) == before
        assert await b.snapshot_path("s1") == snap
        c2 = await b.clone("s1", "c2")
        assert signature(c2) == before
        assert sorted(await b.list_snapshots()) == ["s1"]
        assert sorted(await b.list_clones()) == ["c1", "c2"]
        # Holes survive: the 64 MiB sparse file must not become 64 MiB on disk.
        assert os.stat(c2 / "pgdata" / "sparse").st_blocks * 512 < SPARSE_SIZE // 4
        st_a, st_b = os.stat(c2 / "pgdata" / "PG_VERSION"), os.stat(c2 / "pgdata" / "hardlink")
        assert st_a.st_ino == st_b.st_ino
        assert stat.S_IMODE(os.stat(c2 / "pgdata").st_mode) == 0o700
        assert await b.disk_usage("s1") >= 0

    async def test_ids_are_validated(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        for bad in ["", "../x", "a/b", "x" * 81, "sp ace", "dot.ted"]:
            with pytest.raises(ValueError):
                await b.create(bad)
            with pytest.raises(ValueError):
                await b.snapshot_path(bad)
        assert await b.list_clones() == []

    async def test_clone_independence(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("src")
        (c / "f").write_text("base")
        (c / "gone").write_text("x")
        await b.snapshot("src", "s")
        a, other = await b.clone("s", "a"), await b.clone("s", "b")
        (a / "f").write_text("changed in a")
        (a / "gone").unlink()
        (a / "new").write_text("new in a")
        assert read(other / "f") == "base" and (other / "gone").exists()
        assert not (other / "new").exists()
        snap = await b.snapshot_path("s")
        assert read(snap / "f") == "base" and (snap / "gone").exists()
        assert read(c / "f") == "base"

    async def test_snapshot_is_immutable(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("c")
        (c / "f").write_text("v1")
        await b.snapshot("c", "s1")
        (c / "f").write_text("v2")
        (c / "extra").write_text("later")
        snap = await b.snapshot_path("s1")
        assert read(snap / "f") == "v1" and not (snap / "extra").exists()
        clone = await b.clone("s1", "x")
        assert read(clone / "f") == "v1"
        with pytest.raises(SnapshotError):
            await b.snapshot("c", "s1")  # an id is never reused for other content

    async def test_removal_is_idempotent(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("c")
        (c / "f").write_text("x")
        await b.snapshot("c", "s")
        await b.remove_clone("c")
        await b.remove_clone("c")
        await b.remove_clone("never-existed")
        await b.remove_snapshot("s")
        await b.remove_snapshot("s")
        await b.remove_snapshot("never-existed")
        assert await b.list_snapshots() == [] and await b.list_clones() == []
        with pytest.raises(NotFound):
            await b.snapshot_path("s")
        with pytest.raises(NotFound):
            await b.clone("s", "c2")
        with pytest.raises(NotFound):
            await b.snapshot("c", "s2")
        # Ids are free again after removal.
        c = await b.create("c")
        (c / "f").write_text("again")
        await b.snapshot("c", "s")
        assert read(await b.snapshot_path("s") / "f") == "again"

    async def test_remove_snapshot_with_clones_is_in_use(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("c")
        (c / "f").write_text("x")
        await b.snapshot("c", "s")
        await b.clone("s", "k")
        with pytest.raises(InUse):
            await b.remove_snapshot("s")
        assert "s" in await b.list_snapshots()
        await b.remove_clone("k")
        await b.remove_snapshot("s")
        assert await b.list_snapshots() == []
        # The clone the snapshot was taken of is unaffected.
        assert read(c / "f") == "x"

    async def test_snapshot_keeps_clone_writable(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("w")
        (c / "keep").write_text("1")
        (c / "drop").write_text("1")
        (c / "dir").mkdir()
        (c / "dir" / "inner").write_text("1")
        await b.snapshot("w", "s1")
        (c / "keep").write_text("2")
        (c / "drop").unlink()
        for p in (c / "dir").iterdir():
            p.unlink()
        (c / "dir").rmdir()
        (c / "dir").mkdir()  # opaque dir in overlay terms
        (c / "dir" / "other").write_text("2")
        await b.snapshot("w", "s2")
        (c / "keep").write_text("3")
        s1, s2 = await b.snapshot_path("s1"), await b.snapshot_path("s2")
        assert read(s1 / "keep") == "1" and (s1 / "drop").exists()
        assert read(s2 / "keep") == "2" and not (s2 / "drop").exists()
        assert sorted(os.listdir(s2 / "dir")) == ["other"]
        assert sorted(os.listdir(s1 / "dir")) == ["inner"]
        k = await b.clone("s2", "k")
        assert sorted(os.listdir(k / "dir")) == ["other"] and not (k / "drop").exists()
        assert read(c / "keep") == "3"

    async def test_live_snapshot_with_open_files(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        assert b.capabilities.live_snapshot
        c = await b.create("live")
        f = (c / "held").open("w")
        try:
            f.write("before")
            f.flush()
            cwd_holder = os.open(c, os.O_RDONLY | os.O_DIRECTORY)
            try:
                await b.snapshot("live", "s")
            finally:
                os.close(cwd_holder)
            f.write(" after")
            f.flush()
        finally:
            f.close()
        assert read(await b.snapshot_path("s") / "held") == "before"
        assert read(c / "held") == "before after"
        (c / "more").write_text("still writable")
        await b.snapshot("live", "s2")
        assert read(await b.snapshot_path("s2") / "more") == "still writable"

    async def test_chain_of_100_states(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("chain")
        for i in range(100):
            (c / f"f{i}").write_text(str(i))
            (c / "counter").write_text(str(i))
            if i >= 2:
                (c / f"f{i - 2}").unlink()
            await b.snapshot("chain", f"s{i}")
        assert len(await b.list_snapshots()) == 100
        for i in (0, 1, 33, 64, 99):
            snap = await b.snapshot_path(f"s{i}")
            assert read(snap / "counter") == str(i)
            names = sorted(n for n in os.listdir(snap) if n.startswith("f"))
            assert names == sorted(f"f{j}" for j in range(max(0, i - 1), i + 1))
        k = await b.clone("s99", "k")
        (k / "counter").write_text("clone")
        await b.snapshot("k", "s100")
        assert read(await b.snapshot_path("s100") / "counter") == "clone"
        if backend_case.kind == "overlayfs":
            for sid in ("s99", "s100"):
                rec = json.loads((backend_case.root / "meta" / "snap" / f"{sid}.json").read_text())
                assert len(rec["layers"]) <= 32

    async def test_files_opened_for_writing_but_unchanged(self, backend_case: BackendCase) -> None:
        """Postgres opens every relation read-write; overlayfs copies such files up whole.
        Across a chain, each state must show exactly its content whatever a backend does
        with copies that changed nothing (overlayfs drops them from the new layer)."""
        b = backend_case.backend
        c = await b.create("c")
        big = os.urandom(4 * 1024 * 1024)
        (c / "d").mkdir()
        (c / "d" / "big").write_bytes(big)
        (c / "d" / "small").write_text("one")
        (c / "d" / "same_mtime").write_text("abc")
        (c / "gone").write_text("g")
        (c / "rep").mkdir()
        (c / "rep" / "old").write_text("o")
        await b.snapshot("c", "s1")
        expected = {"s1": signature(c)}
        k = await b.clone("s1", "k")
        with open(k / "d" / "big", "r+b"):
            pass  # opened for writing, nothing written
        (k / "d" / "small").write_text("two")
        st = os.stat(k / "d" / "same_mtime")
        (k / "d" / "same_mtime").write_text("xyz")  # changed bytes, old size and mtime back
        os.utime(k / "d" / "same_mtime", ns=(st.st_atime_ns, st.st_mtime_ns))
        (k / "gone").unlink()
        shutil.rmtree(k / "rep")
        (k / "rep").mkdir()
        (k / "rep" / "new").write_text("n")
        await b.snapshot("k", "s2")
        expected["s2"] = signature(k)
        for name in ("d/big", "rep/new", "d/small"):
            with open(k / name, "r+b"):
                pass
        await b.snapshot("k", "s3")
        expected["s3"] = signature(k)
        assert expected["s3"] == expected["s2"] != expected["s1"]
        assert read(k / "d" / "same_mtime") == "xyz"
        for sid, sig in expected.items():
            assert signature(await b.snapshot_path(sid)) == sig, sid
            assert signature(await b.clone(sid, f"v{sid}")) == sig, sid
        if backend_case.kind == "overlayfs":
            # The untouched 4 MiB file is not stored again by s2 or s3.
            assert await b.disk_usage("s2") < 1024 * 1024
            assert await b.disk_usage("s3") < 1024 * 1024

    async def test_close_leaves_no_mount_and_recover_brings_clones_back(
        self, backend_case: BackendCase
    ) -> None:
        """A clone outlives the process (a shared instance's clone is kept across restarts):
        close() leaves no mount of ours behind, recover() in the next process brings it back."""
        b = backend_case.backend
        c = await b.create("c")
        (c / "f").write_text("base")
        await b.snapshot("c", "s1")
        k = await b.clone("s1", "k")
        (k / "f").write_text("mine")
        await b.snapshot("k", "s2")  # two layers on overlayfs: its view is a mount
        assert read(await b.snapshot_path("s2") / "f") == "mine"
        before = set(mounts_under(Path("/")))
        await b.close()
        if backend_case.kind == "overlayfs":
            assert mounts_under(b.root) == []
        else:
            assert set(mounts_under(Path("/"))) == before
        fresh = backend_case.reopen()
        await fresh.recover()
        assert sorted(await fresh.list_clones()) == ["c", "k"]
        assert read(fresh.root / "clones" / "k" / "f") == "mine"
        assert read(await fresh.snapshot_path("s2") / "f") == "mine"
        (fresh.root / "clones" / "k" / "f").write_text("still writable")
        await fresh.snapshot("k", "s3")
        assert read(await fresh.snapshot_path("s3") / "f") == "still writable"

    async def test_recover_after_crash(self, backend_case: BackendCase) -> None:
        b = backend_case.backend
        c = await b.create("c")
        (c / "f").write_text("good")
        await b.snapshot("c", "good")
        await b.clone("good", "k")
        simulate_crash_leftovers(backend_case)
        fresh = backend_case.reopen()
        await fresh.recover()
        await fresh.recover()  # idempotent
        assert sorted(await fresh.list_snapshots()) == ["good"]
        assert sorted(await fresh.list_clones()) == ["c", "k"]
        assert read(await fresh.snapshot_path("good") / "f") == "good"
        k = fresh.root / "clones" / "k"
        assert read(k / "f") == "good"
        (k / "f").write_text("writable")
        await fresh.snapshot("k", "after")
        assert read(await fresh.snapshot_path("after") / "f") == "writable"
        assert_no_leftovers(backend_case)


def simulate_crash_leftovers(case: BackendCase) -> None:
    """What an interrupted snapshot/clone of this backend leaves behind."""
    root = case.root
    # A clone whose creation never finished.
    (root / "meta" / "clone" / "half-clone.json").write_text('{"origin": null, "ready": false}')
    (root / "meta" / "snap" / ".torn.json.1234").write_text("{")
    if case.kind.startswith("copy"):
        staging = root / "tmp" / "half.abcd"
        staging.mkdir()
        (staging / "junk").write_text("partial copy")
        (root / "snaps" / "half").mkdir()
        (root / "snaps" / "half" / "junk").write_text("renamed, record never written")
        (root / "clones" / "half-clone").mkdir()
    elif case.kind == "btrfs":
        sh(
            "btrfs",
            "subvolume",
            "snapshot",
            "-r",
            str(root / "clones" / "c"),
            str(root / "snaps" / "half"),
        )
        sh("btrfs", "subvolume", "create", str(root / "clones" / "half-clone"))
    elif case.kind == "overlayfs":
        layers = root / "layers"
        (layers / "deadbeef0000").mkdir()
        (layers / "deadbeef0000" / "junk").write_text("unreferenced layer")
        (root / "meta" / "snap" / "missing-layer.json").write_text('{"layers": ["0123456789ab"]}')
        for target in (root / "tmp" / "view-x", root / "clones" / "ghost"):
            target.mkdir()
            sh(
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"ro,lowerdir={layers}/deadbeef0000:{root}/empty",
                str(target),
            )
        # A reboot drops every mount: the real clone "k" must come back.
        sh("umount", str(root / "clones" / "k"))
    elif case.kind == "zfs":
        ds = case.options["dataset"]
        sh("zfs", "snapshot", f"{ds}/clones/c@half")
        sh("zfs", "snapshot", f"{ds}/clones/c@half2")
        sh("zfs", "clone", f"{ds}/clones/c@half2", f"{ds}/states/half2")


def assert_no_leftovers(case: BackendCase) -> None:
    root = case.root
    assert os.listdir(root / "tmp") == []
    assert not [n for n in os.listdir(root / "meta" / "snap") if n.startswith(".")]
    assert not (root / "meta" / "clone" / "half-clone.json").exists()
    if case.kind in ("copy-ext4", "copy-xfs", "btrfs"):
        assert sorted(os.listdir(root / "snaps")) == ["after", "good"]
        assert sorted(os.listdir(root / "clones")) == ["c", "k"]
    elif case.kind == "overlayfs":
        assert mounts_under(root / "tmp") == []
        assert not (root / "clones" / "ghost").exists()
        assert not (root / "layers" / "deadbeef0000").exists()
    elif case.kind == "zfs":
        ds = case.options["dataset"]
        names = sh("zfs", "list", "-H", "-t", "all", "-o", "name", "-r", ds).split()
        assert f"{ds}/clones/c@half" not in names
        assert f"{ds}/clones/c@half2" not in names
        assert f"{ds}/states/half2" not in names


class PostgresOnClone:
    """A real server: initdb into a clone, stop cleanly, snapshot, start on a clone of it."""

    async def test_postgres_starts_on_clone_without_recovery(
        self, backend_case: BackendCase
    ) -> None:
        b = backend_case.backend
        sock = make_sock_dir()
        extra = " -c recovery_init_sync_method=syncfs" if backend_case.kind == "overlayfs" else ""
        opts = f"-k {sock} -c listen_addresses='' -c fsync=off{extra}"
        servers: list[Path] = []
        try:
            c = await b.create("pg")
            data = c / "pgdata"
            data.mkdir(mode=0o700)
            os.chown(data, PG_UID, PG_UID)
            await pg(["initdb", "-D", str(data), "-A", "trust", "-U", "postgres"])
            servers.append(data)
            await pg_start(data, opts)
            await psql(sock, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42);")
            await pg(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"])
            servers.remove(data)
            await b.snapshot("pg", "pgs")
            k = await b.clone("pgs", "pgk")
            kdata = k / "pgdata"
            (kdata / "postmaster.log").unlink(missing_ok=True)
            servers.append(kdata)
            await pg_start(kdata, opts)
            assert (await psql(sock, "SELECT x FROM kept")).strip() == "42"
            log = (kdata / "postmaster.log").read_text()
            assert "not properly shut down" not in log, log
            assert "database system is ready to accept connections" in log, log
        except BaseException:
            for d in servers:
                with contextlib.suppress(OSError):
                    print(f"--- server log {d}:\n{(d / 'postmaster.log').read_text()}")
            raise
        finally:
            for d in servers:
                await pg(["pg_ctl", "-D", str(d), "-m", "immediate", "-w", "stop"], check=False)
            shutil.rmtree(sock, ignore_errors=True)


def make_sock_dir() -> Path:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tpg-"))
    os.chown(path, PG_UID, PG_UID)
    path.chmod(0o755)
    return path


async def pg(argv: list[str], *, check: bool = True, capture: bool = True) -> str:
    """Run a Postgres tool as the postgres OS user, with a time limit.

    capture=False for `pg_ctl start`: under uvloop the daemonized postmaster inherits the
    output pipes, so reading them to EOF would wait for the server to stop.
    """
    out_to = asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        "runuser", "-u", "postgres", "--", *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=out_to, stderr=out_to,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed: {(err or b'').decode()} {(out or b'').decode()}")
    return (out or b"").decode()


async def pg_start(data: Path, opts: str) -> None:
    log = data / "postmaster.log"
    argv = ["pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"]
    try:
        await pg(argv, capture=False)
    except AssertionError:
        raise AssertionError(f"pg_ctl start failed; server log:\n{log.read_text()}") from None


async def psql(sock: Path, sql: str) -> str:
    return await pg(
        [
            "psql",
            "-h",
            str(sock),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]
    )
