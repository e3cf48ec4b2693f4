"""Benchmark: connect -> first query, fresh per-connection instance vs a directly spawned server.

Run as root: .venv/bin/python benchmarks/proxy_connect.py [--rounds 10] [--stores xfs,btrfs,copy]

Per store, one `sqlrs serve` subprocess (uvloop) with the demo recipe as an alias with
`isolation: connection`, its state built and cached before timing starts:
  xfs    copy backend on a loop-mounted XFS with reflink (copy-on-write clones)
  btrfs  btrfs backend on a loop-mounted btrfs (subvolume snapshots)
  copy   copy backend on /tmp (ext4 here: a full copy per clone)
  proxy     asyncpg.connect through the proxy (clone + start + handshake) + `select 1`
  baseline  spawn `postgres` (as the postgres user, same fast settings as an instance, unix
            socket only) on a ready copy of the same state's data directory (copied before the
            clock starts, on the same filesystem), poll its socket every 2 ms until a
            connection works, + `select 1`
Rounds alternate the two. Each prints medians and the ratio. Target (CoW store): <= 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PG_BIN,
    PG_USER,
    ProxyProcess,
    make_dir,
    median,
    need_root,
    proxy_process,
    table,
)

from taidon_proxy.runtimes.settings import FAST_SETTINGS
from tests.contract.snapshot_fixtures import loop_fs

ROOT = Path(__file__).resolve().parents[1]
DEMO_SQL = ROOT / "examples" / "demo" / "sql"
ALIAS = "demo"
POLL_S = 0.002
LIMIT_S = 30.0
STORES = {"xfs": "copy", "btrfs": "btrfs", "copy": "copy"}
PG_UID, PG_GID = pwd.getpwnam(PG_USER).pw_uid, pwd.getpwnam(PG_USER).pw_gid


def recipe() -> dict[str, object]:
    files = [str(DEMO_SQL / f) for f in ("01_schema.sql", "02_data.sql", "03_views.sql")]
    return {"prepare": {"kind": "psql", "files": files}, "isolation": "connection"}


@contextlib.contextmanager
def store_root(kind: str) -> Iterator[Path]:
    if kind == "copy":
        d = make_dir("taidon-bench-copy-")
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        with loop_fs(kind, "3G") as mnt:
            yield mnt


async def via_proxy(dsn: str) -> float:
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn, timeout=LIMIT_S)
    assert await conn.fetchval("select 1") == 1
    dt = time.perf_counter() - t0
    await conn.close()
    return dt


async def direct(pgdata: Path, sock: Path) -> float:
    argv = [str(PG_BIN / "postgres"), "-D", str(pgdata), "-k", str(sock),
            "-c", "listen_addresses="]  # fmt: skip
    for k, v in FAST_SETTINGS.items():
        argv += ["-c", f"{k}={v}"]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={PG_UID}", f"--regid={PG_GID}", "--init-groups", *argv,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = t0 + LIMIT_S
        while True:
            try:
                conn = await asyncpg.connect(
                    host=str(sock), port=5432, user="postgres", database=ALIAS, timeout=LIMIT_S
                )
                break
            except (OSError, asyncpg.CannotConnectNowError):
                if time.perf_counter() > deadline or proc.returncode is not None:
                    raise
                await asyncio.sleep(POLL_S)
        assert await conn.fetchval("select 1") == 1
        dt = time.perf_counter() - t0
        await conn.close()
        return dt
    finally:
        if proc.returncode is None:
            proc.send_signal(3)  # SIGQUIT: immediate shutdown, as the proxy stops instances
        await asyncio.wait_for(proc.wait(), LIMIT_S)


async def wait_no_instances(pp: ProxyProcess, warm: int = 0) -> None:
    """The proxy destroys a per-connection instance after the client leaves: let it finish
    (and, with a warm pool, let the pool refill to `warm` idle spares)."""
    deadline = time.monotonic() + LIMIT_S
    while len(pp.instances()) != warm:
        if time.monotonic() > deadline:
            raise TimeoutError("instances left running")
        await asyncio.sleep(0.05)


def ready_copy(src: Path, dest: Path) -> None:
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dest)], check=True)


CLONE_SUM = 'taidon_clone_seconds_sum{purpose="instance"}'
CLONE_COUNT = 'taidon_clone_seconds_count{purpose="instance"}'
READY = re.compile(r"instance\.started.*ready_ms=([0-9.]+)")


@dataclass
class StoreResult:
    proxy_s: list[float]
    direct_s: list[float]
    clone_ms: float  # mean over the timed rounds, from the proxy's metrics
    ready_ms: float  # median runtime start (spawn -> ready), from the proxy's log


async def bench_store(kind: str, rounds: int, warm: int = 0) -> StoreResult:
    with store_root(kind) as root:
        work = Path(root) / "w"
        work.mkdir()
        work.chmod(0o755)
        extra = {"instances": {"idle_ttl": "30m", "max": 50, "warm": warm}}
        with proxy_process(work, {ALIAS: recipe()}, backend=STORES[kind], extra=extra) as pp:
            dsn = pp.dsn(ALIAS)
            await via_proxy(dsn)  # builds and caches the state
            await wait_no_instances(pp, warm)
            plan = pp.admin(f"/v1/aliases/{ALIAS}/plan")
            state = plan["steps"][-1]["state"]
            snap = pp.store / "data" / "snaps" / state / "pgdata"
            assert (snap / "PG_VERSION").is_file(), snap
            proxy_s: list[float] = []
            direct_s: list[float] = []
            clones0 = pp.metric(CLONE_SUM), pp.metric(CLONE_COUNT)
            for r in range(rounds + 1):  # round 0 is a warm-up for both
                pgdata, sock = work / f"d{r}", work / f"s{r}"
                ready_copy(snap, pgdata)
                sock.mkdir()
                os.chown(sock, PG_UID, PG_GID)
                order = ["proxy", "direct"] if r % 2 == 0 else ["direct", "proxy"]
                for name in order:
                    if name == "proxy":
                        dt = await via_proxy(dsn)
                        await wait_no_instances(pp, warm)
                        if r:
                            proxy_s.append(dt)
                    else:
                        dt = await direct(pgdata, sock)
                        if r:
                            direct_s.append(dt)
                    print(f"{kind:5s} round {r} {name:6s} {dt * 1000:7.1f} ms", flush=True)
                shutil.rmtree(pgdata, ignore_errors=True)
                shutil.rmtree(sock, ignore_errors=True)
            n = pp.metric(CLONE_COUNT) - clones0[1]
            clone_ms = (pp.metric(CLONE_SUM) - clones0[0]) / max(n, 1) * 1000
            ready = [float(m) for m in READY.findall(pp.log_path.read_text())][-(rounds + 1) :]
    return StoreResult(proxy_s, direct_s, clone_ms, median(ready) if ready else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--stores", default="xfs,btrfs,copy")
    parser.add_argument(
        "--warm", type=int, default=0, help="instances.warm: pre-started spares (default none)"
    )
    args = parser.parse_args()
    need_root()
    results = {}
    for kind in args.stores.split(","):
        results[kind] = asyncio.run(bench_store(kind, args.rounds, args.warm))
    rows = []
    for kind, r in results.items():
        p, d = r.proxy_s, r.direct_s
        rows.append([
            kind, f"{median(p) * 1000:.1f}", f"{median(d) * 1000:.1f}",
            f"{median(p) / median(d):.2f}x", f"{min(p) * 1000:.1f}-{max(p) * 1000:.1f}",
            f"{r.clone_ms:.1f}", f"{r.ready_ms:.1f}",
        ])  # fmt: skip
    pool = f", warm pool of {args.warm}" if args.warm else ", no warm pool"
    print(f"\nconnect -> select 1, connection-isolated alias{pool}, {args.rounds} rounds, medians:")
    head = ["store", "proxy ms", "direct spawn ms", "ratio", "proxy range"]
    print(table([*head, "of which clone", "runtime start"], rows))
    print("target on a copy-on-write store: <= 1.5x")


if __name__ == "__main__":
    main()
