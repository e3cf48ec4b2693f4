"""Recipes: which aliases exist, their freshness (the state their inputs last produced, which
instances are current) and preparing their current state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taidon_proxy.config import Config
from taidon_proxy.instances.keys import InstanceKey, Isolation
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.prepare.queue import PRIORITIES, REQUESTER, Requester
from taidon_proxy.services.access import Principal
from taidon_proxy.services.errors import Refusal, invalid
from taidon_proxy.services.quotas import charged_team
from taidon_proxy.store.fingerprint import FileHashCache


class Recipes:
    """Asks the builder and the metadata; hashes input files once per (size, mtime)."""

    def __init__(self, builder: StateBuilder) -> None:
        self.builder = builder
        self.hashes = FileHashCache()

    async def freshness(self, alias: str, ref: str | None = None) -> dict[str, Any]:
        """The state the recipe's inputs last produced (at a git ref: that commit's files),
        and whether those inputs are unchanged."""
        meta = self.builder.store.meta
        target = await self.builder.at_ref(alias, ref) if ref is not None else None
        key = await self.builder.recipe_key(alias, target.recipe if target else None)
        remembered = await meta.fingerprint(key)
        if remembered is None:
            return {"state": None, "status": "unbuilt"}
        fp, state_id, inputs = remembered
        now = await asyncio.to_thread(self.hashes.fingerprint, key, [Path(p) for p in inputs])
        exists = await meta.get_state(state_id) is not None
        status = "fresh" if now == fp and exists else "stale"
        return {"state": state_id if exists else None, "status": status}

    async def currency(
        self, config: Config, views: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """For each shared instance of a recipe (by instance id): the recipe's current state
        and whether the instance's clone was made from it. A kept clone whose recipe moved on
        is still served (it is the user's database); `sqlrs admin reset` gets the new state."""
        fresh: dict[str, dict[str, Any]] = {}
        out: dict[str, dict[str, Any]] = {}
        for v in views:
            alias = v["alias"]
            if v["isolation"] != Isolation.SHARED or InstanceKey.parse(v["key"]).is_state:
                continue
            if alias not in config.databases:
                out[v["id"]] = {"recipe_state": None, "recipe_current": False}
                continue
            if alias not in fresh:
                fresh[alias] = await self.freshness(alias)
            f = fresh[alias]
            current = f["status"] == "fresh" and f["state"] == v["state"]
            out[v["id"]] = {"recipe_state": f["state"], "recipe_current": current}
        return out


def known_alias(config: Config, alias: str) -> str:
    """The alias if the config in force has it; else a refusal that lists the known ones."""
    known = sorted(config.databases)
    if alias not in known:
        raise Refusal(
            "not_found",
            f'alias "{alias}" does not exist; known aliases: {", ".join(known) or "(none)"}',
            known=known,
            hint="list them with: sqlrs ls aliases; after editing the config,"
            " load it with: sqlrs admin reload",
        )
    return alias


@dataclass(frozen=True)
class Prepared:
    alias: str
    state: str
    ref: str | None  # the git ref the recipe's files were read at (None: the work tree)
    built: bool  # a build ran for this call (False: the state was cached, or another's build)
    job: str | None  # the last job this call started, if any


async def prepare(
    builder: StateBuilder,
    alias: str,
    progress: Callable[[JobEvent], None],
    ref: str | None = None,
    requester: Requester | None = None,
) -> Prepared:
    """Build (or find) the recipe's current state (at a git ref: of that commit's files);
    `progress` sees each job event. A build it starts is queued for `requester`."""
    if requester is not None:
        REQUESTER.set(requester)  # (this coroutine runs as its own task: set for it alone)
    before = set(builder.jobs)
    state = await builder.resolve(alias, progress, ref)
    jobs = [j for jid, j in builder.jobs.items() if jid not in before and j.alias == alias]
    return Prepared(alias, state, ref, bool(jobs), jobs[-1].id if jobs else None)


def requester_for(cfg: Config, principal: Principal, alias: str, priority: str) -> Requester:
    """Who a prepare's build is queued for: the principal's team for the alias (teams:
    only), at a named priority (interactive, prewarm, ci)."""
    found = PRIORITIES.get(priority)
    if found is None:
        raise invalid("priority", f"{priority!r} is not one of: {', '.join(PRIORITIES)}")
    team = charged_team(cfg, principal, alias) if cfg.teams else None
    return Requester(team, found)
