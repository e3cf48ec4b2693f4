"""States: list (a tree by parent links), one state, pin/unpin, removal with dry run and force."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from aiohttp import web

from taidon_proxy.admin.context import actor_of, flag, services_of
from taidon_proxy.admin.views import state_view
from taidon_proxy.services import Services
from taidon_proxy.services.lookup import find_state
from taidon_proxy.services.provenance import provenance
from taidon_proxy.services.removal import plan_removal, remove_state
from taidon_proxy.services.states import set_pinned
from taidon_proxy.store.metadata import StateRow

routes = web.RouteTableDef()


async def state_views(p: Services, rows: list[StateRow]) -> list[dict[str, Any]]:
    """States as the API shows them: with their names and the instances that hold them."""
    names: dict[str, list[str]] = defaultdict(list)
    for name, sid in (await p.meta.names()).items():
        names[sid].append(name)
    insts: dict[str, list[str]] = defaultdict(list)
    for i in p.instances.listing():  # kept shared clones too: they hold their state
        insts[i.state_id].append(i.clone_id)
    return [state_view(r, names[r.id], insts[r.id]) for r in rows]


@routes.get("/v1/states")
async def list_states(request: web.Request) -> web.Response:
    p = services_of(request)
    return web.json_response(await state_views(p, await p.meta.states()))


@routes.get("/v1/states/{ref}")
async def get_state(request: web.Request) -> web.Response:
    p = services_of(request)
    row = await find_state(p.meta, request.match_info["ref"])
    return web.json_response((await state_views(p, [row]))[0])


@routes.get("/v1/states/{ref}/provenance")
async def state_provenance(request: web.Request) -> web.Response:
    """Every input that made the state, its initdb root first (docs/provenance.md)."""
    return web.json_response(await provenance(services_of(request).meta, request.match_info["ref"]))


@routes.post("/v1/states/{ref}/pin")
async def pin(request: web.Request) -> web.Response:
    return await _set_pin(request, True)


@routes.delete("/v1/states/{ref}/pin")
async def unpin(request: web.Request) -> web.Response:
    return await _set_pin(request, False)


async def _set_pin(request: web.Request, pinned: bool) -> web.Response:
    p = services_of(request)
    row = await set_pinned(
        p.meta, request.match_info["ref"], pinned, audit=p.audit, actor=actor_of(request)
    )
    return web.json_response((await state_views(p, [row]))[0])


@routes.delete("/v1/states/{ref}")
async def remove(request: web.Request) -> web.Response:
    """Remove a state and its descendants; 409 when in use, pinned or a parent, unless forced."""
    p = services_of(request)
    force, dry_run = flag(request, "force"), flag(request, "dry_run")
    row = await find_state(p.meta, request.match_info["ref"])
    if dry_run:
        plan = await plan_removal(p.store, p.instances, row)
        return web.json_response({"dry_run": True, "removed": False, **plan.view()})
    plan = await remove_state(
        p.store, p.instances, row, force=force, audit=p.audit, actor=actor_of(request)
    )
    return web.json_response({"dry_run": False, "removed": True, **plan.view()})
