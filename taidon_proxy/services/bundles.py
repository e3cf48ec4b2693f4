"""State bundles as use-cases: export a stored state, import one (verified, stored, adopted),
and the cache key of a recipe (its final state id, planned without a build)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO

from taidon_proxy.config import Config
from taidon_proxy.errors import TaidonError
from taidon_proxy.prepare.adopt import Adoption, adopt
from taidon_proxy.prepare.builder import INITDB_SETTINGS, StateBuilder
from taidon_proxy.services.errors import not_found
from taidon_proxy.services.lookup import find_state
from taidon_proxy.store.bundle import ExportSource, ImportResult, import_bundle, prepare_export
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.states import StateStore


async def _engines(builder: StateBuilder, row: StateRow) -> list[tuple[str, str]]:
    """(major.minor, source) pairs that may have made the state's initdb root: the engine
    this proxy runs, named as the builder names it, then the version the state records."""
    e = await builder.engine()
    source = e.source if e.source.startswith("docker") else "host"
    return [(e.version, source), (row.engine, "host")]


async def export_state(store: StateStore, builder: StateBuilder, ref: str) -> ExportSource:
    """The manifest of the state `ref` names (a name, an id or a unique prefix), ready to
    write; raises BundleError when its chain cannot be listed or checked."""
    row = await find_state(store.meta, ref)
    return await prepare_export(store, row, await _engines(builder, row), INITDB_SETTINGS)


@dataclass(frozen=True)
class ImportOutcome:
    result: ImportResult
    alias: str | None  # the recipe checked for adoption (the manifest's, or the one asked for)
    adoption: Adoption | None
    problem: str | None  # why the recipe could not be planned here

    @property
    def message(self) -> str:
        m = self.result.manifest
        if self.result.imported:
            text = f"imported state {m.state[:12]} ({m.link.label})"
        else:
            text = f"state {m.state[:12]} is already in the store: nothing imported"
        a = self.adoption
        if a is not None and a.adopted:
            text += f"; {a.alias} serves it now, without a build"
        elif a is not None:
            planned = f" (it plans {a.recipe_state[:12]})" if a.recipe_state else ""
            text += (
                f"; {a.alias}'s recipe here does not end at it{planned}: its next connection"
                " builds what is missing"
            )
        elif self.problem:
            text += f"; {self.alias} was not checked: {self.problem}"
        elif self.alias is not None:
            text += f"; no recipe {self.alias} is configured here: connect with state:{m.state}"
        return text

    def view(self) -> dict[str, Any]:
        m = self.result.manifest
        return {
            "state": m.state,
            "imported": self.result.imported,
            "alias": self.alias,
            "label": m.link.label,
            "engine": m.engine.version,
            "content_bytes": m.content.size,
            "adopted": bool(self.adoption and self.adoption.adopted),
            "recipe_state": self.adoption.recipe_state if self.adoption else None,
            "message": self.message,
        }


async def import_state(
    store: StateStore,
    builder: StateBuilder,
    config: Config,
    src: BinaryIO,
    alias: str | None = None,
) -> ImportOutcome:
    """Verify and store the bundle `src` holds (blocking reads, done in threads), then make
    it the fast-path answer of its recipe (`alias`, else the manifest's) if the recipe,
    planned here, ends at it. A refused bundle (BundleError) stores nothing."""
    if alias is not None and alias not in config.databases:
        raise not_found("alias", alias)
    engine = await builder.engine()
    result = await import_bundle(store, src, engine.major, engine.version)
    target = alias or result.manifest.alias
    if target is None or target not in config.databases:
        return ImportOutcome(result, target, None, None)
    try:
        adoption = await adopt(builder, target, result.manifest.state)
    except TaidonError as e:  # the recipe cannot be planned here (a missing file): say so
        return ImportOutcome(result, target, None, e.message)
    return ImportOutcome(result, target, adoption, None)


@dataclass(frozen=True)
class CacheKey:
    alias: str
    key: str  # the recipe's final state id: it changes exactly when that id would
    steps: int
    cached: bool  # the final state is in this store
    ref: str | None = None  # the git ref the recipe's files were read at (None: the work tree)

    def view(self) -> dict[str, Any]:
        return {
            "alias": self.alias, "key": self.key, "steps": self.steps, "cached": self.cached,
            "ref": self.ref,
        }  # fmt: skip


async def cache_key(builder: StateBuilder, alias: str, ref: str | None = None) -> CacheKey:
    """Planned from the recipe's inputs (at a git ref: that commit's files) and this proxy's
    engine, without building anything (a Liquibase plan starts one Liquibase, no server)."""
    steps = await builder.plan(alias, ref)
    final = steps[-1].state_id if steps else await builder.root_id(alias)
    cached = steps[-1].cached if steps else await builder.store.get(final) is not None
    return CacheKey(alias, final, len(steps), cached, ref)
