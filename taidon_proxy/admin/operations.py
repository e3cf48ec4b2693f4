"""Operator actions that span services: live snapshots, state removal, alias freshness, drain."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from taidon_proxy.admin.errors import ApiError, invalid
from taidon_proxy.runtimes.connect import connect
from taidon_proxy.store.fingerprint import FileHashCache
from taidon_proxy.store.ids import digest
from taidon_proxy.store.metadata import SharedRecord, StateRow

if TYPE_CHECKING:
    from taidon_proxy.app import Proxy
    from taidon_proxy.instances.manager import Instance

log = structlog.get_logger("taidon.admin")

STATE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
CHECKPOINT_TIMEOUT = 60.0
DRAIN_POLL = 0.1


def check_name(name: str) -> str:
    if not STATE_NAME.match(name):
        raise invalid("name", "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or _")
    return name


async def snapshot_instance(proxy: Proxy, inst: Instance, name: str) -> StateRow:
    """A live instance becomes a named state: checkpoint, freeze, snapshot its clone, thaw."""
    assert proxy.store is not None and proxy.runtime is not None and proxy.backend is not None
    check_name(name)
    if not proxy.backend.capabilities.live_snapshot or not proxy.runtime.capabilities.can_freeze:
        raise ApiError(
            409,
            "unsupported",
            f"backend {proxy.backend_name} with runtime {proxy.runtime.capabilities.name}"
            " cannot snapshot a running instance",
        )
    existing = (await proxy.meta.names()).get(name)
    if existing is not None:
        raise ApiError(409, "conflict", f'the name "{name}" is taken', state=existing)
    handle = inst.handle
    # Make everything committed durable on disk, so the frozen files are a consistent cluster.
    conn = await connect(handle, database="postgres", timeout=CHECKPOINT_TIMEOUT)
    try:
        await conn.execute("CHECKPOINT", timeout=CHECKPOINT_TIMEOUT)
    finally:
        await conn.close()
    parent = await proxy.meta.get_state(inst.state_id)
    engine = parent.engine if parent is not None else ""
    # Live content has no recipe identity: the id only has to be unique and stable once made.
    state_id = digest(inst.state_id, "snapshot", name, secrets.token_hex(16))
    now = time.time()
    row = StateRow(
        id=state_id,
        parent=inst.state_id,
        kind="snapshot",
        alias=inst.alias,
        label=f"snapshot {name} of {inst.id}",
        backend=proxy.store.backend_name,
        engine=engine,
        created=now,
        last_used=now,
        use_count=0,
        build_seconds=0.0,
        size_bytes=0,
        pinned=False,
        clean=False,
    )
    started = time.monotonic()
    await proxy.runtime.freeze(handle)
    try:
        row = await proxy.store.commit(inst.clone_id, row)
    finally:
        await proxy.runtime.thaw(handle)
    await proxy.meta.set_name(name, state_id)
    log.info(
        "admin.snapshot",
        instance=inst.id,
        state=state_id[:12],
        name=name,
        paused_seconds=round(time.monotonic() - started, 3),
    )
    return row


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


async def plan_removal(proxy: Proxy, target: StateRow) -> RemovalPlan:
    """The state and every descendant (children are built on their parents), and what blocks."""
    assert proxy.instances is not None
    rows = await proxy.meta.states()
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
    insts = [i for i in proxy.instances.instances.values() if i.state_id in ids]
    kept = [r for r in proxy.instances.kept.values() if r.state_id in ids]
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


async def remove_states(proxy: Proxy, plan: RemovalPlan) -> None:
    """Stop the instances on them (their clients get 57P01) and drop kept shared clones of
    them, then remove the states, leaves first."""
    assert proxy.instances is not None and proxy.store is not None
    for inst in plan.instances:
        await proxy.instances.remove(inst, "state removed")
    for rec in plan.kept:
        await proxy.instances.remove(rec, "state removed")
    for s in plan.states:
        await proxy.store.remove_state(s.id)
    log.info("admin.states_removed", target=plan.target.id[:12], states=len(plan.states))


async def alias_freshness(proxy: Proxy, hashes: FileHashCache, alias: str) -> dict[str, Any]:
    """The state the recipe's inputs last produced, and whether those inputs are unchanged."""
    assert proxy.builder is not None
    key = await proxy.builder.recipe_key(alias)
    remembered = await proxy.meta.fingerprint(key)
    if remembered is None:
        return {"state": None, "status": "unbuilt"}
    fp, state_id, inputs = remembered
    now = await asyncio.to_thread(hashes.fingerprint, key, [Path(p) for p in inputs])
    exists = await proxy.meta.get_state(state_id) is not None
    status = "fresh" if now == fp and exists else "stale"
    return {"state": state_id if exists else None, "status": status}


async def recipe_currency(
    proxy: Proxy, hashes: FileHashCache, views: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """For each shared instance of a recipe (by instance id): the recipe's current state and
    whether the instance's clone was made from it. A kept clone whose recipe moved on is
    still served (it is the user's database); `sqlrs admin reset` gets the new state."""
    fresh: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for v in views:
        alias = v["alias"]
        if v["isolation"] != "shared" or v["key"].startswith("state:"):
            continue
        if alias not in proxy.config.databases:
            out[v["id"]] = {"recipe_state": None, "recipe_current": False}
            continue
        if alias not in fresh:
            fresh[alias] = await alias_freshness(proxy, hashes, alias)
        f = fresh[alias]
        current = f["status"] == "fresh" and f["state"] == v["state"]
        out[v["id"]] = {"recipe_state": f["state"], "recipe_current": current}
    return out


async def drain(proxy: Proxy, limit: float) -> None:
    """Stop accepting, wait (bounded) for open sessions to end, then ask the proxy to stop."""
    assert proxy.server is not None
    proxy.server.stop_accepting()
    proxy.draining = True
    log.info("admin.drain", sessions=len(proxy.server.sessions), limit=limit)
    deadline = time.monotonic() + limit
    # Polling: sessions end on their own schedule and the server keeps no "empty" event.
    while proxy.server.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(DRAIN_POLL)
    log.info("admin.drained", left=len(proxy.server.sessions))
    proxy.request_stop()
