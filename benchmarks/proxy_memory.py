"""Benchmark: proxy memory per idle connection (RSS growth over N idle connections, one instance).

Run as root: .venv/bin/python benchmarks/proxy_memory.py [--connections 200] [--rounds 3]

One `sqlrs serve` subprocess (uvloop) and one shared instance (max_connections raised to fit).
Each round opens N asyncpg connections through the proxy, runs `select 1` on each so every one
is fully spliced, waits for the proxy to settle, reads its VmRSS, and closes them all. Round 1
is the headline (cold: the proxy never held that many before); later rounds show what stays
reserved once memory freed by earlier connections is reused. Target: <= 64 KiB per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import make_dir, median, need_root, proxy_process, rss_kib

DB = "bench"
SETTLE_S = 1.0


async def open_many(dsn: str, n: int) -> list[asyncpg.Connection]:
    conns: list[asyncpg.Connection] = []
    for i in range(0, n, 20):  # 20 at a time: the instance forks a backend for each
        batch = await asyncio.gather(
            *(asyncpg.connect(dsn, timeout=60) for _ in range(min(20, n - i)))
        )
        conns += batch
    for c in conns:
        assert await c.fetchval("select 1") == 1
    return conns


async def close_all(conns: list[asyncpg.Connection]) -> None:
    await asyncio.gather(*(c.close(timeout=30) for c in conns))


async def measure(pid: int, dsn: str, n: int, rounds: int) -> list[float]:
    """KiB per connection for each round; round 1 is cold (nothing of its size opened before)."""
    await close_all(await open_many(dsn, 1))  # the instance is up, its first session done
    await asyncio.sleep(SETTLE_S)
    per_conn: list[float] = []
    for r in range(rounds):
        before = rss_kib(pid)
        conns = await open_many(dsn, n)
        await asyncio.sleep(SETTLE_S)
        after = rss_kib(pid)
        per_conn.append((after - before) / n)
        print(
            f"round {r + 1} ({'cold' if r == 0 else 'warm'}): RSS {before} KiB -> {after} KiB "
            f"with {n} idle connections = {(after - before) / n:.1f} KiB each"
        )
        await close_all(conns)
        await asyncio.sleep(SETTLE_S)
    return per_conn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    need_root()
    work = make_dir()
    sql = work / "empty.sql"
    sql.write_text("select 1;\n")
    recipe = {
        "prepare": {"kind": "psql", "files": [str(sql)]},
        "settings": {"max_connections": str(args.connections + 50)},
    }
    try:
        with proxy_process(work, {DB: recipe}) as pp:
            per_conn = asyncio.run(measure(pp.pid, pp.dsn(DB), args.connections, args.rounds))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"\n{args.connections} idle connections through the proxy, one shared instance:")
    print(f"cold (first {args.connections}): {per_conn[0]:.1f} KiB per connection  (target <= 64)")
    if len(per_conn) > 1:
        print(f"warm (reopened, median): {median(per_conn[1:]):.1f} KiB per connection")


if __name__ == "__main__":
    main()
