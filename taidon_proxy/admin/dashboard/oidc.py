"""The dashboard's "Sign in with <issuer>": the proxy runs the code flow with PKCE itself, with
its own callback, and opens a browser session for the principal the ID token names."""

from __future__ import annotations

import hmac

from aiohttp import web

from taidon_proxy.admin.context import SESSIONS, services_of
from taidon_proxy.admin.dashboard.signin import form_page, set_session_cookie
from taidon_proxy.services.access import Forbidden
from taidon_proxy.services.errors import Refusal

routes = web.RouteTableDef()
LOGIN = "/ui/oidc/login"
CALLBACK = "/ui/oidc/callback"
STATE_COOKIE = "taidon_oidc_state"  # binds the callback to the browser that started it
STATUS = {"unauthorized": 401, "unavailable": 503, "unsupported": 404}
# The session cookie is SameSite=Strict: a redirect that follows the provider's (a cross-site
# navigation) would not carry it, so the callback answers a page that moves on by itself.
DONE = (
    '<!doctype html><meta http-equiv="refresh" content="0;url=/"><title>Signed in</title>'
    '<p>Signed in. <a href="/">Continue</a></p>'
)


@routes.get(LOGIN)
async def login(request: web.Request) -> web.StreamResponse:
    try:
        url, state = await services_of(request).oidc.web_start(
            f"{request.scheme}://{request.host}{CALLBACK}"
        )
    except Refusal as e:
        return form_page(request, STATUS.get(e.code, 409), error=e.message)
    resp = web.HTTPSeeOther(url)
    resp.set_cookie(
        STATE_COOKIE, state, max_age=600, path="/ui/oidc", httponly=True, samesite="Lax",
        secure=request.secure,
    )  # fmt: skip
    raise resp


@routes.get(CALLBACK)
async def callback(request: web.Request) -> web.StreamResponse:
    state = request.query.get("state", "")
    code = request.query.get("code")
    started = request.cookies.get(STATE_COOKIE, "")
    if not state or not hmac.compare_digest(state.encode(), started.encode()):
        return form_page(request, 400, error="this sign-in did not start in this browser")
    if code is None:
        why = request.query.get("error", "no code")[:100]
        return form_page(request, 401, error=f"the OIDC provider refused the sign-in: {why}")
    try:
        principal = await services_of(request).oidc.web_finish(state, code)
    except Refusal as e:
        return form_page(request, STATUS.get(e.code, 409), error=e.message)
    except Forbidden as e:
        return form_page(request, 403, error=e.message)
    session = request.app[SESSIONS].open(principal)
    resp = web.Response(text=DONE, content_type="text/html")
    set_session_cookie(request, resp, session.id)
    resp.del_cookie(STATE_COOKIE, path="/ui/oidc")
    return resp
