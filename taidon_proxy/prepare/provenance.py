"""What made a state, recorded when it is built: per step the files (path, SHA-256, git blob
id, the commit they came from at a ref), the tool and its version, parameters as hashes only;
per chain the engine, initdb settings and backend (docs/provenance.md).

A record is kept once per state id (the first build's): states are content-addressed, so a
later build of the same id had the same inputs, maybe read at another ref or path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from taidon_proxy.prepare.context import BuildContext

Record = dict[str, Any]


def blob_id(data: bytes) -> str:
    """The id git gives a file's content (`git hash-object`), with or without a repository."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def value_hash(name: str, value: str) -> str:
    """A parameter as its hash (salted with its name): the value itself is never recorded."""
    return "sha256:" + hashlib.sha256(f"{name}\0{value}".encode()).hexdigest()


def hashed(values: Mapping[str, str]) -> dict[str, str]:
    return {k: value_hash(k, v) for k, v in sorted(values.items())}


def shown_path(path: Path, ctx: BuildContext) -> str:
    """A file as the recipe names it: relative to the checkout (at a ref) or the recipe's
    directory, else its absolute path (a file outside the project, an installed app's)."""
    for base in (ctx.checkout.path if ctx.checkout else None, ctx.base_dir):
        if base is None:
            continue
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def files(ctx: BuildContext, paths: Iterable[Path]) -> list[Record]:
    """Each file's path, SHA-256 and git blob id (and, at a ref, the commit it is from)."""
    out: list[Record] = []
    for p in dict.fromkeys(paths):
        try:
            data = p.read_bytes()
        except OSError:
            out.append({"path": shown_path(p, ctx), "missing": True})
            continue
        rec: Record = {
            "path": shown_path(p, ctx),
            "sha256": hashlib.sha256(data).hexdigest(),
            "blob": blob_id(data),
            "bytes": len(data),
        }
        if ctx.checkout is not None:
            rec["commit"] = ctx.checkout.commit
        out.append(rec)
    return out


def source(ctx: BuildContext) -> Record:
    """Where the recipe's files were read: a git ref's commit and tree, or the work tree."""
    co = ctx.checkout
    if co is None:
        return {"source": "work tree"}
    return {"source": "git", "ref": co.ref, "commit": co.commit, "tree": co.tree}


def step(ctx: BuildContext, tool: str, version: str | None, **fields: Any) -> Record:
    """One step's record: the recipe, the tool and its version, where its files came from."""
    return {
        "alias": ctx.alias, "recipe_kind": ctx.recipe.prepare.kind, "tool": tool,
        "tool_version": version, **source(ctx), **fields,
    }  # fmt: skip
