"""A recipe as of a git ref: its directory checked out from git, its paths rebased there."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from taidon_proxy.config import LiquibasePrepare, PsqlPrepare, Recipe
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


def _declared(recipe: Recipe) -> list[Path]:
    prep = recipe.prepare
    if isinstance(prep, PsqlPrepare):
        return list(prep.files)
    if isinstance(prep, LiquibasePrepare):
        return list(prep.search_path)
    raise TaidonError(
        f"git refs are not supported for recipes of kind {prep.kind} yet",
        sqlstate=FEATURE_NOT_SUPPORTED,
        hint="refs work for kinds psql and lb; connect without @ref to use the work tree",
    )


def checkout_root(base_dir: Path, recipe: Recipe) -> Path:
    """The smallest directory holding the config's directory and every path the recipe names."""
    paths = [str(base_dir.resolve())] + [str(p.resolve()) for p in _declared(recipe)]
    return Path(os.path.commonpath(paths))


async def at_ref(trees: GitTrees, base_dir: Path, recipe: Recipe, ref: str) -> AtRef:
    root = checkout_root(base_dir, recipe)
    co = await trees.checkout(root, ref)
    prep = recipe.prepare
    new_prep: PsqlPrepare | LiquibasePrepare

    def moved(p: Path) -> Path:
        return co.rebase(p.resolve())

    if isinstance(prep, PsqlPrepare):
        for f in prep.files:
            if not moved(f).is_file():
                raise TaidonError(
                    f'recipe file {moved(f).relative_to(co.path)} does not exist at ref "{ref}"'
                    f" (commit {co.short})",
                    sqlstate=UNDEFINED_FILE,
                )
        new_prep = prep.model_copy(update={"files": [moved(f) for f in prep.files]})
    else:
        assert isinstance(prep, LiquibasePrepare)
        new_prep = prep.model_copy(update={"search_path": [moved(p) for p in prep.search_path]})
    rebased = recipe.model_copy(update={"prepare": new_prep})
    return AtRef(rebased, moved(base_dir), co)
