"""Health, status, config, metrics and the OpenAPI document."""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from aiohttp import web

from taidon_proxy.admin.context import ADMIN_ADDRESS, METRICS, services_of
from taidon_proxy.admin.metrics import CONTENT_TYPE
from taidon_proxy.admin.openapi import document
from taidon_proxy.admin.routes.cache import cache_usage
from taidon_proxy.config_profiles import redact_file_values

routes = web.RouteTableDef()


def version() -> str:
    try:
        return dist_version("taidon-proxy")
    except PackageNotFoundError:
        return "0+unknown"


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    lifecycle = services_of(request).lifecycle
    return web.json_response({"status": "draining" if lifecycle.draining else "ok"})


@routes.get("/v1/ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: 503 from the moment the proxy drains (SIGTERM, SIGINT, POST /v1/drain), so
    a load balancer or a Kubernetes Service stops sending it clients; liveness stays 200."""
    if services_of(request).lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


@routes.get("/v1/openapi.json")
async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(document())


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(await status_body(request))


async def status_body(request: web.Request) -> dict[str, Any]:
    """What GET /v1/status answers (the dashboard's overview shows the same)."""
    p = services_of(request)
    states = await p.meta.states()
    admin: list[str] = request.app[ADMIN_ADDRESS]
    cfg = p.config
    body: dict[str, Any] = {
        "version": version(),
        "uptime_seconds": round(time.time() - p.lifecycle.started_at, 3),
        "pid": os.getpid(),  # `sqlrs admin drain` waits for it to be gone
        "draining": p.lifecycle.draining,
        "config": str(cfg.source) if cfg.source else None,
        "store": str(cfg.store),
        "backend": {"name": p.backend.name, "reason": p.backend.reason},
        "runtime": {"kind": p.runtime.capabilities.name},
        "listeners": {"proxy": list(p.listener.addresses), "admin": admin},
        "aliases": sorted(cfg.databases),
        "counts": {
            "states": len(states),
            "instances": len(p.instances.instances),
            "connections": len(p.listener.sessions),
            "jobs_running": sum(1 for j in p.builder.jobs.values() if not j.done),
        },
        "cache": await cache_usage(p),
    }
    return body


def _redacted(p: Any) -> dict[str, Any]:
    data: dict[str, Any] = p.config.model_dump(mode="json")
    users = data.get("auth", {}).get("users") or {}
    data["auth"]["users"] = {name: "(secret)" for name in users}
    if data.get("metadata", {}).get("dsn"):
        data["metadata"]["dsn"] = "(secret)"  # it holds the metadata database's password
    for recipe in data.get("databases", {}).values():
        prep = recipe.get("prepare", {})
        for name in prep.get("secret_parameters", []):
            prep["parameters"][name] = "(secret)"
    return redact_file_values(data, p.config.file_values)


@routes.get("/v1/config")
async def config(request: web.Request) -> web.Response:
    return web.json_response(_redacted(services_of(request)))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})
