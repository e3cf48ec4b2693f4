"""Benchmark: COPY of a large table out through the proxy vs directly from the same instance.

Run as root: .venv/bin/python benchmarks/proxy_copy.py [--rows 3000000] [--rounds 5]

One `sqlrs serve` subprocess (uvloop); the table is made through the proxy in the alias's
shared instance (about 100 bytes a row on disk, so 3M rows is over 200 MB). Each round runs
`psql -c "copy big to stdout"` (output to /dev/null) through the proxy (TCP loopback) and
directly on the instance's unix socket, in alternating order. Prints the medians, MB/s of
COPY output, the proxy's CPU per MB, and the ratio. Target: proxy >= 0.90x direct.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    cpu_seconds,
    instance_socket_dir,
    make_dir,
    median,
    need_root,
    proxy_process,
    table,
)

DB = "bench"
SETUP = "create table big as select g as id, md5(g::text) || md5((g + 1)::text) as t, now() as ts"


def psql(dsn_args: list[str], sql: str, *, out: int | None = subprocess.DEVNULL) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *dsn_args, "-c", sql],
        check=True, stdout=out, timeout=900,
    )  # fmt: skip


def copy_bytes(dsn_args: list[str]) -> int:
    """Size of the COPY output (read once, outside the timed runs)."""
    proc = subprocess.Popen(
        ["psql", "-X", *dsn_args, "-c", "copy big to stdout"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    n = 0
    while chunk := proc.stdout.read(1 << 20):
        n += len(chunk)
    if proc.wait(timeout=600) != 0:
        raise RuntimeError("copy failed")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    need_root()
    work = make_dir()
    sql = work / "empty.sql"
    sql.write_text("select 1;\n")
    recipe = {"prepare": {"kind": "psql", "files": [str(sql)]}}
    try:
        with proxy_process(work, {DB: recipe}) as pp:
            via_proxy = [pp.dsn(DB)]
            t0 = time.perf_counter()
            psql(via_proxy, f"{SETUP} from generate_series(1, {args.rows}) g")
            print(f"made table big ({args.rows} rows) in {time.perf_counter() - t0:.1f} s")
            sock = instance_socket_dir(pp, f"{DB}:default")
            direct = ["-h", str(sock), "-p", "5432", "-U", "postgres", DB]
            size = subprocess.run(
                ["psql", "-X", "-At", *direct, "-c",
                 "select pg_total_relation_size('big')"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            out_bytes = copy_bytes(direct)  # also warms the page cache
            print(f"table size {int(size) / 1e6:.0f} MB, COPY output {out_bytes / 1e6:.0f} MB")
            times: dict[str, list[float]] = {"proxy": [], "direct": []}
            cpu: list[float] = []
            for r in range(args.rounds):
                order = ["proxy", "direct"] if r % 2 == 0 else ["direct", "proxy"]
                for name in order:
                    conn = via_proxy if name == "proxy" else direct
                    c0 = cpu_seconds(pp.pid)
                    t0 = time.perf_counter()
                    psql(conn, "copy big to stdout")
                    dt = time.perf_counter() - t0
                    if name == "proxy":
                        cpu.append(cpu_seconds(pp.pid) - c0)
                    times[name].append(dt)
                    print(f"round {r + 1} {name:6s} {dt:6.2f} s  {out_bytes / dt / 1e6:6.0f} MB/s")
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    mb = out_bytes / 1e6
    rows = [
        [n, f"{median(ts):.2f}", f"{mb / median(ts):.0f}", " ".join(f"{t:.2f}" for t in ts)]
        for n, ts in times.items()
    ]
    print(f"\ncopy big to stdout ({mb:.0f} MB of output), {args.rounds} rounds, medians:")
    print(table(["path", "seconds", "MB/s", "per round"], rows))
    print(f"proxy CPU: {median(cpu) / mb * 1e3:.2f} ms per MB")
    ratio = median(times["direct"]) / median(times["proxy"])
    print(f"ratio proxy/direct throughput: {ratio:.3f}x  (target >= 0.90)")


if __name__ == "__main__":
    main()
