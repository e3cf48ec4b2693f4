"""Benchmark: resolving `alias@ref` to its checked-out recipe, uncached vs cached.

Run: .venv/bin/python benchmarks/gitref_resolve.py [--files 40] [--repeat 200]
Makes a git repository in a temporary directory (a psql recipe of --files files on two
branches), then prints milliseconds per resolution (GitTrees + the recipe's paths rebased
into the checkout, as a connection with a ref does before the state's fast path):
- first: a ref never seen (git rev-parse, ls-tree, cat-file --batch, the tree written);
- uncached: a fresh resolver per call on an already materialised tree (the git calls every
  time: the baseline);
- moved: the branch got a new commit since the last call (rev-parse again, a new tree);
- hit: the ref unchanged (a few stat calls; the candidate). Target for a hit: <= 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taidon_proxy.config import PsqlPrepare, Recipe
from taidon_proxy.prepare.atref import at_ref
from taidon_proxy.prepare.gitref import GitTrees

ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.invalid",
    "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.invalid",
}  # fmt: skip


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=ENV)


def make_repo(repo: Path, n: int) -> Recipe:
    git(repo, "init", "-q", "-b", "main")
    (repo / "sql").mkdir()
    for i in range(n):
        (repo / f"sql/{i:03}.sql").write_text(f"create table t{i} (x int);\n")
    git(repo, "add", "sql")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "branch", "feature")
    files = [repo / f"sql/{i:03}.sql" for i in range(n)]
    return Recipe(prepare=PsqlPrepare(kind="psql", files=files))


def ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1e3:7.2f} ms  p95 " + (
        f"{sorted(samples)[int(len(samples) * 0.95) - 1] * 1e3:7.2f} ms"
    )


async def main(files: int, repeat: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="taidon-bench-gitref-"))
    try:
        repo, store = tmp / "repo", tmp / "store"
        repo.mkdir()
        recipe = make_repo(repo, files)
        trees = GitTrees(store)
        t = time.perf_counter()
        await at_ref(trees, repo, recipe, "feature")
        first = time.perf_counter() - t

        uncached = []
        for _ in range(max(10, repeat // 10)):
            t = time.perf_counter()
            await at_ref(GitTrees(store), repo, recipe, "feature")
            uncached.append(time.perf_counter() - t)

        moved = []
        for i in range(max(5, repeat // 40)):
            (repo / "sql/000.sql").write_text(f"create table t0 (x int); -- {i}\n")
            git(repo, "commit", "-q", "-am", f"move {i}")  # main moves
            t = time.perf_counter()
            await at_ref(trees, repo, recipe, "main")
            moved.append(time.perf_counter() - t)

        hits = []
        for _ in range(repeat):
            t = time.perf_counter()
            await at_ref(trees, repo, recipe, "feature")
            hits.append(time.perf_counter() - t)

        base, cand = statistics.median(uncached), statistics.median(hits)
        print(f"recipe of {files} files, {repeat} hits")
        print(f"first (materialise):  {first * 1e3:7.2f} ms")
        print(f"uncached (baseline):  {ms(uncached)}")
        print(f"moved branch:         {ms(moved)}")
        print(f"hit (candidate):      {ms(hits)}")
        print(f"baseline / candidate: {base / cand:.1f}x; hit target 10 ms: "
              + ("met" if cand <= 0.010 else "MISSED"))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(main(args.files, args.repeat))
