"""Benchmark: clone time and disk use of each snapshot backend against plain copies.

Run as root: .venv/bin/python benchmarks/snapshot_clone.py [--scale 50] [--repeat 5]
Builds an empty cluster and a pgbench cluster (-s SCALE, about 17 MB per unit) once,
loads both into every backend on its own real filesystem (ext4 dir, loop XFS with
reflinks, overlay on ext4, loop btrfs, zfs-fuse pool), then prints per backend:
median clone time of each state (baseline: plain copy on ext4), connect -> first query on
a fresh clone and the first full read of the large table on it, and, on each of the two
states as base, the disk used by 10 chained states with a small real delta each, taken
the way the service takes states (process runtime, product server settings, fast stop,
snapshot). Baseline: 10 full copies; target: one state + 10 chained <= 1.2x one state.
--chain-settings and --tidy try candidate changes to how states are taken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg

from snapshots.base import SnapshotBackend
from snapshots.registry import open_backend
from taidon_proxy.prepare.builder import INITDB_SETTINGS
from taidon_proxy.prepare.session import drop_relcache_init_files
from taidon_proxy.runtimes.process import ProcessRuntime
from taidon_proxy.runtimes.settings import initdb_options
from tests.contract.snapshot_fixtures import (
    loop_fs,
    make_tmp_dir,
    retry_busy,
    sh,
    zfs_pool,
)
from tests.contract.snapshot_suite import PG_UID, make_sock_dir, pg, pg_start

KINDS = ["copy-ext4", "copy-xfs", "overlayfs", "btrfs", "zfs"]
# What the service adds for a server on an overlay mount (DESIGN.md section 6).
OVERLAY_SETTINGS = {"recovery_init_sync_method": "syncfs"}


@contextlib.contextmanager
def store_for(kind: str, size: str) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """(root, options, filesystem mountpoint) for a backend kind on a fresh filesystem."""
    if kind in ("copy-ext4", "overlayfs"):
        base = make_tmp_dir("taidon-b-")
        try:
            yield base / "store", {}, base
        finally:
            subprocess.run(
                ["umount", "-R", str(base / "store" / "clones")], capture_output=True, check=False
            )
            for mp in sorted(Path("/proc/self/mountinfo").read_text().split("\n"), reverse=True):
                fields = mp.split()
                if len(fields) > 4 and fields[4].startswith(str(base)):
                    subprocess.run(["umount", fields[4]], capture_output=True, check=False)
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    elif kind in ("copy-xfs", "btrfs"):
        with loop_fs("xfs" if kind == "copy-xfs" else "btrfs", size) as mnt:
            yield mnt / "store", {}, mnt
    else:
        with zfs_pool(size) as pool:
            ds = f"{pool.name}/store"
            root = pool.mountpoint / "store"
            sh("zfs", "create", "-o", f"mountpoint={root}", ds)
            try:
                yield root, {"dataset": ds}, pool.mountpoint
            finally:
                retry_busy("zfs", "destroy", "-r", "-f", ds)


def used_bytes(mnt: Path, dataset: str | None = None) -> int:
    os.sync()
    if dataset:
        # zfs-fuse's statfs lags; the dataset's own accounting does not.
        time.sleep(1)
        return int(sh("zfs", "get", "-Hp", "-o", "value", "used", dataset).split()[0])
    if mnt.is_mount():
        st = os.statvfs(mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    # A directory on the shared root filesystem: other writers would skew statvfs, so count
    # this store's own blocks (hard links once; -x leaves the overlay mounts out).
    out = sh("du", "-sx", "--block-size=1", str(mnt))
    return int(out.split()[0])


async def build_templates(scale: int, work: Path) -> dict[str, Path]:
    """Cleanly stopped clusters: an empty one and a pgbench one."""
    sock = make_sock_dir()
    out = {}
    try:
        for name, pgbench_scale in (("empty", 0), ("large", scale)):
            data = work / name / "pgdata"
            data.parent.mkdir(mode=0o755)
            data.mkdir(mode=0o700)
            os.chown(data, PG_UID, PG_UID)
            # The product's initdb settings (1 MB WAL segments among them).
            opts = initdb_options(INITDB_SETTINGS)
            await pg(["initdb", "-D", str(data), "-A", "trust", "-U", "postgres", *opts])
            if pgbench_scale:
                await pg_start(data, f"-k {sock} -c listen_addresses='' -c fsync=off")
                await pg(
                    [
                        "pgbench",
                        "-h",
                        str(sock),
                        "-U",
                        "postgres",
                        "-i",
                        "-q",
                        "-s",
                        str(pgbench_scale),
                        "postgres",
                    ]
                )
                await pg(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"])
            out[name] = data.parent
    finally:
        shutil.rmtree(sock, ignore_errors=True)
    return out


async def load_state(b: SnapshotBackend, template: Path, snap_id: str) -> None:
    c = await b.create(f"load-{snap_id}")
    sh("cp", "-a", f"{template}/.", str(c), timeout=1800)
    await b.snapshot(f"load-{snap_id}", snap_id)
    await b.remove_clone(f"load-{snap_id}")


async def clone_ms(b: SnapshotBackend, snap_id: str, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        await b.clone(snap_id, f"t-{snap_id}-{i}")
        times.append((time.perf_counter() - t0) * 1000)
    for i in range(repeat):
        await b.remove_clone(f"t-{snap_id}-{i}")
    return statistics.median(times)


def tidy_stopped_cluster(pgdata: Path) -> None:
    """Candidate (not what the service does): also drop the cumulative stats file of a stopped
    cluster (read and removed at startup, rewritten at shutdown; dropping it resets the
    activity counters and autovacuum's thresholds in every clone)."""
    (pgdata / "pg_stat" / "pgstat.stat").unlink(missing_ok=True)


async def chain_bytes(
    b: SnapshotBackend,
    kind: str,
    base: str,
    mnt: Path,
    dataset: str | None,
    run_dir: Path,
    extra: dict[str, str],
    tidy: bool,
) -> int:
    """Disk used by 10 chained states on `base`, each taken as the service takes one: the
    process runtime with the product's server settings, a small real change (a 100-row
    table), a fast stop, a snapshot. The working clone is counted too."""
    rt = ProcessRuntime(run_dir=run_dir)
    settings = {**(OVERLAY_SETTINGS if kind == "overlayfs" else {}), **extra}
    before = used_bytes(mnt, dataset)
    c = await b.clone(base, f"chain-{base}")
    try:
        for i in range(1, 11):
            handle = await rt.start(f"chain-{base}", c / "pgdata", settings)
            try:
                conn = await asyncpg.connect(
                    host=str(handle.socket_dir), port=handle.port, user="postgres"
                )
                try:
                    await conn.execute(
                        f"CREATE TABLE chain_t{i} AS SELECT g AS id FROM generate_series(1,100) g"
                    )
                finally:
                    await conn.close()
            finally:
                await rt.stop(handle, mode="fast")
            drop_relcache_init_files(c / "pgdata")  # as WorkSession.commit does
            if tidy:
                tidy_stopped_cluster(c / "pgdata")
            await b.snapshot(f"chain-{base}", f"chain-{base}-{i}")
    finally:
        await rt.close()
    return used_bytes(mnt, dataset) - before


async def first_use(b: SnapshotBackend, kind: str, snap_id: str, run_dir: Path) -> dict[str, float]:
    """A fresh clone: clone + start + connect + `select 1`, then a first full read of the
    largest table (overlayfs copies a relation file up on its first read-write open)."""
    rt = ProcessRuntime(run_dir=run_dir)
    settings = OVERLAY_SETTINGS if kind == "overlayfs" else {}
    t0 = time.perf_counter()
    path = await b.clone(snap_id, f"fu-{snap_id}")
    handle = await rt.start(f"fu-{snap_id}", path / "pgdata", settings)
    try:
        conn = await asyncpg.connect(host=str(handle.socket_dir), port=handle.port, user="postgres")
        try:
            await conn.fetchval("select 1")
            connect_ms = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            has_big = await conn.fetchval("select to_regclass('pgbench_accounts') is not null")
            if has_big:
                await conn.fetchval("select sum(abalance) from pgbench_accounts")
            scan_ms = (time.perf_counter() - t1) * 1000 if has_big else float("nan")
        finally:
            await conn.close()
    finally:
        await rt.stop(handle, mode="immediate")
        await rt.close()
        await b.remove_clone(f"fu-{snap_id}")
    return {"connect_ms": connect_ms, "scan_ms": scan_ms}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


async def bench(
    kind: str,
    templates: dict[str, Path],
    repeat: int,
    fs_size: str,
    extra: dict[str, str],
    tidy: bool,
    backend_options: dict[str, dict[str, str]],
) -> dict[str, float]:
    with store_for(kind, fs_size) as (root, options, mnt):
        name = kind.split("-", 1)[0]
        b = open_backend(name, root, {**options, **backend_options.get(name, {})})
        disk: dict[str, float] = {}
        for state in ("empty", "large"):
            before = used_bytes(mnt, options.get("dataset"))
            await load_state(b, templates[state], state)
            disk[state] = (used_bytes(mnt, options.get("dataset")) - before) / 1e6
        result = {
            "clone_empty_ms": await clone_ms(b, "empty", repeat),
            "clone_large_ms": await clone_ms(b, "large", repeat),
        }
        run_dir = make_tmp_dir("taidon-br-")
        try:
            empty = await first_use(b, kind, "empty", run_dir)
            large = await first_use(b, kind, "large", run_dir)
            result["connect_empty_ms"] = empty["connect_ms"]
            result["connect_large_ms"] = large["connect_ms"]
            result["first_scan_ms"] = large["scan_ms"]
            for state in ("empty", "large"):
                ten = await chain_bytes(
                    b, kind, state, mnt, options.get("dataset"), run_dir, extra, tidy
                )
                result[f"{state}_state_mb"] = tree_bytes(templates[state]) / 1e6
                result[f"{state}_state_disk_mb"] = disk[state]
                result[f"{state}_ten_mb"] = ten / 1e6
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale of the large state")
    parser.add_argument("--repeat", type=int, default=5, help="clones timed per state")
    parser.add_argument("--backends", default=",".join(KINDS))
    parser.add_argument(
        "--chain-settings",
        default="",
        help="extra server settings (k=v,k=v) for the chained states, to try a candidate",
    )
    parser.add_argument(
        "--tidy",
        action="store_true",
        help="candidate: also drop the stats file before each chained snapshot",
    )
    parser.add_argument(
        "--backend-options",
        default="",
        help="backend options, e.g. zfs.recordsize=128K,zfs.compression=off",
    )
    args = parser.parse_args()
    backend_options: dict[str, dict[str, str]] = {}
    for item in filter(None, args.backend_options.split(",")):
        key, _, value = item.partition("=")
        backend, _, option = key.partition(".")
        backend_options.setdefault(backend, {})[option] = value
    extra = dict(kv.split("=", 1) for kv in args.chain_settings.split(",") if kv)
    if os.geteuid() != 0:
        sys.exit("run as root: the backends mount filesystems")
    fs_size = f"{max(2, args.scale // 8 + 2)}G"
    work = make_tmp_dir("taidon-bt-")
    try:
        templates = await build_templates(args.scale, work)
        large_mb = sum(f.stat().st_size for f in templates["large"].rglob("*") if f.is_file())
        print(f"states: empty cluster, pgbench -s {args.scale} ({large_mb / 1e6:.0f} MB)")
        tidy = ", tidied before each snapshot" if args.tidy else ""
        print(f"chained states: product server settings + {extra or 'nothing'}{tidy}")
        print(f"backend options: {backend_options or 'defaults'}")
        print(f"load average at start: {load()}", flush=True)
        results = {}
        for kind in args.backends.split(","):
            results[kind] = await bench(
                kind, templates, args.repeat, fs_size, extra, args.tidy, backend_options
            )
            print(f"  measured {kind} (load {load()}): {results[kind]}", flush=True)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    base = results.get("copy-ext4")
    print()
    print(f"{'backend':<10} {'state':<6} {'baseline copy ms':>17} {'clone ms':>9} {'ratio':>7}")
    for kind, r in results.items():
        for state in ("empty", "large"):
            cand = r[f"clone_{state}_ms"]
            ref = base[f"clone_{state}_ms"] if base else float("nan")
            print(f"{kind:<10} {state:<6} {ref:>17.1f} {cand:>9.1f} {cand / ref:>7.3f}")
    print()
    print("fresh clone -> server -> first query; then the first full read of pgbench_accounts")
    print(
        f"{'backend':<10} {'connect empty ms':>16} {'connect large ms':>16} {'first scan ms':>14}"
    )
    for kind, r in results.items():
        print(
            f"{kind:<10} {r['connect_empty_ms']:>16.1f} {r['connect_large_ms']:>16.1f} "
            f"{r['first_scan_ms']:>14.1f}"
        )
    print()
    print("disk used by 10 chained states of a small change each (baseline: 10 full copies);")
    print("one state: its files' size, and the disk it took when loaded into this backend")
    print(
        f"{'backend':<10} {'base':<6} {'one state MB':>12} {'on disk MB':>10} "
        f"{'10 copies MB':>13} {'10 chained MB':>14} {'vs copies':>9} "
        f"{'(one+10)/one':>12} {'vs on disk':>10}"
    )
    for kind, r in results.items():
        for state in ("empty", "large"):
            one, ten = r[f"{state}_state_mb"], r[f"{state}_ten_mb"]
            own = r[f"{state}_state_disk_mb"]
            print(
                f"{kind:<10} {state:<6} {one:>12.1f} {own:>10.1f} {10 * one:>13.1f} {ten:>14.1f} "
                f"{ten / (10 * one):>9.3f} {(ten + one) / one:>12.3f} {(ten + own) / own:>10.3f}"
            )
    print(f"load average at end: {load()}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    asyncio.run(main())
