"""Benchmark: pgbench select-only through the proxy vs PgBouncer (session mode) vs direct.

Run as root: .venv/bin/python benchmarks/proxy_pgbench.py [--rounds 5] [--seconds 10]
[--clients 8] [--profile FILE.svg] [--connect]

--connect runs pgbench -C: a new connection per transaction, as applications that connect per
request do (PgBouncer keeps its server connections; the proxy hands a left client's server
connection to the next one with the same startup parameters).

One `sqlrs serve` subprocess (uvloop) with a psql recipe that makes the pgbench tables
(scale 1); its shared instance is the one server for all three paths:
  proxy      pgbench -> TCP 127.0.0.1 -> proxy -> instance unix socket
  pgbouncer  pgbench -> TCP 127.0.0.1 -> PgBouncer 1.x, pool_mode=session -> same unix socket
  direct     pgbench -> the instance's unix socket
Each round runs the three in a rotated order; the summary gives medians over rounds, the
ratios, and CPU per transaction of the proxy and PgBouncer processes (/proc utime+stime).
Target: proxy >= 1.0x PgBouncer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PgbenchResult,
    ProxyProcess,
    bouncer_pid,
    instance_socket_dir,
    make_dir,
    median,
    need_root,
    pgbouncer,
    proxy_process,
    run_pgbench,
    table,
)

PGBENCH_SQL = """
create table pgbench_branches (bid int primary key, bbalance int, filler char(88));
create table pgbench_tellers (tid int primary key, bid int, tbalance int, filler char(84));
create table pgbench_accounts (aid int primary key, bid int, abalance int, filler char(84));
create table pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp,
                              filler char(22));
insert into pgbench_branches select g, 0 from generate_series(1, {scale}) g;
insert into pgbench_tellers select g, (g - 1) / 10 + 1, 0 from generate_series(1, {scale} * 10) g;
insert into pgbench_accounts select g, (g - 1) / 100000 + 1, 0, ''
  from generate_series(1, {scale} * 100000) g;
