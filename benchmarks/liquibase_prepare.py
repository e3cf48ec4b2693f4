"""Benchmark: Liquibase prepare with a state per changeset against one plain `liquibase update`.

Run as root: .venv/bin/python benchmarks/liquibase_prepare.py [--changesets N] [--backends LIST]
(defaults: 100 changesets, backends btrfs,copy).
Generates a changelog of N changesets, then per snapshot backend (btrfs on a loop image, plain
copy on /tmp) prints, each beside its baseline from the same run:
  cold      prepare with a state per changeset (initdb and the database state made beforehand)
            vs one plain `liquibase update` on an empty database; target <= 2x. Twice: the
            first Liquibase run on a new store (its plan run writes the JVM class archive), then
            a second recipe with the same changelog and another parameter (new state ids, all
            built again) once the archive exists
  append    one changeset appended to the cached changelog vs 2 plain runs; target <= 1x
  resolve   unchanged inputs, a new connection's state resolution; target <= 10 ms
  start     server start on the final (live-taken) state vs on a cleanly stopped state
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import structlog
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taidon_proxy.app import Proxy
from taidon_proxy.config_load import parse_config
from taidon_proxy.prepare.jobs import Job
from taidon_proxy.prepare.liquibase.launcher import find_launcher
from tests.contract.snapshot_fixtures import loop_fs, make_tmp_dir

PG_BIN = Path("/usr/lib/postgresql/15/bin")
HEAD = """<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.liquibase.org/xml/ns/dbchangelog
  http://www.liquibase.org/xml/ns/dbchangelog/dbchangelog-4.20.xsd">
