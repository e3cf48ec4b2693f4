"""The admin bearer token: created 0600 under the store at first start, checked on each request."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from taidon_proxy.admin.errors import ApiError
from taidon_proxy.services.access import ADMIN, Principal
from taidon_proxy.services.team import Team

TOKEN_FILE = "admin.token"
# Reachable without a token: liveness probes and API discovery.
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/openapi.json"})
PRINCIPAL = web.RequestKey("principal", Principal)


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


def bearer_middleware(token: str, team: Team | None = None) -> Middleware:
    """The bearer is the admin token (the admin principal) or, with teams, a personal access
    token (its user's principal); handlers find the principal under PRINCIPAL."""
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        principal: Principal | None = None
        if scheme.lower() == "bearer":
            if team is not None:
                principal = await team.bearer(given, token)
            elif hmac.compare_digest(given.encode(), expected):
                principal = ADMIN
        # Same answer for missing, malformed and wrong: nothing to learn from the difference.
        if principal is None:
            raise ApiError(401, "unauthorized", "missing or invalid bearer token")
        request[PRINCIPAL] = principal
        return await handler(request)

    return check
