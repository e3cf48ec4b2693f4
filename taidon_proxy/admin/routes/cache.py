"""Cache capacity: usage from the evictor, and gc."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from taidon_proxy.admin.context import body, services_of
from taidon_proxy.services import Services

routes = web.RouteTableDef()


class GcBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dry_run: bool = False


def plain(value: object) -> Any:
    """Evictor results as JSON: dataclasses and objects become dicts, ids stay strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return {k: plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


async def cache_usage(s: Services) -> dict[str, Any]:
    usage = plain(await s.evictor.usage())
    return usage if isinstance(usage, dict) else {"usage": usage}


@routes.get("/v1/cache")
async def usage(request: web.Request) -> web.Response:
    return web.json_response(await cache_usage(services_of(request)))


@routes.post("/v1/cache/gc")
async def gc(request: web.Request) -> web.Response:
    s = services_of(request)
    args = await body(request, GcBody)
    evicted = [plain(e) for e in await s.evictor.gc(dry_run=args.dry_run)]
    return web.json_response(
        {"dry_run": args.dry_run, "evicted": evicted, "usage": await cache_usage(s)}
    )
