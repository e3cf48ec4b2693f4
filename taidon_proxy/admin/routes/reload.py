"""`POST /v1/reload`: read the config file again; say what changed and what needs a restart."""

from __future__ import annotations

from aiohttp import web

from taidon_proxy.admin.context import actor_of, services_of
from taidon_proxy.admin.errors import ApiError
from taidon_proxy.errors import ConfigError

routes = web.RouteTableDef()


@routes.post("/v1/reload")
async def reload(request: web.Request) -> web.Response:
    """Validated first: a bad file changes nothing and the answer names each problem."""
    p = services_of(request)
    try:
        change = await p.lifecycle.reload(actor=actor_of(request))
    except ConfigError as e:
        raise ApiError(
            422,
            "invalid_config",
            e.message,
            problems=e.problems,
            hint="the running configuration is unchanged",
        ) from None
    source = str(p.config.source) if p.config.source else None
    return web.json_response({"reloaded": True, "config": source, **change.as_dict()})
