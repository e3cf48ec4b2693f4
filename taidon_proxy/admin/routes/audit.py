"""The audit log over HTTP: query, export as JSON lines, verify the hash chain."""

from __future__ import annotations

import json

from aiohttp import web

from taidon_proxy.admin.context import services_of
from taidon_proxy.admin.errors import invalid

routes = web.RouteTableDef()
FILTERS = ("user", "alias", "kind", "since", "until")
DEFAULT_LIMIT = 100


@routes.get("/v1/audit")
async def query(request: web.Request) -> web.Response:
    """The newest `limit` records matching every filter given, oldest first."""
    q = request.query
    unknown = sorted(set(q) - {*FILTERS, "limit"})
    if unknown:
        raise invalid(unknown[0], f"unknown parameter (use {', '.join(FILTERS)}, limit)")
    try:
        limit = int(q.get("limit", DEFAULT_LIMIT))
    except ValueError:
        raise invalid("limit", "not an integer") from None
    filters = {k: q[k] for k in FILTERS if q.get(k)}
    return web.json_response(await services_of(request).audit.query(limit=limit, **filters))


@routes.get("/v1/audit/export")
async def export(request: web.Request) -> web.StreamResponse:
    """Every record, in seq order, one JSON object per line."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    async for page in services_of(request).audit.export():
        await resp.write(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in page))
    await resp.write_eof()
    return resp


@routes.get("/v1/audit/verify")
async def verify(request: web.Request) -> web.Response:
    """Walk the chain: `ok`, and when broken the first record that fails and why."""
    result = await services_of(request).audit.verify()
    return web.json_response(result.as_dict())
