"""The fast path for a state that arrived without a build (an imported bundle).

A connection finds a recipe's state by the fingerprint of its inputs, which only a build
records. `adopt` records it when the recipe, planned here from its current inputs, ends
at a state the store already holds: the next connection then takes the fast path, with no
build and without the chain's ancestors (only the final state's data is stored).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from taidon_proxy.config import LiquibasePrepare
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.context import BuildContext
from taidon_proxy.prepare.jobs import Job
from taidon_proxy.prepare.session import WorkSession
from taidon_proxy.store.fingerprint import FileHashCache


class _WouldBuild(Exception):
    """The adapter asked for a work session: some step of the recipe is not stored."""


@dataclass(frozen=True)
class Adoption:
    alias: str
    recipe_state: str | None  # the recipe's final state as planned here (None: not known)
    adopted: bool


async def _no_session(_state_id: str) -> WorkSession:
    raise _WouldBuild


async def _final_and_inputs(builder: StateBuilder, alias: str) -> tuple[str, list[str]] | None:
    recipe = builder.config.databases[alias]
    prep = recipe.prepare
    if isinstance(prep, LiquibasePrepare):
        # Its build would start Liquibase on a server; its plan is one short JVM, no server.
        from taidon_proxy.prepare.liquibase.inputs import collect_inputs

        steps = await builder.plan(alias)
        final = steps[-1].state_id if steps else await builder.root_id(alias)
        return final, await asyncio.to_thread(collect_inputs, prep)
    # Every other adapter returns at once when its final state is stored, and otherwise
    # opens a session first, which is refused here: a build is the connection's business.
    root = await builder.root_id(alias)
    ctx: BuildContext = replace(
        builder.context(alias, Job(alias=alias), root), open_session=_no_session
    )
    try:
        result = await builder.adapters[prep.kind].build(ctx)
    except _WouldBuild:
        return None
    return result.state_id, result.inputs


async def adopt(builder: StateBuilder, alias: str, state_id: str) -> Adoption:
    """Make `state_id` the recipe's fast-path answer if its current inputs plan to it."""
    builder.recipe(alias)
    key = await builder.recipe_key(alias)
    found = await _final_and_inputs(builder, alias)
    if found is None:
        return Adoption(alias, None, False)
    final, inputs = found
    if final != state_id or await builder.store.get(state_id) is None:
        return Adoption(alias, final, False)
    paths = [Path(p) for p in inputs]
    fingerprint = await asyncio.to_thread(FileHashCache().fingerprint, key, paths)
    # An input edited after the plan read it would pair new content with the old state:
    # plan again after the fingerprint, and keep it only if nothing moved.
    again = await _final_and_inputs(builder, alias)
    if again is None or again[0] != state_id or sorted(again[1]) != sorted(inputs):
        return Adoption(alias, None if again is None else again[0], False)
    if await asyncio.to_thread(FileHashCache().fingerprint, key, paths) != fingerprint:
        return Adoption(alias, final, False)
    await builder.store.meta.set_fingerprint(key, fingerprint, state_id, inputs)
    return Adoption(alias, final, True)
