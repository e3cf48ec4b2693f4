"""The admin bearer token: created 0600 under the store at first start, checked on each request
(or a dashboard session cookie instead of it, with a CSRF token for changes)."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from taidon_proxy.admin.errors import ApiError
from taidon_proxy.admin.sessions import COOKIE, CSRF_HEADER, SessionStore
from taidon_proxy.services.access import ADMIN, Principal
from taidon_proxy.services.team import Team

TOKEN_FILE = "admin.token"
# Reachable without a token: liveness and readiness probes, API discovery, and OIDC sign-in
# (its ID token is the credential).
PUBLIC_PATHS = frozenset(
    {"/v1/health", "/v1/ready", "/v1/openapi.json", "/v1/login/oidc/start", "/v1/login/oidc"}
)
# The dashboard's pages decide for themselves: without a session they show the sign-in page.
PAGE_PREFIXES = ("/ui/",)
PAGE_PATHS = frozenset({"/"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PRINCIPAL = web.RequestKey("principal", Principal)  # who is calling (absent on public paths)


def token_path(store: Path) -> Path:
    return store / TOKEN_FILE


def ensure_token(store: Path) -> str:
    """Read the store's token, creating it (0600, never readable by others) on first use."""
    path = token_path(store)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)  # a hand-copied token file must not stay world-readable
        token = path.read_text(encoding="ascii").strip()
        if token:
            return token
        path.unlink()
        return ensure_token(store)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    return token


def read_token(store: Path) -> str | None:
    """The token a client should send, or None when the file is absent or unreadable."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return token_path(store).read_text(encoding="ascii").strip() or None
    return None


async def token_principal(given: str, token: str, team: Team | None) -> Principal | None:
    """Whose token this is: the store's admin token is the admin; with teams, a personal
    access token is its user's principal (the team decides); anything else None."""
    given = given.strip()
    if team is not None:
        return await team.bearer(given, token)
    return ADMIN if hmac.compare_digest(given.encode(), token.encode()) else None


async def authenticate(
    request: web.Request, token: str, sessions: SessionStore, team: Team | None
) -> Principal | None:
    """Who is calling: the bearer token's principal, or a dashboard session's; None.

    A request authenticated by its session cookie that changes something must carry the
    session's CSRF token in a header (a cross-site form or fetch cannot set it); a bearer
    request is never a browser's ambient credential and needs none.
    """
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return await token_principal(given, token, team)
    session = sessions.get(request.cookies.get(COOKIE))
    if session is None:
        return None
    changes = request.method not in SAFE_METHODS
    if changes and not session.csrf_ok(request.headers.get(CSRF_HEADER)):
        raise ApiError(403, "csrf", f"a change from the dashboard needs its {CSRF_HEADER} header")
    return session.principal


def is_page(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)


def bearer_middleware(token: str, sessions: SessionStore, team: Team | None = None) -> Middleware:
    """Sets PRINCIPAL from the bearer token or the dashboard's session cookie; pages pass."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        if is_page(request.path):  # the page shows the sign-in form without a principal
            return await handler(request)
        principal = await authenticate(request, token, sessions, team)
        # Same answer for missing, malformed and wrong: nothing to learn from the difference.
        if principal is None:
            raise ApiError(401, "unauthorized", "missing or invalid bearer token")
        request[PRINCIPAL] = principal
        return await handler(request)

    return check
