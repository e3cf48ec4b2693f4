"""Prepare jobs: list, one job, and its events as NDJSON (optionally followed live)."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from taidon_proxy.admin.context import flag, services_of
from taidon_proxy.admin.errors import invalid
from taidon_proxy.admin.views import event_view, live_job_view, stored_job_view
from taidon_proxy.prepare.queue import BuildQueue
from taidon_proxy.services.lookup import unique

routes = web.RouteTableDef()
JOBS_LISTED = 100
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


async def _job_ids(request: web.Request) -> list[str]:
    s = services_of(request)
    ids = {row["id"] for row in await s.meta.jobs(limit=10_000)}
    ids.update(s.builder.jobs)
    return list(ids)


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response(await job_list(request))


async def job_list(request: web.Request) -> list[dict[str, Any]]:
    """What GET /v1/jobs answers: the newest first."""
    p = services_of(request)
    live = p.builder.jobs
    views: dict[str, dict[str, Any]] = {
        row["id"]: stored_job_view(row) for row in await p.meta.jobs(limit=JOBS_LISTED)
    }
    for jid, job in live.items():
        views[jid] = _queued(p.builder.queue, live_job_view(job))
    return sorted(views.values(), key=lambda v: v["started"], reverse=True)[:JOBS_LISTED]


def _queued(queue: BuildQueue, view: dict[str, Any]) -> dict[str, Any]:
    """A live job's place in the build queue (`queue`: null once it left it); a waiting
    one's status reads `queued`."""
    place = queue.view(view["id"])
    view["queue"] = place
    if place is not None and place["state"] == "queued":
        view["status"] = "queued"
    return view


@routes.get("/v1/queue")
async def build_queue(request: web.Request) -> web.Response:
    """Running builds, then waiting ones next first (position 0: the next to start)."""
    queue = services_of(request).builder.queue
    now = time.time()
    rows = []
    for entry in queue.entries.values():
        place = queue.view(entry.job_id)
        assert place is not None
        rows.append(
            {"job": entry.job_id, "alias": entry.alias, "ref": entry.ref, **place,
             "waited_seconds": round(now - entry.enqueued, 3)}
        )  # fmt: skip
    rows.sort(key=lambda r: (r["state"] != "running", r["position"] or 0))
    return web.json_response(rows)


@routes.get("/v1/jobs/{ref}")
async def get_job(request: web.Request) -> web.Response:
    return web.json_response(await job_detail(request, request.match_info["ref"]))


async def job_detail(request: web.Request, ref: str) -> dict[str, Any]:
    """What GET /v1/jobs/{ref} answers."""
    p = services_of(request)
    jid = unique("job", ref, await _job_ids(request))
    live = p.builder.jobs.get(jid)
    if live is not None:
        return _queued(p.builder.queue, live_job_view(live))
    row = next(r for r in await p.meta.jobs(limit=10_000) if r["id"] == jid)
    return stored_job_view(row, await p.meta.job_events(jid))


async def job_events(request: web.Request, ref: str) -> list[dict[str, Any]]:
    """A job's events so far (what GET /v1/jobs/{ref}/events answers without follow)."""
    p = services_of(request)
    jid = unique("job", ref, await _job_ids(request))
    live = p.builder.jobs.get(jid)
    if live is not None:
        return [event_view(ev) for ev in live.events]
    return [event_view(row) for row in await p.meta.job_events(jid)]


@routes.get("/v1/jobs/{ref}/events")
async def events(request: web.Request) -> web.StreamResponse:
    """One JSON event per line (or, for `Accept: text/event-stream`, one server-sent event
    each, then an `end` event); with follow=true the stream stays open until the job ends."""
    p = services_of(request)
    jid = unique("job", request.match_info["ref"], await _job_ids(request))
    follow = flag(request, "follow")
    try:
        after = int(request.query.get("after", "-1"))
    except ValueError:
        raise invalid("after", "not an integer") from None
    # The same events as server-sent events when a browser's EventSource asks for them.
    sse = SSE in request.headers.get("Accept", "")
    resp = web.StreamResponse(headers={"Content-Type": SSE if sse else NDJSON})
    if sse:
        resp.headers["Cache-Control"] = "no-store"
    await resp.prepare(request)

    async def send(view: dict[str, Any]) -> None:
        text = json.dumps(view)
        await resp.write(
            f"id: {view['seq']}\ndata: {text}\n\n".encode() if sse else text.encode() + b"\n"
        )

    live = p.builder.jobs.get(jid)
    if live is not None and follow:
        async for ev in live.follow(after):
            await send(event_view(ev))
    elif live is not None:
        for ev in live.events[after + 1 :]:
            await send(event_view(ev))
    else:  # an older job (or one from before a restart): its stored log, complete
        for row in await p.meta.job_events(jid, after):
            await send(event_view(row))
    if sse:  # EventSource reconnects after a stream ends; this event tells it not to
        await resp.write(b"event: end\ndata: {}\n\n")
    await resp.write_eof()
    return resp
