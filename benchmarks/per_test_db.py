"""A fresh database per test vs the usual resets, in one run, on a schema of 100 tables.

Three ways to give each of N tests a clean database, every test doing the same work (a row
into each of 5 tables, a join over them) through the same proxy:

  fresh     the pytest plugin's way: connect to ALIAS:pytest-bench-<n> (a new instance of the
            recipe's state, from the warm pool for new labels), run the test, close, remove
            the instance through the admin API (DELETE /v1/instances/ALIAS:LABEL) and wait
            for it, as the plugin's teardown does. With `instances.warm_labels` 1 (the
            plugin's default for one worker) and, for comparison, 0 (no pool).
  truncate  one connection to one instance for all tests; after each test
            TRUNCATE t001, …, t100 RESTART IDENTITY CASCADE.
  rollback  one connection; each test inside BEGIN … ROLLBACK.

The clock covers the whole test: setup, body, teardown. The methods alternate in rounds so
drift hits all alike.

    sudo .venv/bin/python benchmarks/per_test_db.py [--tests 40] [--rounds 3] [--backend auto]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import make_dir, need_root, proxy_process, table
from taidon_proxy.pytest_plugin.endpoint import Endpoint
from taidon_proxy.pytest_plugin.options import Settings
from taidon_proxy.pytest_plugin.session import TaidonSession

TABLES = 100
ALIAS = "bench"


def schema_sql() -> str:
    """100 tables, each with a foreign key to the one before (what CASCADE has to follow)."""
    lines = ["create table t001 (id bigserial primary key, name text not null);"]
    for i in range(2, TABLES + 1):
        lines.append(
            f"create table t{i:03d} (id bigserial primary key, name text not null,"
            f" parent bigint references t{i - 1:03d} (id));"
        )
    return "\n".join(lines) + "\n"


def body(conn: psycopg.Connection) -> None:
    """One test's work: a row in each of five chained tables, then a join over them."""
    parent = None
    for i in range(1, 6):
        if parent is None:
            row = conn.execute(f"insert into t{i:03d} (name) values ('x') returning id")
        else:
            row = conn.execute(
                f"insert into t{i:03d} (name, parent) values ('x', %s) returning id", (parent,)
            )
        parent = row.fetchone()[0]  # type: ignore[index]
    count = conn.execute(
        "select count(*) from t001 join t002 on t002.parent = t001.id"
        " join t003 on t003.parent = t002.id"
    ).fetchone()
    assert count is not None and count[0] == 1, count  # a clean database each time


def plugin_session(endpoint: Endpoint) -> TaidonSession:
    """The plugin's own per-process session, given the running proxy (as an xdist worker is)."""
    settings = Settings(
        url=None, config_path=Path("taidon.yaml"), config_given=False, alias=ALIAS,
        scope="function", user="postgres", warm=None,
    )  # fmt: skip
    return TaidonSession(settings, 1, {"endpoint": endpoint.to_json()})


def fresh(session: TaidonSession, *, background: bool) -> float:
    """One test with the plugin's fixtures: a new database, the body, the removal (awaited,
    or handed to the plugin's background removers as its teardown does)."""
    t0 = time.perf_counter()
    db = session.new_database()
    with psycopg.connect(**db.psycopg_kwargs()) as conn:
        body(conn)
        conn.commit()
    if background:
        session.remove_later(db)
    else:
        session.endpoint().remove(db)
    return (time.perf_counter() - t0) * 1000


def batch(run: Callable[[], float], n: int, after: Callable[[], object] = lambda: None) -> Batch:
    """n tests; the wall clock includes `after` (waiting for background removals)."""
    t0 = time.perf_counter()
    per_test = [run() for _ in range(n)]
    after()
    return Batch(per_test, time.perf_counter() - t0)


def truncate(conn: psycopg.Connection, names: str) -> float:
    t0 = time.perf_counter()
    body(conn)
    conn.commit()
    conn.execute(f"truncate {names} restart identity cascade")
    conn.commit()
    return (time.perf_counter() - t0) * 1000


