"""Connect -> first query on a fresh instance: docker runtime vs process runtime, same data.

Each round copies one template cluster (made once by the process runtime's initdb) to a fresh
data directory per runtime, then times start() + asyncpg connect over the instance's unix
socket + `select 1`. Copies and ownership changes happen before the clock starts; stops after
it ends. Rounds alternate docker and process so drift hits both alike.

    sudo .venv/bin/python benchmarks/runtime_connect.py [--rounds 10] [--image taidon/postgres:15]

Needs root, a running dockerd (scripts/dockerd-up) and the image (scripts/docker-image).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg
import structlog

from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.runtimes.docker import DockerRuntime
from taidon_proxy.runtimes.process import ProcessRuntime


async def one_round(rt: InstanceRuntime, instance_id: str, pgdata: Path) -> tuple[float, float]:
    """Return (start() ms, start() + connect + first query ms)."""
    t0 = time.perf_counter()
    handle = await rt.start(instance_id, pgdata)
    t1 = time.perf_counter()
    conn = await asyncpg.connect(
        host=str(handle.socket_dir), port=handle.port, user="postgres", database="postgres"
    )
    assert await conn.fetchval("select 1") == 1
    t2 = time.perf_counter()
    await conn.close()
    await rt.stop(handle, mode="immediate")
    return (t1 - t0) * 1000, (t2 - t0) * 1000


def fresh_copy(template: Path, dest: Path, owner: tuple[int, int] | None) -> None:
    subprocess.run(["cp", "-a", str(template), str(dest)], check=True)
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", str(dest)], check=True)


def summary(name: str, starts: list[float], totals: list[float]) -> str:
    return (
        f"{name:8s} connect->first query: median {statistics.median(totals):7.1f} ms  "
        f"min {min(totals):7.1f}  max {max(totals):7.1f}   "
        f"(start() alone: median {statistics.median(starts):7.1f} ms)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--image", default="taidon/postgres:15")
    args = parser.parse_args()
    # Only the numbers on stdout: the runtimes' info events would interleave with them.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if os.geteuid() != 0:
        raise SystemExit("run as root: the process runtime switches to the postgres user")

    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="taidon-bench-"))
    work.chmod(0o755)
    process = ProcessRuntime(run_dir=work / "prun")
    docker = DockerRuntime(image=args.image, run_dir=work / "drun", store_label="taidon-bench")
    try:
        template = work / "template"
        await process.init_cluster(template, {})
        facts = await docker.image_facts()
        p_engine, d_engine = await process.engine(), await docker.engine()
        print(f"process: postgres {p_engine.version} from {p_engine.source}")
        print(f"docker:  postgres {d_engine.version} from {d_engine.source}")
        # One warm-up each: first start of an image/binary pays page-cache misses.
        for name, rt, owner in (("p", process, None), ("d", docker, (facts.uid, facts.gid))):
            fresh_copy(template, work / f"warm-{name}", owner)
            await one_round(rt, f"warm-{name}", work / f"warm-{name}")

        results: dict[str, tuple[list[float], list[float]]] = {
            "process": ([], []),
            "docker": ([], []),
        }
        for i in range(args.rounds):
            for name, rt, owner in (
                ("docker", docker, (facts.uid, facts.gid)),
                ("process", process, None),
            ):
                pgdata = work / f"{name}-{i}"
                fresh_copy(template, pgdata, owner)
                start_ms, total_ms = await one_round(rt, f"{name}-{i}", pgdata)
                results[name][0].append(start_ms)
                results[name][1].append(total_ms)
                shutil.rmtree(pgdata)
        print(f"rounds: {args.rounds}, same template data dir for both, fresh copy per round")
        print(summary("process", *results["process"]))
        print(summary("docker", *results["docker"]))
        ratio = statistics.median(results["docker"][1]) / statistics.median(results["process"][1])
        print(f"ratio docker/process (median connect->first query): {ratio:.2f}x")
    finally:
        await docker.close()
        await process.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
