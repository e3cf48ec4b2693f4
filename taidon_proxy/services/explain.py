"""Why a recipe's plan misses the cache: the first step not cached, and what changed there.

State ids are chained (a step's id hashes its parent's id and the step's input), and every id
ever derived is kept in the metadata's `links`. So at the first missing step, the states
derived from the same parent say what happened: the same id was built and then evicted; a
step of the same name was built from other input (its file changed); or other steps were
built there (this one is new, or the order changed); or nothing was built past that point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from taidon_proxy.errors import TaidonError
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.context import PlannedStep
from taidon_proxy.store.metadata_api import MetadataStore


@dataclass(frozen=True)
class Miss:
    step: int  # 1-based; 0 is the root (Postgres version, initdb settings, database, roles)
    label: str
    reason: str  # evicted | changed | new_step | not_built | root
    message: str
    nearest: str | None  # the cached state the explanation compares with

    def view(self) -> dict[str, Any]:
        return asdict(self)


async def first_miss(
    builder: StateBuilder, meta: MetadataStore, alias: str, steps: list[PlannedStep]
) -> Miss | None:
    root = await builder.root_id(alias)
    if await meta.get_state(root) is None:
        return Miss(
            0, "root", "root",
            "no root state for this Postgres version, initdb settings, database and roles"
            " yet (a change of any of them starts a new chain)",
            None,
        )  # fmt: skip
    # A build starts at the deepest cached step (steps before it may not have been kept):
    # the miss that costs is the first step after it.
    deepest = max((i for i, step in enumerate(steps) if step.cached), default=-1)
    parent = steps[deepest].state_id if deepest >= 0 else root
    rest = list(enumerate(steps, start=1))[deepest + 1 :]
    # Steps built before with the same inputs but not stored (not kept, or evicted) are
    # replayed, not changed: name the first input that did change, if one did.
    before = parent
    for i, step in rest:
        if await meta.link(step.state_id) is None:
            return await _why(meta, i, step, before)
        before = step.state_id
    return await _why(meta, rest[0][0], rest[0][1], parent) if rest else None


async def _why(meta: MetadataStore, i: int, step: PlannedStep, parent: str) -> Miss:
    if await meta.link(step.state_id) is not None:
        return Miss(
            i, step.label, "evicted",
            f"{step.label} was built before with these inputs (state {step.state_id[:12]}),"
            " but is not stored (evicted, removed, or not kept: liquibase.keep_every):"
            " it is built again",
            parent,
        )  # fmt: skip
    others = [k for k in await meta.child_links(parent) if k.id != step.state_id]
    kept = [k for k in others if await meta.get_state(k.id) is not None]
    same = [k for k in kept if k.label == step.label] or [
        k for k in others if k.label == step.label
    ]
    if same:
        return Miss(
            i, step.label, "changed",
            f"{step.label} changed since state {same[-1].id[:12]} was built from it"
            " (after the same earlier steps)",
            same[-1].id,
        )  # fmt: skip
    if others:
        labels = ", ".join(sorted({k.label for k in others}))
        return Miss(
            i, step.label, "new_step",
            f"{step.label} is new at step {i}: after the same earlier steps the cache has"
            f" built {labels}",
            parent,
        )  # fmt: skip
    return Miss(
        i, step.label, "not_built",
        f"nothing was built after step {i - 1} yet" if i > 1 else "no step was built yet",
        parent,
    )  # fmt: skip


async def stale_reason(builder: StateBuilder, meta: MetadataStore, alias: str) -> Miss | str | None:
    """Why a stale recipe is stale: its first miss (the step and the input that changed), or
    the planner's own error as text (an input file that cannot be read); None: every step is
    cached (the next prepare only records the current state)."""
    try:
        steps = await builder.plan(alias, None)
    except TaidonError as e:
        return str(e)
    return await first_miss(builder, meta, alias, steps)