"""


def changeset(i: int) -> str:
    table = f"t{i // 10}"
    if i % 10 == 0:
        return (
            f'<changeSet id="{i}" author="bench"><createTable tableName="{table}">'
            '<column name="id" type="int"/><column name="v" type="text"/>'
            "</createTable></changeSet>\n"
        )
    return (
        f'<changeSet id="{i}" author="bench"><sql>insert into {table} '
        f"select g, md5(g::text) from generate_series(1, 100) g</sql></changeSet>\n"
    )


def write_changelog(root: Path, n: int) -> None:
    (root / "db").mkdir(parents=True, exist_ok=True)
    body = "".join(changeset(i) for i in range(n))
    (root / "db" / "master.xml").write_text(HEAD + body + "</databaseChangeLog>\n")


@contextlib.contextmanager
def plain_server(work: Path) -> Iterator[int]:
    """A plain Postgres on loopback TCP for the baseline runs."""
    data, sock = work / "plain", work / "plainsock"
    sock.mkdir()
    shutil.chown(work, "postgres")
    shutil.chown(sock, "postgres")
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = 55990
    proc = subprocess.Popen(
        [*run, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (sock / f".s.PGSQL.{port}").exists():
            if time.monotonic() > deadline:
                raise SystemExit("plain postgres did not start")
            time.sleep(0.05)
        time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def plain_update(launcher: Path, project: Path, port: int, db: str) -> float:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-qc",
         f"create database {db}"], check=True,
    )  # fmt: skip
    t = time.perf_counter()
    subprocess.run(
        [str(launcher), f"--search-path={project}", "update",
         f"--url=jdbc:postgresql://127.0.0.1:{port}/{db}", "--username=postgres",
         "--changelog-file=db/master.xml"],
        check=True, capture_output=True, cwd=project,
    )  # fmt: skip
    return time.perf_counter() - t


async def candidate(
    store: Path, work: Path, project: Path, backend: str, n: int
) -> dict[str, float]:
    project2 = project.with_name(project.name + "-again")
    shutil.copytree(project, project2)
    cfg = {
        "listen": "127.0.0.1:0", "admin": {"listen": None}, "store": str(store),
        "snapshot": {"backend": backend},
        "runtime": {"kind": "process", "run_dir": str(work / "run")},
        "databases": {
            "bench": {"prepare": {"kind": "lb", "search_path": str(project),
                                  "changelog": "db/master.xml"}},
            "again": {"prepare": {"kind": "lb", "search_path": str(project2),
                                  "changelog": "db/master.xml", "parameters": {"run": "2"}}},
        },
    }  # fmt: skip
    path = work / f"taidon-{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = await Proxy.open(parse_config(path.read_text(), source=path))
    out: dict[str, float] = {}
    try:
        await proxy.start()
        b, store_, rt = proxy.builder, proxy.store, proxy.runtime
        assert b is not None and store_ is not None and rt is not None
        t = time.perf_counter()
        root = await b.ensure_root("bench", Job(alias="bench"))
        out["root"] = time.perf_counter() - t
        await b.ensure_root("again", Job(alias="again"))
        t = time.perf_counter()
        final = await b.resolve("bench")
        out["cold"] = time.perf_counter() - t
        with (project / "db" / "master.xml").open("r+") as f:
            text = f.read().replace("</databaseChangeLog>", changeset(n) + "</databaseChangeLog>")
            f.seek(0)
            f.write(text)
        t = time.perf_counter()
        final = await b.resolve("bench")
        out["append"] = time.perf_counter() - t
        samples = []
        for _ in range(50):
            t = time.perf_counter()
            assert await b.resolve("bench") == final
            samples.append(time.perf_counter() - t)
        out["resolve"] = statistics.median(samples)
        out["resolve_max"] = max(samples)
        await store_.settle()  # the sizes of the states above, measured once builds are idle
        t = time.perf_counter()
        await b.resolve("again")
        out["cold_again"] = time.perf_counter() - t
        for label, sid in (("start_live", final), ("start_clean", root)):
            times = []
            for _ in range(3):
                clone_id, cpath = await store_.clone(sid, "x")
                try:
                    t = time.perf_counter()
                    h = await rt.start(clone_id, cpath / "pgdata", {})
                    times.append(time.perf_counter() - t)
                    await rt.stop(h)
                finally:
                    await store_.remove_clone(clone_id)
            out[label] = statistics.median(times)
    finally:
        await proxy.close()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changesets", type=int, default=100)
    ap.add_argument("--backends", default="btrfs,copy")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    launcher = find_launcher(parse_config("{}", source=Path(__file__)))
    n = args.changesets
    work = make_tmp_dir("taidon-bench-lb-")
    try:
        base_project = work / "proj"
        write_changelog(base_project, n)
        with plain_server(work) as port:
            plain = [plain_update(launcher, base_project, port, f"b{i}") for i in range(3)]
        base = statistics.median(plain)
        print(f"baseline: plain liquibase update, {n} changesets, empty db: {base:.2f} s"
              f" (runs: {', '.join(f'{x:.2f}' for x in plain)})")  # fmt: skip
        for backend in args.backends.split(","):
            project = work / f"proj-{backend}"
            shutil.copytree(base_project, project)
            if backend == "copy":
                store_cm: contextlib.AbstractContextManager[Path] = contextlib.nullcontext(work)
            else:
                store_cm = loop_fs(backend, "4G")
            with store_cm as mnt:
                r = await candidate(mnt / f"store-{backend}", work, project, backend, n)
            print(
                f"[{backend}] initdb + database state (once per engine/recipe): {r['root']:.2f} s"
            )
            print(f"[{backend}] cold, a state per changeset: {r['cold']:.2f} s vs {base:.2f} s"
                  f" -> {r['cold'] / base:.2f}x (target <= 2x; first Liquibase run on this"
                  " store: no class archive yet)")  # fmt: skip
            print(f"[{backend}] cold, another recipe, class archive present:"
                  f" {r['cold_again']:.2f} s vs {base:.2f} s -> {r['cold_again'] / base:.2f}x"
                  " (target <= 2x)")  # fmt: skip
            ratio = r["append"] / (2 * base)
            print(f"[{backend}] one changeset appended: {r['append']:.2f} s vs 2 runs"
                  f" {2 * base:.2f} s -> {ratio:.2f}x (target <= 1x)")  # fmt: skip
            print(f"[{backend}] unchanged inputs, resolve: median {r['resolve'] * 1000:.2f} ms,"
                  f" max {r['resolve_max'] * 1000:.2f} ms (target <= 10 ms)")  # fmt: skip
            live, clean = r["start_live"] * 1000, r["start_clean"] * 1000
            print(f"[{backend}] server start on the live-taken final state {live:.0f} ms"
                  f" vs clean state {clean:.0f} ms -> {live / clean:.2f}x")  # fmt: skip
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


if __name__ == "__main__":
    asyncio.run(main())
