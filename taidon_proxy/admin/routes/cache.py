"""Cache capacity: usage from the evictor (or the store when there is none) and gc."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from taidon_proxy.admin.context import body, proxy_of
from taidon_proxy.admin.errors import ApiError

if TYPE_CHECKING:
    from taidon_proxy.app import Proxy
    from taidon_proxy.store.metadata import StateRow

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


async def cache_usage(p: Proxy, states: list[StateRow] | None = None) -> dict[str, Any]:
    evictor = getattr(p, "evictor", None)
    if evictor is not None:
        usage = plain(await evictor.usage())
        return usage if isinstance(usage, dict) else {"usage": usage}
    rows = states if states is not None else await p.meta.states()
    disk = await asyncio.to_thread(shutil.disk_usage, p.config.store)
    # The evictor's field names, so clients read one shape either way.
    return {
        "used_bytes": sum(r.size_bytes for r in rows),
        "max_bytes": p.config.cache.max_size,
        "free_bytes": disk.free,
        "total_bytes": disk.total,
        "state_count": len(rows),
    }


@routes.get("/v1/cache")
async def usage(request: web.Request) -> web.Response:
    return web.json_response(await cache_usage(proxy_of(request)))


@routes.post("/v1/cache/gc")
async def gc(request: web.Request) -> web.Response:
    p = proxy_of(request)
    args = await body(request, GcBody)
    evictor = getattr(p, "evictor", None)
    if evictor is None:
        raise ApiError(503, "unavailable", "this proxy has no cache evictor")
    evicted = [plain(e) for e in await evictor.gc(dry_run=args.dry_run)]
    return web.json_response(
        {"dry_run": args.dry_run, "evicted": evicted, "usage": await cache_usage(p)}
    )
