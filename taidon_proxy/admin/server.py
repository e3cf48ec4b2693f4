"""The admin HTTP server: aiohttp app with token and error middlewares over the services."""

from __future__ import annotations

import asyncio
import socket

import structlog
from aiohttp import web

from taidon_proxy.admin.auth import bearer_middleware, ensure_token
from taidon_proxy.admin.context import ADMIN_ADDRESS, METRICS, SERVICES, SESSIONS, TASKS, TOKEN
from taidon_proxy.admin.dashboard import routes as dashboard
from taidon_proxy.admin.errors import error_middleware
from taidon_proxy.admin.metrics import Metrics
from taidon_proxy.admin.permissions import access_middleware
from taidon_proxy.admin.routes import (
    aliases,
    audit,
    bundles,
    cache,
    instances,
    jobs,
    login,
    reload,
    states,
    status,
    tokens,
)
from taidon_proxy.admin.sessions import SessionStore
from taidon_proxy.services import Services

log = structlog.get_logger("taidon.admin")
SHUTDOWN_TIMEOUT = 2.0  # followers of a job stream are cut off after this at close


def parse_admin_listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"admin.listen must be HOST:PORT, not {spec!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_app(services: Services, metrics: Metrics, token: str) -> web.Application:
    sessions = SessionStore()
    app = web.Application(
        middlewares=[
            error_middleware, bearer_middleware(token, sessions, services.team), access_middleware,
        ]
    )  # fmt: skip
    app[SERVICES] = services
    app[SESSIONS] = sessions
    app[TOKEN] = token
    app[METRICS] = metrics
    app[ADMIN_ADDRESS] = []
    app[TASKS] = set()
    for module in (
        status,
        aliases,
        states,
        bundles,
        instances,
        jobs,
        cache,
        reload,
        audit,
        tokens,
        login,
    ):
        app.add_routes(module.routes)
    dashboard.setup(app)
    return app


class AdminServer:
    """Listens on one TCP address; `address` is the bound HOST:PORT (port 0 resolved)."""

    def __init__(self, services: Services, metrics: Metrics) -> None:
        self.services = services
        self.metrics = metrics
        self.token = ""
        self.address: str | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, spec: str) -> str:
        self.token = await asyncio.to_thread(ensure_token, self.services.config.store)
        host, port = parse_admin_listen(spec)
        self.app = build_app(self.services, self.metrics, self.token)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self.address = f"{host}:{sock.getsockname()[1]}"
        self.app[ADMIN_ADDRESS].append(self.address)
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("admin.listening", address=self.address)
        return self.address

    async def close(self) -> None:
        if self.app is not None:
            tasks: set[asyncio.Task[None]] = self.app[TASKS]
            pending = [t for t in tasks if t is not asyncio.current_task()]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
