"""OIDC login: start a sign-in (a nonce for the CLI's flow), then an ID token in exchange for a
proxy access token. Both are public: the ID token is the credential."""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from taidon_proxy.admin.context import body, services_of

routes = web.RouteTableDef()


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    login_id: str = Field(min_length=1, max_length=100, description="from /v1/login/oidc/start")
    id_token: str = Field(min_length=1, max_length=16384, description="the provider's ID token")
    flow: Literal["code", "device"] = Field(default="code", description="for the audit record")


@routes.post("/v1/login/oidc/start")
async def start(request: web.Request) -> web.Response:
    """The provider's endpoints, the client id, the scopes and a single-use nonce."""
    return web.json_response(await services_of(request).oidc.start())


@routes.post("/v1/login/oidc")
async def finish(request: web.Request) -> web.Response:
    """A verified ID token for a proxy access token (its text is in this answer only)."""
    args = await body(request, LoginBody)
    new, principal = await services_of(request).oidc.finish(args.login_id, args.id_token, args.flow)
    row = new.row
    return web.json_response(
        {
            "id": row.id, "user": row.user, "name": row.name, "created": row.created,
            "expires": row.expires, "revoked": row.revoked, "token": new.token,
            "teams": list(principal.teams), "role": principal.role,
        },
        status=201,
    )  # fmt: skip
