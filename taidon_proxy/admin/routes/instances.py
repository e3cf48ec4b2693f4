"""Instances, connections, live snapshots of instances, and drain."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from taidon_proxy.admin.context import body, proxy_of, spawn
from taidon_proxy.admin.lookup import find_instance
from taidon_proxy.admin.operations import drain, snapshot_instance
from taidon_proxy.admin.views import instance_view, session_view, state_view

routes = web.RouteTableDef()
DRAIN_TIMEOUT = 300.0


class SnapshotBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instance: str = Field(min_length=1, description="instance id (or prefix), or ALIAS[:LABEL]")
    name: str = Field(min_length=1)


class DrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout: float = Field(default=DRAIN_TIMEOUT, gt=0, le=86400)


@routes.get("/v1/instances")
async def list_instances(request: web.Request) -> web.Response:
    p = proxy_of(request)
    assert p.instances is not None
    views = [instance_view(i) for i in p.instances.instances.values()]
    return web.json_response(sorted(views, key=lambda v: v["age_seconds"], reverse=True))


@routes.get("/v1/instances/{ref}")
async def get_instance(request: web.Request) -> web.Response:
    inst = find_instance(proxy_of(request), request.match_info["ref"])
    return web.json_response(instance_view(inst))


@routes.delete("/v1/instances/{ref}")
async def stop_instance(request: web.Request) -> web.Response:
    """Stop an instance now; its clients get an ErrorResponse (57P01)."""
    p = proxy_of(request)
    inst = find_instance(p, request.match_info["ref"])
    view = instance_view(inst)
    assert p.instances is not None
    await p.instances.destroy(inst, "stopped by admin")
    return web.json_response({"stopped": True, "instance": view})


@routes.get("/v1/connections")
async def list_connections(request: web.Request) -> web.Response:
    p = proxy_of(request)
    sessions = list(p.server.sessions) if p.server is not None else []
    views = [session_view(s) for s in sessions]
    return web.json_response(sorted(views, key=lambda v: v["age_seconds"], reverse=True))


@routes.post("/v1/snapshots")
async def snapshot(request: web.Request) -> web.Response:
    """Turn a live instance into a named state that clients open as `state:NAME`."""
    p = proxy_of(request)
    args = await body(request, SnapshotBody)
    inst = find_instance(p, args.instance)
    row = await snapshot_instance(p, inst, args.name)
    return web.json_response(state_view(row, [args.name], []), status=201)


@routes.post("/v1/drain")
async def start_drain(request: web.Request) -> web.Response:
    """Stop accepting now; stop the proxy once open sessions end (or at the timeout)."""
    p = proxy_of(request)
    args = await body(request, DrainBody)
    sessions = len(p.server.sessions) if p.server is not None else 0
    if not p.draining:
        spawn(request, drain(p, args.timeout))
    return web.json_response({"draining": True, "sessions": sessions}, status=202)