def rollback(conn: psycopg.Connection) -> float:
    t0 = time.perf_counter()
    body(conn)  # psycopg opened the transaction at the first statement
    conn.rollback()
    return (time.perf_counter() - t0) * 1000


@dataclass
class Batch:
    per_test_ms: list[float]
    wall_s: float


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tests", type=int, default=40, help="tests per method per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    need_root()
    work = make_dir()
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


FRESH_BG = "fresh, pool (plugin default)"
FRESH_WAIT = "fresh, pool, removal awaited"
FRESH_NOPOOL = "fresh, no pool"
TRUNCATE = "TRUNCATE 100 tables CASCADE"
ROLLBACK = "BEGIN/ROLLBACK"


def run(args: argparse.Namespace, work: Path) -> None:
    (work / "schema.sql").write_text(schema_sql())
    recipe = {ALIAS: {"prepare": {"kind": "psql", "files": [str(work / "schema.sql")]}}}
    names = ", ".join(f"t{i:03d}" for i in range(1, TABLES + 1))
    batches: dict[str, list[Batch]] = {
        k: [] for k in (FRESH_BG, FRESH_WAIT, FRESH_NOPOOL, TRUNCATE, ROLLBACK)
    }
    backend = "?"
    n = args.tests
    for rnd in range(args.rounds):
        flip = rnd % 2 == 1  # every other round runs the batches in the opposite order
        for warm in (0, 1) if flip else (1, 0):
            extra = {"instances": {"idle_ttl": "30m", "max": 50, "warm_labels": warm}}
            with proxy_process(
                work, recipe, store=work / "store", backend=args.backend, extra=extra
            ) as pp:
                token = (pp.store / "admin.token").read_text().strip()
                endpoint = Endpoint.discover(f"http://127.0.0.1:{pp.admin_port}", token)
                backend = pp.admin("/v1/status")["backend"]["name"]
                session = plugin_session(endpoint)
                # Build the state (first round) and let the pool fill: not part of a test.
                fresh(session, background=False)
                with psycopg.connect(pp.dsn(f"{ALIAS}:bench-reset")) as conn:
                    runs: dict[str, Callable[[], Batch]] = {}
                    if warm:
                        runs[FRESH_BG] = lambda s=session: batch(
                            lambda: fresh(s, background=True), n, s.wait_removals
                        )
                        runs[FRESH_WAIT] = lambda s=session: batch(
                            lambda: fresh(s, background=False), n
                        )
                    else:
                        runs[FRESH_NOPOOL] = lambda s=session: batch(
                            lambda: fresh(s, background=True), n, s.wait_removals
                        )
                        runs[TRUNCATE] = lambda c=conn: batch(lambda: truncate(c, names), n)
                        runs[ROLLBACK] = lambda c=conn: batch(lambda: rollback(c), n)
                    for label in reversed(runs) if flip else list(runs):
                        time.sleep(1.0)  # the previous batch's background work settles
                        batches[label].append(runs[label]())
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    report(batches, n, args.rounds, backend)


def report(batches: dict[str, list[Batch]], n: int, rounds: int, backend: str) -> None:
    def wall(label: str) -> float:
        return statistics.median(b.wall_s for b in batches[label])

    base = wall(FRESH_BG)
    rows = []
    for label, bs in batches.items():
        xs = [x for b in bs for x in b.per_test_ms]
        rows.append(
            [
                label,
                f"{statistics.median(xs):.1f}",
                f"{statistics.quantiles(xs, n=10)[8]:.1f}",
                f"{wall(label):.2f}",
                f"{wall(label) / base:.2f}x",
            ]
        )
    print(
        f"{n} tests per batch, {rounds} rounds (median batch shown), {TABLES} tables with"
        f" foreign keys, backend {backend}, one test process"
    )
    headers = ["reset per test", "median ms", "p90 ms", f"s per {n} tests", "vs plugin"]
    print(table(headers, rows))
    for label in (TRUNCATE, ROLLBACK):
        ratio = wall(label) / base
        verdict = f"{ratio:.2f}x cheaper" if ratio >= 1 else f"{1 / ratio:.1f}x dearer"
        print(f"a fresh database per test (plugin default) vs {label}: {verdict}")


if __name__ == "__main__":
    main()
