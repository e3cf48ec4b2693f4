"""Instances (running and kept), connections, live snapshots of instances, and drain."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from taidon_proxy.admin.context import actor_of, body, services_of, spawn
from taidon_proxy.admin.views import instance_view, session_view, state_view
from taidon_proxy.services.instances import remove_instance
from taidon_proxy.services.lookup import find_instance
from taidon_proxy.services.snapshot import snapshot_instance

routes = web.RouteTableDef()
DRAIN_TIMEOUT = 300.0


class SnapshotBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instance: str = Field(min_length=1, description="instance id (or prefix), or ALIAS[:LABEL]")
    name: str = Field(min_length=1)


class DrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout: float = Field(default=DRAIN_TIMEOUT, gt=0, le=86400)


async def instance_views(request: web.Request, found: list[Any]) -> list[dict[str, Any]]:
    """Instance views with whether each one's state is still its recipe's current state."""
    s = services_of(request)
    views = [instance_view(i, s.instances) for i in found]
    currency = await s.recipes.currency(s.config, views)
    for v in views:
        v.update(currency.get(v["id"], {"recipe_state": None, "recipe_current": None}))
    return views


@routes.get("/v1/instances")
async def list_instances(request: web.Request) -> web.Response:
    """Running instances (warm spares among them) and stopped shared ones (kept clones)."""
    return web.json_response(await instance_list(request))


async def instance_list(request: web.Request) -> list[dict[str, Any]]:
    views = await instance_views(request, services_of(request).instances.listing())
    return sorted(views, key=lambda v: v["age_seconds"], reverse=True)


@routes.get("/v1/instances/{ref}")
async def get_instance(request: web.Request) -> web.Response:
    inst = find_instance(services_of(request).instances, request.match_info["ref"])
    return web.json_response((await instance_views(request, [inst]))[0])


@routes.delete("/v1/instances/{ref}")
async def stop_instance(request: web.Request) -> web.Response:
    """Stop an instance now (its clients get 57P01) and remove its clone; a stopped shared
    instance's kept clone is removed too."""
    s = services_of(request)
    inst = find_instance(s.instances, request.match_info["ref"])
    view = instance_view(inst, s.instances)
    await remove_instance(s.instances, inst, audit=s.audit, actor=actor_of(request))
    return web.json_response({"stopped": True, "removed": True, "instance": view})


@routes.get("/v1/connections")
async def list_connections(request: web.Request) -> web.Response:
    return web.json_response(connection_list(request))


def connection_list(request: web.Request) -> list[dict[str, Any]]:
    views = [session_view(s) for s in list(services_of(request).listener.sessions)]
    return sorted(views, key=lambda v: v["age_seconds"], reverse=True)


@routes.post("/v1/snapshots")
async def snapshot(request: web.Request) -> web.Response:
    """Turn a live instance into a named state that clients open as `state:NAME`."""
    s = services_of(request)
    args = await body(request, SnapshotBody)
    inst = find_instance(s.instances, args.instance)
    row = await snapshot_instance(
        s.store, s.runtime, inst, args.name, audit=s.audit, actor=actor_of(request)
    )
    return web.json_response(state_view(row, [args.name], []), status=201)


@routes.post("/v1/drain")
async def start_drain(request: web.Request) -> web.Response:
    """Stop accepting now; stop the proxy once open sessions end (or at the timeout)."""
    lifecycle = services_of(request).lifecycle
    args = await body(request, DrainBody)
    sessions = len(services_of(request).listener.sessions)
    if not lifecycle.draining:
        spawn(request, lifecycle.drain(args.timeout, actor=actor_of(request)))
    return web.json_response({"draining": True, "sessions": sessions}, status=202)
