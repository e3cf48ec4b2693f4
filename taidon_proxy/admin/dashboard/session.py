"""Who is looking at a page: the browser session from its cookie, or the way to the sign-in page."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps

from aiohttp import web

from taidon_proxy.admin.context import SESSIONS
from taidon_proxy.admin.dashboard.render import page as render_page
from taidon_proxy.admin.errors import from_domain
from taidon_proxy.admin.sessions import COOKIE, BrowserSession
from taidon_proxy.errors import TaidonError

SIGNIN = "/ui/signin"
Page = Callable[[web.Request, BrowserSession], Awaitable[web.StreamResponse]]


def current(request: web.Request) -> BrowserSession | None:
    return request.app[SESSIONS].get(request.cookies.get(COOKIE))


def signed_in(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A page for signed-in browsers only; anyone else (no cookie, an unknown or expired
    session) is sent to the sign-in page and sees no data."""

    @wraps(handler)
    async def page(request: web.Request) -> web.StreamResponse:
        session = current(request)
        if session is None:
            target = SIGNIN + ("?expired=1" if COOKIE in request.cookies else "")
            if request.headers.get("HX-Request"):  # a panel's refresh: htmx follows this
                return web.Response(status=200, headers={"HX-Redirect": target})
            raise web.HTTPSeeOther(target)
        try:
            return await handler(request, session)
        except TaidonError as e:  # a vanished or ambiguous resource: said on the page
            err = from_domain(e)
            return render_page(
                "error.html", code=err.status, request=request, session=session, error=err
            )

    return page