analyze;
"""
DB = "bench"
IDLE_LEAVES = {"epoll_pwait", "epoll_wait"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="also record the proxy with py-spy during one extra proxy run (needs py-spy)",
    )  # fmt: skip
    parser.add_argument("--only", choices=["proxy", "pgbouncer", "direct"], action="append")
    parser.add_argument("--connect", action="store_true", help="pgbench -C: connect per tx")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--relay", choices=["auto", "native", "python"], default="auto",
        help="the proxy's relay once spliced (native: the C thread; python: TLS sessions' path)",
    )  # fmt: skip
    args = parser.parse_args()
    need_root()
    work = make_dir()
    sql = work / "pgbench.sql"
    sql.write_text(PGBENCH_SQL.format(scale=args.scale))
    recipe = {"prepare": {"kind": "psql", "files": [str(sql)]}}
    bench = ("-S", "-C") if args.connect else ("-S",)
    try:
        extra = {"relay": args.relay}
        with proxy_process(work, {DB: recipe}, loop=args.loop, extra=extra) as pp:
            # The first connection builds the state and starts the shared instance.
            subprocess.run(
                ["psql", "-X", "-q", "-c", "select count(*) from pgbench_accounts", pp.dsn(DB)],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            sock = instance_socket_dir(pp, f"{DB}:default")
            with pgbouncer(work, sock, DB) as bport:
                paths = {
                    "proxy": (["-h", "127.0.0.1", "-p", str(pp.port), "-U", "postgres", DB],
                              pp.pid),
                    "pgbouncer": (["-h", "127.0.0.1", "-p", str(bport), "-U", "postgres", DB],
                                  bouncer_pid[bport]),
                    "direct": (["-h", str(sock), "-p", "5432", "-U", "postgres", DB], None),
                }  # fmt: skip
                names = args.only or list(paths)
                # Warm-up: page cache, PgBouncer's server pool, the proxy's code paths.
                for name in names:
                    conn, pid = paths[name]
                    run_pgbench(conn, clients=args.clients, seconds=2, watch_pid=pid, args=bench)
                results: dict[str, list[PgbenchResult]] = {n: [] for n in names}
                for r in range(args.rounds):
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for name in order:
                        conn, pid = paths[name]
                        before = reuse_counts(pp) if name == "proxy" else None
                        res = run_pgbench(
                            conn, clients=args.clients, seconds=args.seconds, watch_pid=pid,
                            args=bench,
                        )  # fmt: skip
                        results[name].append(res)
                        print(
                            f"round {r + 1} {name:9s} tps {res.tps:9.0f}"
                            + (f"  cpu {res.cpu_us_per_tx:5.1f} us/tx" if pid else "")
                            + (reuse_share(before, reuse_counts(pp)) if before else ""),
                            flush=True,
                        )
                if args.profile is not None:
                    profile(pp.pid, paths["proxy"][0], args, args.profile)
        report(results, args)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def reuse_counts(pp: ProxyProcess) -> tuple[float, float]:
    """Client connections accepted and those served on a kept server connection."""
    return pp.metric("taidon_connections_total"), pp.metric(
        "taidon_server_connections_reused_total"
    )


def reuse_share(before: tuple[float, float], after: tuple[float, float]) -> str:
    conns, reused = after[0] - before[0], after[1] - before[1]
    return f"  reused {reused:.0f}/{conns:.0f} server connections" if conns else ""


def profile(pid: int, conn: list[str], args: argparse.Namespace, out: Path) -> None:
    """py-spy (native frames) on the proxy during one extra run; print the hottest leaves."""
    spy = Path(sys.executable).parent / "py-spy"
    rec = subprocess.Popen(
        [str(spy), "record", "--native", "-p", str(pid), "-o", str(out), "-f", "raw",
         "-d", str(args.seconds), "-r", "200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    res = run_pgbench(
        conn, clients=args.clients, seconds=args.seconds, watch_pid=pid,
        args=("-S", "-C") if args.connect else ("-S",),
    )  # fmt: skip
    _, err = rec.communicate(timeout=120)
    print(f"profiled proxy run: tps {res.tps:.0f} (sampling slows it); stacks in {out}")
    if rec.returncode != 0 or not out.exists():
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        return
    leaves: dict[str, int] = {}
    busy = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if frames[-1] in IDLE_LEAVES or "_worker" in frames:
            continue  # waiting in epoll, or an idle thread-pool worker
        # Attribute each sample to the innermost frame and its caller.
        key = " <- ".join(frames[-2:][::-1])
        leaves[key] = leaves.get(key, 0) + int(count)
        busy += int(count)
    print("busy samples of the proxy's event loop, hottest frames:")
    for key, k in sorted(leaves.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{100 * k / max(busy, 1):5.1f}%  {key}")


def report(results: dict[str, list[PgbenchResult]], args: argparse.Namespace) -> None:
    med = {n: median([r.tps for r in rs]) for n, rs in results.items()}
    cpu = {n: median([r.cpu_us_per_tx for r in rs]) for n, rs in results.items()}
    print(
        f"\npgbench -S{' -C' if args.connect else ''} -c {args.clients} -j 2 -T {args.seconds}, "
        f"scale {args.scale}, "
        f"{args.rounds} rounds (rotated order), proxy on {args.loop}, medians:"
    )
    rows = []
    for n, rs in results.items():
        rows.append([
            n, f"{med[n]:.0f}",
            f"{cpu[n]:.1f}" if n != "direct" else "-",
            " ".join(f"{r.tps:.0f}" for r in rs),
        ])  # fmt: skip
    print(table(["path", "TPS", "CPU us/tx", "per round"], rows))
    if "proxy" in med and "pgbouncer" in med:
        print(f"ratio proxy/pgbouncer: {med['proxy'] / med['pgbouncer']:.3f}x  (target >= 1.0)")
    if "proxy" in med and "direct" in med:
        print(f"ratio proxy/direct(unix): {med['proxy'] / med['direct']:.3f}x")
    if "pgbouncer" in med and "direct" in med:
        print(f"ratio pgbouncer/direct(unix): {med['pgbouncer'] / med['direct']:.3f}x")


if __name__ == "__main__":
    main()
