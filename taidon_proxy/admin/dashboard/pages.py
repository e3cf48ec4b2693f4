"""The dashboard's pages: each renders what the /v1 API answers for the same resource."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from taidon_proxy.admin.context import services_of
from taidon_proxy.admin.dashboard import charts
from taidon_proxy.admin.dashboard.actions import Actions
from taidon_proxy.admin.dashboard.render import page
from taidon_proxy.admin.dashboard.session import signed_in
from taidon_proxy.admin.routes.aliases import alias_list
from taidon_proxy.admin.routes.instances import connection_list, instance_list
from taidon_proxy.admin.routes.jobs import job_detail, job_events, job_list
from taidon_proxy.admin.routes.states import state_views
from taidon_proxy.admin.routes.status import status_body
from taidon_proxy.admin.sessions import BrowserSession
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.services.errors import not_found
from taidon_proxy.services.explain import stale_reason
from taidon_proxy.services.lookup import find_state
from taidon_proxy.services.removal import plan_removal

routes = web.RouteTableDef()
LAST_ERRORS = 5


def _render(
    template: str, request: web.Request, session: BrowserSession, **context: Any
) -> web.Response:
    can = Actions(services_of(request), session.principal)
    return page(template, request=request, session=session, can=can, **context)


def _seen(
    request: web.Request, session: BrowserSession, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The rows of aliases the principal may see (the API's listings filter the same way)."""
    can = Actions(services_of(request), session.principal)
    return [r for r in rows if can.sees(r.get("alias"))]


@routes.get("/")
@signed_in
async def overview(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    status = await status_body(request)
    jobs = _seen(request, session, await job_list(request))
    can = Actions(services_of(request), session.principal)
    status["aliases"] = [a for a in status["aliases"] if can.sees(a)]
    errors = [j for j in jobs if j["status"] == "failed" and j.get("error")][:LAST_ERRORS]
    running = [j for j in jobs if j["status"] == "running"]
    queued = sorted(
        (j for j in jobs if j["status"] == "queued"), key=lambda j: j["queue"]["position"] or 0
    )
    return _render(
        "overview.html", request, session, status=status, bars=charts.cache_bars(status["cache"]),
        bar_width=charts.BAR_WIDTH, running=running, queued=queued, errors=errors,
    )  # fmt: skip


@routes.get("/ui/aliases")
@signed_in
async def aliases(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    s = services_of(request)
    views = _seen(request, session, await alias_list(request))
    why = {a["alias"]: await stale_reason(s.builder, s.meta, a["alias"]) for a in views
           if a["status"] == "stale"}  # fmt: skip
    return _render("aliases.html", request, session, aliases=views, why=why)


@routes.get("/ui/states")
@signed_in
async def states(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    p = services_of(request)
    views = _seen(request, session, await state_views(p, await p.meta.states()))
    nodes = charts.tree(views)
    return _render("states.html", request, session, nodes=nodes, height=charts.tree_height(nodes))


@routes.get("/ui/states/{ref}/remove")
@signed_in
async def removal(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    """What removing a state would take with it, before the button that does it."""
    p = services_of(request)
    ref = request.match_info["ref"]
    row = await find_state(p.meta, ref)
    if not Actions(p, session.principal).sees(row.alias):
        raise not_found("state", ref)  # as the API answers a state the principal cannot see
    plan = await plan_removal(p.store, p.instances, row)
    views = await state_views(p, plan.states)
    return _render("remove.html", request, session, target=row, plan=plan.view(), states=views)


def _resettable(view: dict[str, Any], aliases: set[str]) -> bool:
    """A recipe's shared instance: POST /v1/aliases/{alias}/reset gives it a fresh clone."""
    if view["isolation"] != "shared" or view["alias"] not in aliases:
        return False
    return not InstanceKey.parse(view["key"]).is_state


@routes.get("/ui/instances")
@signed_in
async def instances(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    aliases = set(services_of(request).config.databases)
    views = _seen(request, session, await instance_list(request))
    for v in views:
        v["resettable"] = _resettable(v, aliases)
    return _render(
        "instances.html", request, session, instances=views,
        connections=_seen(request, session, connection_list(request)),
        draining=services_of(request).lifecycle.draining,
    )  # fmt: skip


@routes.get("/ui/jobs")
@signed_in
async def jobs(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    views = _seen(request, session, await job_list(request))
    bars = {}
    for j in views:
        events = await job_events(request, j["id"]) if j["status"] == "running" else []
        bars[j["id"]] = charts.progress(j["status"], events)
    return _render("jobs.html", request, session, jobs=views, bars=bars)


@routes.get("/ui/jobs/{ref}")
@signed_in
async def job(request: web.Request, session: BrowserSession) -> web.StreamResponse:
    ref = request.match_info["ref"]
    view = await job_detail(request, ref)
    events = await job_events(request, view["id"])
    bar = charts.progress(view["status"], events)
    return _render("job.html", request, session, job=view, events=events, bar=bar)
