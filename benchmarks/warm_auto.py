"""Benchmark: a steady stream of per-connection clients with `instances.warm` left unset (auto).

Run as root: .venv/bin/python benchmarks/warm_auto.py [--stores xfs,copy] [--clients 40]
             [--gap 0.25]

Per store, two `sqlrs serve` subprocesses one after the other, the demo recipe as an alias
with `isolation: connection` and its state built before timing starts:
  auto   no `instances.warm` in the config (the default: the pool sizes itself)
  off    `instances.warm: 0` (every client waits for a clone and a server start)
Each sends --clients connections one after another, --gap seconds apart (asyncpg connect +
`select 1` + close), and after each proxy connect one connect + `select 1` to a server
already running on a ready copy of the same state ("running", the warm-pool target's
baseline: <= +5 ms over it). The first half of the stream is how the pool forms; the
medians are over the second half. Also printed: the spares kept at the end and their memory
(PSS of their postgres processes), and the CPU the proxy and its instances used per client
(utime + stime of the proxy and its reaped children), so the pool's cost is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, need_root, proxy_process, table
from proxy_connect import (
    ALIAS,
    STORES,
    poll_select_one,
    recipe,
    start_running,
    store_root,
    to_running,
    via_proxy,
)
from scale import children, pss_kib, servers_under

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Stream:
    proxy_s: list[float] = field(default_factory=list)
    running_s: list[float] = field(default_factory=list)
    spares: int = 0
    spare_pss_kib: int = 0
    cpu_s_per_client: float = 0.0


def cpu_with_children(pid: int) -> float:
    """utime + stime + cutime + cstime: the proxy and the instances it has reaped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2 :].split()
    return sum(int(x) for x in f[11:15]) / CLK_TCK


async def stream(kind: str, warm: str, clients: int, gap: float) -> Stream:
    out = Stream()
    with store_root(kind) as root:
        work = Path(root) / "w"
        work.mkdir()
        work.chmod(0o755)
        inst: dict[str, object] = {"idle_ttl": "30m", "max": 50}
        if warm == "off":
            inst["warm"] = 0
        extra = {"instances": inst}
        with proxy_process(work, {ALIAS: recipe()}, backend=STORES[kind], extra=extra) as pp:
            dsn = pp.dsn(ALIAS)
            await via_proxy(dsn)  # builds and caches the state
            _, live_sock, server = start_running(pp, work)
            try:
                await poll_select_one(live_sock, lambda: server.poll() is not None)
                await asyncio.sleep(1.0)
                cpu0 = cpu_with_children(pp.pid)
                for i in range(clients):
                    out.proxy_s.append(await via_proxy(dsn))
                    out.running_s.append(await to_running(live_sock))
                    print(
                        f"{kind:5s} {warm:4s} client {i:3d}  proxy {out.proxy_s[-1] * 1000:7.1f}"
                        f" ms  running {out.running_s[-1] * 1000:5.1f} ms",
                        flush=True,
                    )
                    await asyncio.sleep(gap)
                await asyncio.sleep(1.0)  # the last client's instance goes
                out.cpu_s_per_client = (cpu_with_children(pp.pid) - cpu0) / clients
                servers = [s for s in servers_under(pp.store) if s != server.pid]
                out.spares = len(servers)
                out.spare_pss_kib = sum(pss_kib(p) for s in servers for p in [s, *children(s)])
            finally:
                server.send_signal(3)  # SIGQUIT
                server.wait(30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="xfs,copy")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between clients")
    args = parser.parse_args()
    need_root()
    rows = []
    for kind in args.stores.split(","):
        for warm in ("auto", "off"):
            t0 = time.monotonic()
            r = asyncio.run(stream(kind, warm, args.clients, args.gap))
            half = len(r.proxy_s) // 2
            p, c = median(r.proxy_s[half:]), median(r.running_s[half:])
            p90 = sorted(r.proxy_s[half:])[int(0.9 * (len(r.proxy_s) - half))]
            rows.append([
                kind, warm, f"{p * 1000:.1f}", f"{p90 * 1000:.1f}", f"{c * 1000:.1f}",
                f"{(p - c) * 1000:+.1f}", str(r.spares), f"{r.spare_pss_kib / 1024:.1f}",
                f"{r.cpu_s_per_client * 1000:.0f}", f"{time.monotonic() - t0:.0f}",
            ])  # fmt: skip
    print(
        f"\nstream of {args.clients} per-connection clients, {args.gap} s apart;"
        " medians of the second half:"
    )
    head = ["store", "warm", "proxy ms", "p90 ms", "running ms", "proxy - running"]
    tail = ["spares at end", "their PSS MiB", "CPU ms/client", "run s"]
    print(table([*head, *tail], rows))
    print("target: with warm unset (auto), proxy - running <= +5 ms")


if __name__ == "__main__":
    main()
