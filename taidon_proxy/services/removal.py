"""Removing a state: what goes with it (descendants, instances, kept clones), what blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from taidon_proxy.instances.manager import Instance, InstanceManager
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.errors import Refusal
from taidon_proxy.store.metadata import SharedRecord, StateRow
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.admin")


@dataclass
class RemovalPlan:
    target: StateRow
    states: list[StateRow]  # leaves first
    instances: list[Instance]
    kept: list[SharedRecord] = field(default_factory=list)  # stopped shared instances' clones
    blockers: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "target": self.target.id,
            "states": [s.id for s in self.states],
            "bytes": sum(s.size_bytes for s in self.states),
            "instances": [i.id for i in self.instances] + [r.clone_id for r in self.kept],
            "blockers": self.blockers,
        }


async def plan_removal(
    store: StateStore, instances: InstanceManager, target: StateRow
) -> RemovalPlan:
    """The state and every descendant (children are built on their parents), and what blocks."""
    rows = await store.meta.states()
    kids: dict[str | None, list[StateRow]] = {}
    for r in rows:
        kids.setdefault(r.parent, []).append(r)
    order: list[StateRow] = []
    stack = [target]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(kids.get(node.id, []))
    order.reverse()  # descendants before ancestors
    ids = {s.id for s in order}
    insts = [i for i in instances.instances.values() if i.state_id in ids]
    kept = [r for r in instances.kept.values() if r.state_id in ids]
    plan = RemovalPlan(target, order, insts, kept)
    if insts:
        plan.blockers.append(f"{len(insts)} running instance(s): " + ", ".join(i.id for i in insts))
    if kept:
        plan.blockers.append(
            f"{len(kept)} stopped shared instance(s) keep a clone: "
            + ", ".join(f"{r.key} ({r.clone_id})" for r in kept)
        )
    pinned = [s.id[:12] for s in order if s.pinned]
    if pinned:
        plan.blockers.append("pinned: " + ", ".join(pinned))
    if len(order) > 1:
        plan.blockers.append(f"{len(order) - 1} descendant state(s) would go too")
    return plan


async def remove_state(
    store: StateStore,
    instances: InstanceManager,
    target: StateRow,
    *,
    force: bool,
    audit: Audit,
    actor: str,
) -> RemovalPlan:
    """Remove the state and its descendants; refused (in_use) when anything blocks, unless
    forced: then the instances on them stop (their clients get 57P01) and kept clones go."""
    plan = await plan_removal(store, instances, target)
    if plan.blockers and not force:
        raise Refusal(
            "in_use",
            f"state {target.id[:12]} is in use: " + "; ".join(plan.blockers),
            hint="pass force=true to remove it anyway (running instances are stopped)",
            **plan.view(),
        )
    for inst in plan.instances:
        await instances.remove(inst, "state removed")
    for rec in plan.kept:
        await instances.remove(rec, "state removed")
    for s in plan.states:
        await store.remove_state(s.id)
    audit.record(
        "state_removal", actor=actor, state=target.id, alias=target.alias, force=force,
        states=[s.id for s in plan.states], instances=plan.view()["instances"],
    )  # fmt: skip
    log.info("admin.states_removed", target=plan.target.id[:12], states=len(plan.states))
    return plan
