"""Real git repositories for the tests of git refs: a psql recipe on branches and a tag."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

FILES = ("sql/01_schema.sql", "sql/02_tables.sql")


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(repo), "GIT_CONFIG_NOSYSTEM": "1",
             "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"},
    )  # fmt: skip
    return out.stdout.strip()


def commit_all(repo: Path, message: str, folder: str = "sql") -> str:
    git(repo, "add", "-A", folder)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def write(repo: Path, name: str, text: str) -> None:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(text)


def make_repo(repo: Path) -> dict[str, str]:
    """main (tag v1): a (with an \\ir-included type) and b; feature: 02 also makes c; old: no
    02 file; noinc: the included file deleted. The work tree is on main, with an uncommitted
    change to 02 (table d)."""
    git(repo, "init", "-q", "-b", "main")
    write(repo, "sql/inc/types.sql", "create type mood as enum ('ok', 'meh');\n")
    write(repo, "sql/01_schema.sql", "\\ir inc/types.sql\ncreate table a (m mood);\n")
    ids = {"old": commit_all(repo, "schema only")}
    git(repo, "branch", "old")
    write(repo, "sql/02_tables.sql", "create table b (x int);\n")
    ids["main"] = commit_all(repo, "table b")
    git(repo, "tag", "v1")
    git(repo, "checkout", "-q", "-b", "feature")
    write(repo, "sql/02_tables.sql", "create table b (x int);\ncreate table c (y int);\n")
    ids["feature"] = commit_all(repo, "table c")
    git(repo, "checkout", "-q", "-b", "noinc", "main")
    (repo / "sql/inc/types.sql").unlink()
    commit_all(repo, "lose the include")
    git(repo, "checkout", "-q", "main")
    write(repo, "sql/02_tables.sql", "create table b (x int);\ncreate table d (z int);\n")
    return ids


def recipe(repo: Path) -> dict[str, Any]:
    return {"prepare": {"kind": "psql", "files": [str(repo / f) for f in FILES]}}
