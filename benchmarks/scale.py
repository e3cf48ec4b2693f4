"""Benchmark: how many per-connection instances at once, and how fast each connect is.

Run as root: .venv/bin/python benchmarks/scale.py [--instances 200] [--wave 20]
[--backend overlayfs] [--over 10]

One `sqlrs serve` subprocess (uvloop) with a psql recipe whose instances are tuned for
density (`scale_settings()`: small shared_buffers, few connections, no autovacuum, no
background workers) and `isolation: connection`, so every client gets its own clone and
server. Clients connect in waves of --wave at once and stay connected until --instances are
open; each connect is timed (asyncpg connect + `select 1`). Then --over more clients ask
past `instances.max` and must get 53300 at once, never a hang. Prints p50/p99/max connect
time, per wave and overall, the proportional memory (PSS) per instance, the proxy's RSS,
and what is left after every client closed. Exits non-zero when a refusal is not 53300 or
something is left behind (the connect-time target is reported, not enforced).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import make_dir, need_root, proxy_process, rss_kib

REFUSAL_LIMIT_S = 5.0  # a client past the limit is refused within this, or it is a hang
CLOSE_WAIT_S = 120.0


def scale_settings() -> dict[str, str]:
    """Instance settings for many small servers on one machine (a test database's needs)."""
    return {
        "shared_buffers": "2MB",
        "max_connections": "8",
        "autovacuum": "off",
        "max_worker_processes": "0",  # no logical replication launcher
        "max_parallel_workers": "0",
        "max_logical_replication_workers": "0",
        "dynamic_shared_memory_type": "posix",
    }


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def servers_under(work: Path) -> list[int]:
    """Postmasters whose data directory is under work (the store's clones)."""
    key = str(work).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if exe.endswith("/postgres") and key in cmd:
            found.append(int(entry))
    return found


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def summary(xs: list[float]) -> str:
    return (
        f"p50 {1000 * quantile(xs, 0.5):6.0f} ms  p99 {1000 * quantile(xs, 0.99):6.0f} ms"
        f"  max {1000 * max(xs, default=0):6.0f} ms"
    )


async def connect(dsn: str) -> tuple[asyncpg.Connection, float]:
    t0 = time.monotonic()
    conn = await asyncpg.connect(dsn, timeout=60)
    assert await conn.fetchval("select 1") == 1
    return conn, time.monotonic() - t0


async def refused(dsn: str) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(REFUSAL_LIMIT_S):
            conn = await asyncpg.connect(dsn, timeout=REFUSAL_LIMIT_S)
    except asyncpg.PostgresError as e:
        return str(e.sqlstate), time.monotonic() - t0
    except TimeoutError:
        return "hang", time.monotonic() - t0
    await conn.close()
    return "served", time.monotonic() - t0


async def run(args: argparse.Namespace, dsn: str, work: Path, proxy_pid: int) -> bool:
    conns: list[asyncpg.Connection] = []
    times: list[float] = []
    ok = True
    first, took = await connect(dsn)  # builds the state: not a connect time to count
    await first.close()
    print(f"first connection (builds the recipe's state): {took:.2f} s")
    try:
        while len(conns) < args.instances:
            n = min(args.wave, args.instances - len(conns))
            t0 = time.monotonic()
            got = await asyncio.gather(*(connect(dsn) for _ in range(n)))
            conns += [c for c, _ in got]
            wave = [t for _, t in got]
            times += wave
            print(
                f"wave {len(conns) // args.wave:3d}: {len(conns):4d} open  {summary(wave)}"
                f"  wave {time.monotonic() - t0:5.2f} s  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        postmasters = len(servers := servers_under(work))
        servers += [c for pid in servers for c in children(pid)]
        pss = sum(pss_kib(p) for p in servers)
        print(f"\n{len(conns)} instances open at once; connect {summary(times)}")
        print(
            f"postgres processes {len(servers)} ({len(servers) / max(postmasters, 1):.1f} per"
            f" server, {postmasters} servers),"
            f" PSS {pss / len(conns) / 1024:.1f} MiB per instance, proxy RSS"
            f" {rss_kib(proxy_pid) / 1024:.0f} MiB and {len(os.listdir(f'/proc/{proxy_pid}/fd'))}"
            " open files"
        )
        if args.over:
            answers = await asyncio.gather(*(refused(dsn) for _ in range(args.over)))
            codes = sorted({a for a, _ in answers})
            slowest = max(t for _, t in answers)
            print(f"{args.over} clients past the limit: {codes}, slowest answer {slowest:.2f} s")
            ok = codes == ["53300"]
        met = quantile(times, 0.99) <= args.target_p99
        print(f"target p99 <= {args.target_p99:.1f} s: {'met' if met else 'NOT met'}")
    finally:
        await asyncio.gather(*(c.close(timeout=30) for c in conns), return_exceptions=True)
    deadline = time.monotonic() + CLOSE_WAIT_S
    while servers_under(work) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    left = servers_under(work)
    print(f"after close: {len(left)} postgres processes left")
    return ok and not left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--wave", type=int, default=20)
    parser.add_argument("--over", type=int, default=10, help="clients past instances.max")
    parser.add_argument("--backend", default="overlayfs")
    parser.add_argument("--target-p99", type=float, default=2.0)
    args = parser.parse_args()
    need_root()
    work = make_dir()
    sql = work / "schema.sql"
    sql.write_text("create table item (id int primary key, name text);\n")
    recipe = {
        "prepare": {"kind": "psql", "files": [str(sql)]},
        "isolation": "connection",
        "settings": scale_settings(),
    }
    extra = {
        # warm 0: this measures capacity, not the automatic pool (which keeps its own slots).
        "instances": {"max": args.instances, "idle_ttl": "30m", "start_timeout": "60s", "warm": 0},
    }
    ok = False
    try:
        with proxy_process(work, {"s": recipe}, backend=args.backend, extra=extra) as pp:
            ok = asyncio.run(run(args, pp.dsn("s"), work, pp.pid))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
