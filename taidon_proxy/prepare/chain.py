"""Recipes planned as a chain of steps (a revision, a migration): their state ids, the deepest
cached prefix, and one tool run and one commit per step not yet cached."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.runtimes.base import InstanceHandle
from taidon_proxy.store.ids import step_state_id


@dataclass(frozen=True)
class ChainStep:
    step_hash: str
    name: str  # what progress and errors call it ("r3a migrations/versions/r3a.py")
    label: str  # the state's label (its provenance: may add the tool's version)
    # What made the state (prepare/provenance.py): kept with it, not part of its id.
    record: dict[str, Any] | None = field(default=None, compare=False)


# Applies step i to the build server the handle names; raises BuildFailed when it fails.
RunStep = Callable[[int, InstanceHandle], Awaitable[None]]


def state_ids(root: str, kind: str, steps: Sequence[ChainStep]) -> list[str]:
    ids, parent = [], root
    for s in steps:
        parent = step_state_id(parent, kind, s.step_hash)
        ids.append(parent)
    return ids


async def planned(ctx: BuildContext, kind: str, steps: Sequence[ChainStep]) -> list[PlannedStep]:
    ids = state_ids(ctx.root_state, kind, steps)
    return [PlannedStep(i, s.name, await ctx.has_state(i)) for i, s in zip(ids, steps, strict=True)]


async def build_chain(
    ctx: BuildContext, kind: str, steps: Sequence[ChainStep], run: RunStep, *,
    noun: str, inputs: list[str], log: str | None = None,
) -> BuildResult:  # fmt: skip
    """Run the steps after the deepest cached one on one build clone, a state after each."""
    ids = state_ids(ctx.root_state, kind, steps)
    if not ids:
        return BuildResult(ctx.root_state, inputs)
    # Deepest cached prefix: an edited step k reuses states 1..k-1.
    start = 0
    for i in range(len(ids) - 1, -1, -1):
        if await ctx.has_state(ids[i]):
            start = i + 1
            break
    if start == len(ids):
        ctx.job.emit("progress", f"all {len(ids)} {noun}s cached")
        return BuildResult(ids[-1], inputs)
    if log is not None:
        ctx.job.emit("log", log)
    session = await ctx.open_session(ids[start - 1] if start else ctx.root_state)
    try:
        for i in range(start, len(ids)):
            step = steps[i]
            ctx.job.emit("step.start", f"applying {step.name} ({i + 1}/{len(ids)})")
            session.begin_step()
            handle = await session.start()
            await run(i, handle)
            await session.commit(kind, step.step_hash, step.label, provenance=step.record)
    finally:
        await session.close()
    return BuildResult(ids[-1], inputs)
