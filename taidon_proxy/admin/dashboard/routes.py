"""The dashboard on the admin app: its pages, sign-in and static files (htmx, script, styles)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from taidon_proxy.admin.dashboard import oidc, pages, signin

STATIC = Path(__file__).with_name("static")
STATIC_PREFIX = "/ui/static"


def setup(app: web.Application) -> None:
    app.add_routes(signin.routes)
    app.add_routes(oidc.routes)
    app.add_routes(pages.routes)
    app.router.add_static(STATIC_PREFIX, STATIC, append_version=False)
