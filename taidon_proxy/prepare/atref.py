"""A recipe as of a git ref: its directory checked out from git, its paths rebased there.

Every kind takes a ref. psql and lb name their files (the SQL files, the search path); a
command recipe runs in the config's directory with its input globs there; alembic and django
recipes name their config (alembic.ini, manage.py) and run the project's Python there. Their
interpreter (`python:`) and what it has installed are the environment, not the recipe's
files, and are never rebased (docs/git-refs.md, "Limits").
"""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from taidon_proxy.config import (
    AlembicPrepare,
    CommandPrepare,
    DjangoPrepare,
    LiquibasePrepare,
    Prepare,
    PsqlPrepare,
    Recipe,
)
from taidon_proxy.errors import TaidonError
from taidon_proxy.prepare.gitref import UNDEFINED_FILE, Checkout, GitTrees

FEATURE_NOT_SUPPORTED = "0A000"


@dataclass(frozen=True)
class AtRef:
    """What a build at a ref uses instead of the work tree's recipe and base directory."""

    recipe: Recipe
    base_dir: Path
    checkout: Checkout

    def where(self) -> str:
        return f'at ref "{self.checkout.ref}" (commit {self.checkout.short})'


def _glob_root(pattern: str, base: Path) -> tuple[Path, str]:
    """A glob's fixed leading directory (absolute) and the rest of the pattern."""
    parts = Path(pattern if os.path.isabs(pattern) else str(base / pattern)).parts
    fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts[:-1]))
    rest = parts[len(fixed) :]
    return Path(*fixed).resolve(), str(Path(*rest))


def _declared(recipe: Recipe, base_dir: Path) -> list[Path]:
    prep = recipe.prepare
    if isinstance(prep, PsqlPrepare):
        return list(prep.files)
    if isinstance(prep, LiquibasePrepare):
        return list(prep.search_path)
    if isinstance(prep, CommandPrepare):
        return [_glob_root(p, base_dir)[0] for p in prep.inputs]
    if isinstance(prep, AlembicPrepare):
        return [prep.config] + ([prep.lock] if prep.lock is not None else [])
    if isinstance(prep, DjangoPrepare):
        return [prep.manage, *prep.pythonpath]
    raise TaidonError(  # a kind added later, until it says what it reads
        f"git refs are not supported for recipes of kind {prep.kind} yet",
        sqlstate=FEATURE_NOT_SUPPORTED,
        hint="connect without @ref to use the work tree",
    )


def checkout_root(base_dir: Path, recipe: Recipe) -> Path:
    """The smallest directory holding the config's directory and every path the recipe names."""
    paths = [str(base_dir.resolve())] + [str(p.resolve()) for p in _declared(recipe, base_dir)]
    return Path(os.path.commonpath(paths))


def _missing(co: Checkout, path: Path, ref: str, what: str = "recipe file") -> TaidonError:
    return TaidonError(
        f'{what} {path.relative_to(co.path)} does not exist at ref "{ref}" (commit {co.short})',
        sqlstate=UNDEFINED_FILE,
    )


def _rebased(prep: Prepare, co: Checkout, base_dir: Path, ref: str) -> Prepare:
    def moved(p: Path) -> Path:
        return co.rebase(p.resolve())

    def present(p: Path) -> Path:
        if not moved(p).is_file():
            raise _missing(co, moved(p), ref)
        return moved(p)

    if isinstance(prep, PsqlPrepare):
        return prep.model_copy(update={"files": [present(f) for f in prep.files]})
    if isinstance(prep, LiquibasePrepare):
        return prep.model_copy(update={"search_path": [moved(p) for p in prep.search_path]})
    if isinstance(prep, CommandPrepare):
        # Every glob made absolute in the checkout: the rebased recipe (the fast path's key)
        # then differs between trees, as psql's rebased file paths do.
        roots = [_glob_root(p, base_dir) for p in prep.inputs]
        return prep.model_copy(update={"inputs": [str(moved(d) / rest) for d, rest in roots]})
    if isinstance(prep, AlembicPrepare):
        lock = present(prep.lock) if prep.lock is not None else None
        return prep.model_copy(update={"config": present(prep.config), "lock": lock})
    assert isinstance(prep, DjangoPrepare)
    return prep.model_copy(
        update={"manage": present(prep.manage), "pythonpath": [moved(p) for p in prep.pythonpath]}
    )


async def at_ref(trees: GitTrees, base_dir: Path, recipe: Recipe, ref: str) -> AtRef:
    root = checkout_root(base_dir, recipe)
    co = await trees.checkout(root, ref)
    return _at(recipe, co, base_dir, ref)


def _at(recipe: Recipe, co: Checkout, base_dir: Path, ref: str) -> AtRef:
    rebased = recipe.model_copy(update={"prepare": _rebased(recipe.prepare, co, base_dir, ref)})
    return AtRef(rebased, co.rebase(base_dir.resolve()), co)
