"""Churn: many connect/query/disconnect cycles of every kind, then count what was left behind.

    sudo .venv/bin/python benchmarks/churn.py --cycles 10000          # the long run
    sudo .venv/bin/python benchmarks/churn.py --cycles 500 --workers 4  # what the suite runs

Cycles, mixed at random (seeded): a query on the shared instance; a query on a fresh
per-connection instance; a query cancelled mid-way (asyncpg's timeout sends a
CancelRequest); a client that drops mid-handshake (half a startup packet, then close); one
that sends its startup and vanishes before reading; one that resets the TCP connection
mid-session. Afterwards, once the proxy has let go of the per-connection instances: no
session left, no per-connection instance, server process, clone directory, mount or
metadata row beyond the shared instance's; the proxy's open file descriptors and RSS back
within a small bound of where they were after warm-up. Exit status 1 names what leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import socket
import sqlite3
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
from _common import ProxyProcess, make_dir, need_root, proxy_process, rss_kib

from taidon_proxy.pgwire.messages import startup_message

KINDS = {
    "shared": 50,
    "connection": 10,
    "cancel": 10,
    "half_startup": 10,
    "vanish": 10,
    "reset": 10,
}
SETTLE_S = 60.0
FD_SLACK = 8  # the event loop's own, log rotation, an admin keep-alive
RSS_SLACK_KIB = 16 * 1024


def _startup(database: str) -> bytes:
    return startup_message({"user": "postgres", "database": database})


async def _raw(port: int, data: bytes, *, reset: bool) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if reset:  # RST instead of FIN: the client's host forgot the connection
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    await asyncio.sleep(0)


async def cycle(kind: str, port: int, dsn: str) -> None:
    if kind == "half_startup":
        await _raw(port, _startup("churn")[:7], reset=False)
    elif kind == "vanish":
        await _raw(port, _startup("churn"), reset=False)
    elif kind == "reset":
        conn = await asyncpg.connect(dsn)
        await conn.fetchval("select 1")
        conn.terminate()  # closes the socket without a Terminate message
    elif kind == "cancel":
        conn = await asyncpg.connect(dsn)
        with contextlib.suppress(TimeoutError):  # asyncpg cancels it on the server
            await conn.execute("select pg_sleep(5)", timeout=0.05)
        assert await conn.fetchval("select 2") == 2
        await conn.close()
    else:
        settings = {"options": "-c taidon.isolation=connection"} if kind == "connection" else {}
        conn = await asyncpg.connect(dsn, server_settings=settings)
        assert await conn.fetchval("select count(*) from t") == 3
        await conn.close()


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def servers_under(store: Path) -> int:
    """Postgres postmasters whose data directory is in this store."""
    n = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and any(str(store).encode() in a for a in argv):
            n += 1
    return n


def mounts_under(store: Path) -> int:
    return sum(str(store) in line for line in Path("/proc/mounts").read_text().splitlines())


def left_behind(pp: ProxyProcess, store: Path) -> dict[str, int]:
    insts = pp.instances()
    db = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("select count(*) from shared_instances").fetchone()[0]
    finally:
        db.close()
    clones = store / "data" / "clones"
    return {
        "sessions": len(pp.admin("/v1/connections")),
        "connection_instances": sum(i["isolation"] == "connection" for i in insts),
        "servers": servers_under(store),
        "clone_dirs": len(list(clones.iterdir())) if clones.exists() else 0,
        "mounts": mounts_under(store),
        "shared_rows": rows,
    }


async def run(args: argparse.Namespace) -> int:
    need_root()
    work = make_dir("taidon-churn-")
    sql = work / "churn.sql"
    sql.write_text("create table t (x int);\ninsert into t values (1), (2), (3);\n")
    dbs = {"churn": {"prepare": {"kind": "psql", "files": [str(sql)]}}}
    # warm 0: what is left is counted at once; automatic spares would stay their window (30 s).
    extra = {"instances": {"idle_ttl": "30m", "max": 40, "warm": 0}}
    try:
        return await _churn(args, work, dbs, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _churn(
    args: argparse.Namespace, work: Path, dbs: dict[str, Any], extra: dict[str, Any]
) -> int:
    with proxy_process(work, dbs, backend=args.backend, extra=extra) as pp:
        dsn = pp.dsn("churn")
        rng = random.Random(args.seed)
        kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=args.cycles)
        warm = min(200, args.cycles // 5)
        counts: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(kinds):
            queue.put_nowait(item)
        base: dict[str, int] = {}
        started = time.monotonic()

        async def worker() -> None:
            while not queue.empty():
                i, kind = queue.get_nowait()
                if i == warm and not base:
                    base.update(fds=fds(pp.pid), rss=rss_kib(pp.pid))
                try:
                    await asyncio.wait_for(cycle(kind, pp.port, dsn), 60)
                    counts[kind] += 1
                except Exception as e:  # a failed cycle is a finding: count it, name it
                    errors[f"{kind}: {type(e).__name__}: {e}"[:200]] += 1

        await asyncio.gather(*(worker() for _ in range(args.workers)))
        seconds = time.monotonic() - started
        # Per-connection instances go when their client does (server, then clone): give the
        # stops time to finish before anything counts as left behind.
        # What may stay: the one shared instance (its server, its clone, its row), no more.
        mounts = {"overlayfs": 2, "zfs": 1}.get(args.backend, 0)
        allowed = {"sessions": 0, "connection_instances": 0, "servers": 1, "clone_dirs": 1,
                   "mounts": mounts, "shared_rows": 1}  # fmt: skip
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            left = left_behind(pp, pp.store)
            if all(left[what] <= most for what, most in allowed.items()):
                break
            await asyncio.sleep(0.5)
        left = left_behind(pp, pp.store)
        after = {"fds": fds(pp.pid), "rss": rss_kib(pp.pid)}
    report = {
        "cycles": args.cycles, "seconds": round(seconds, 1),
        "cycles_per_s": round(args.cycles / seconds, 1), "by_kind": dict(counts),
        "failed": dict(errors), "left": left,
        "fds": {"after_warmup": base.get("fds"), "end": after["fds"]},
        "rss_kib": {"after_warmup": base.get("rss"), "end": after["rss"]},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    problems = []
    if errors:
        problems.append(f"{sum(errors.values())} cycles failed")
    for what, most in allowed.items():
        if left[what] > most:
            problems.append(f"{what}: {left[what]} left (at most {most})")
    if base and after["fds"] > base["fds"] + FD_SLACK:
        problems.append(f"file descriptors: {base['fds']} after warm-up, {after['fds']} at the end")
    if base and after["rss"] > base["rss"] + RSS_SLACK_KIB:
        problems.append(f"RSS: {base['rss']} KiB after warm-up, {after['rss']} KiB at the end")
    for p in problems:
        print(f"LEAK: {p}", file=sys.stderr)
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backend", default="copy")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
