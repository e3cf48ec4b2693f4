"""Sign-in (the admin token for a session cookie) and sign-out of the dashboard."""

from __future__ import annotations

from aiohttp import web

from taidon_proxy.admin.auth import token_principal
from taidon_proxy.admin.context import SESSIONS, TOKEN, services_of
from taidon_proxy.admin.dashboard.render import page
from taidon_proxy.admin.dashboard.session import SIGNIN, current
from taidon_proxy.admin.sessions import COOKIE

routes = web.RouteTableDef()
MAX_FORM = 4096


def form_page(request: web.Request, status: int = 200, **context: str | None) -> web.Response:
    context.setdefault("error", None)
    context.setdefault("message", None)
    oidc = services_of(request).config.oidc  # a "Sign in with <issuer>" button
    context.setdefault("oidc_issuer", oidc.issuer if oidc is not None else None)
    return page("signin.html", code=status, request=request, session=None, **context)


def set_session_cookie(request: web.Request, resp: web.StreamResponse, sid: str) -> None:
    resp.set_cookie(
        COOKIE,
        sid,
        max_age=int(request.app[SESSIONS].lifetime),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a form was sent from; another site's form is refused."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


@routes.get(SIGNIN)
async def signin_page(request: web.Request) -> web.StreamResponse:
    if current(request) is not None:
        raise web.HTTPSeeOther("/")
    expired = "expired" in request.query
    message = "Your session has ended: sign in again." if expired else None
    return form_page(request, message=message)


@routes.post(SIGNIN)
async def signin(request: web.Request) -> web.StreamResponse:
    if not _same_origin(request):
        return form_page(request, 403, error="sign-in from another site")
    if (request.content_length or 0) > MAX_FORM:
        return form_page(request, 413, error="the form is too large")
    form = await request.post()
    given = form.get("token")
    principal = None
    if isinstance(given, str):
        principal = await token_principal(given, request.app[TOKEN], services_of(request).team)
    if principal is None:
        return form_page(request, 401, error="wrong admin token")
    session = request.app[SESSIONS].open(principal)
    resp = web.HTTPSeeOther("/")
    set_session_cookie(request, resp, session.id)
    raise resp


@routes.post("/ui/signout")
async def signout(request: web.Request) -> web.StreamResponse:
    session = current(request)
    form = await request.post()
    csrf = form.get("csrf")
    if session is not None and session.csrf_ok(csrf if isinstance(csrf, str) else None):
        request.app[SESSIONS].close(session.id)
    elif session is not None:
        return form_page(request, 403, error="sign-out needs the page's form")
    resp = web.HTTPSeeOther(SIGNIN)
    resp.del_cookie(COOKIE, path="/")
    raise resp
