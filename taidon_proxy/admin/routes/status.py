"""Health, status, config, metrics and the OpenAPI document."""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from aiohttp import web

from taidon_proxy.admin.context import ADMIN_ADDRESS, proxy_of
from taidon_proxy.admin.metrics import CONTENT_TYPE
from taidon_proxy.admin.openapi import document
from taidon_proxy.admin.routes.cache import cache_usage

routes = web.RouteTableDef()


def version() -> str:
    try:
        return dist_version("taidon-proxy")
    except PackageNotFoundError:
        return "0+unknown"


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    p = proxy_of(request)
    return web.json_response({"status": "draining" if p.draining else "ok"})


@routes.get("/v1/openapi.json")
async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(document())


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    p = proxy_of(request)
    states = await p.meta.states()
    admin: list[str] = request.app[ADMIN_ADDRESS]
    runtime = p.runtime.capabilities.name if p.runtime is not None else None
    body: dict[str, Any] = {
        "version": version(),
        "uptime_seconds": round(time.time() - p.started_at, 3),
        "pid": os.getpid(),  # `sqlrs admin drain` waits for it to be gone
        "draining": p.draining,
        "config": str(p.config.source) if p.config.source else None,
        "store": str(p.config.store),
        "backend": {"name": p.backend_name, "reason": p.backend_reason},
        "runtime": {"kind": runtime},
        "listeners": {
            "proxy": list(p.server.addresses) if p.server is not None else [],
            "admin": admin,
        },
        "aliases": sorted(p.config.databases),
        "counts": {
            "states": len(states),
            "instances": len(p.instances.instances) if p.instances is not None else 0,
            "connections": len(p.server.sessions) if p.server is not None else 0,
            "jobs_running": sum(
                1 for j in (p.builder.jobs.values() if p.builder else []) if not j.done
            ),
        },
        "cache": await cache_usage(p, states),
    }
    return web.json_response(body)


def _redacted(p: Any) -> dict[str, Any]:
    data: dict[str, Any] = p.config.model_dump(mode="json")
    users = data.get("auth", {}).get("users") or {}
    data["auth"]["users"] = {name: "(secret)" for name in users}
    return data


@routes.get("/v1/config")
async def config(request: web.Request) -> web.Response:
    return web.json_response(_redacted(proxy_of(request)))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    p = proxy_of(request)
    return web.Response(body=p.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
