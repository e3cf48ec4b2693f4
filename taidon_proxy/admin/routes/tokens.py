"""Personal access tokens (create: shown once; list; revoke) and quotas, use against limits."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from taidon_proxy.admin.context import body, services_of
from taidon_proxy.admin.permissions import principal_of
from taidon_proxy.config import parse_duration
from taidon_proxy.store.tokens import TokenRow

routes = web.RouteTableDef()


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, description="what the token is for")
    expires_in: float | None = Field(default=None, description="seconds, or 30d, 12h (90d)")
    user: str | None = Field(default=None, description="another user's token (admins only)")

    _d = field_validator("expires_in", mode="before")(
        lambda cls, v: None if v is None else parse_duration(v)
    )


def token_view(row: TokenRow) -> dict[str, Any]:
    return {
        "id": row.id, "user": row.user, "name": row.name, "created": row.created,
        "expires": row.expires, "revoked": row.revoked,
    }  # fmt: skip


@routes.get("/v1/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    team = services_of(request).team
    rows = await team.list_tokens(principal_of(request))
    return web.json_response([token_view(r) for r in rows])


@routes.post("/v1/tokens")
async def create_token(request: web.Request) -> web.Response:
    """A new token for the caller (or, for an admin, another user); its text is in this
    answer only."""
    args = await body(request, TokenBody)
    team = services_of(request).team
    new = await team.create_token(principal_of(request), args.name, args.expires_in, args.user)
    return web.json_response({**token_view(new.row), "token": new.token}, status=201)


@routes.delete("/v1/tokens/{id}")
async def revoke_token(request: web.Request) -> web.Response:
    team = services_of(request).team
    row = await team.revoke_token(principal_of(request), request.match_info["id"])
    return web.json_response(token_view(row))


@routes.get("/v1/quotas")
async def quotas(request: web.Request) -> web.Response:
    """Instances held against the limits: every user and team for an admin, else one's own."""
    return web.json_response(services_of(request).team.quotas.report(principal_of(request)))
