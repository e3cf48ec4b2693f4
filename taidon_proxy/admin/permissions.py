"""Which permission each admin-API route needs, and on which alias; the decision is the
services' (`services.access.require`). A route missing from the table needs `administer`.

Only with teams in the config: without them the one credential is the admin token.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from taidon_proxy.admin.auth import PRINCIPAL
from taidon_proxy.admin.context import services_of
from taidon_proxy.errors import TaidonError
from taidon_proxy.services import Services
from taidon_proxy.services.access import ADMIN, Permission, Principal, require
from taidon_proxy.services.errors import not_found
from taidon_proxy.services.lookup import find_instance, find_state

P = Permission
# Where the alias of an action is: the path's {alias}, the alias of the {ref} state or
# instance, the instance named in the body, or none (a proxy-wide action).
Scope = Literal["none", "alias", "state", "instance", "body_instance"]

ROUTES: dict[tuple[str, str], tuple[Permission, Scope]] = {
    ("GET", "/v1/status"): (P.SEE, "none"),
    ("GET", "/metrics"): (P.ADMINISTER, "none"),  # its labels name every alias
    ("GET", "/v1/config"): (P.ADMINISTER, "none"),
    ("POST", "/v1/reload"): (P.ADMINISTER, "none"),
    ("POST", "/v1/drain"): (P.ADMINISTER, "none"),
    ("GET", "/v1/cache"): (P.SEE, "none"),
    ("POST", "/v1/cache/gc"): (P.ADMINISTER, "none"),
    ("POST", "/v1/bundles"): (P.ADMINISTER, "none"),
    ("GET", "/v1/aliases"): (P.SEE, "none"),
    ("GET", "/v1/aliases/{alias}/plan"): (P.SEE, "alias"),
    ("GET", "/v1/aliases/{alias}/key"): (P.SEE, "alias"),
    ("POST", "/v1/aliases/{alias}/prepare"): (P.BUILD, "alias"),
    ("POST", "/v1/aliases/{alias}/reset"): (P.RESET, "alias"),
    ("GET", "/v1/states"): (P.SEE, "none"),
    ("GET", "/v1/states/{ref}"): (P.SEE, "state"),
    ("GET", "/v1/states/{ref}/bundle"): (P.SEE, "state"),
    ("GET", "/v1/states/{ref}/provenance"): (P.SEE, "state"),
    ("POST", "/v1/states/{ref}/pin"): (P.PIN, "state"),
    ("DELETE", "/v1/states/{ref}/pin"): (P.PIN, "state"),
    ("DELETE", "/v1/states/{ref}"): (P.REMOVE, "state"),
    ("GET", "/v1/instances"): (P.SEE, "none"),
    ("GET", "/v1/instances/{ref}"): (P.SEE, "instance"),
    ("DELETE", "/v1/instances/{ref}"): (P.RESET, "instance"),
    ("POST", "/v1/snapshots"): (P.SNAPSHOT, "body_instance"),
    ("GET", "/v1/connections"): (P.SEE, "none"),
    ("GET", "/v1/jobs"): (P.SEE, "none"),
    ("GET", "/v1/jobs/{ref}"): (P.SEE, "none"),
    ("GET", "/v1/jobs/{ref}/events"): (P.SEE, "none"),
    ("GET", "/v1/queue"): (P.SEE, "none"),
    ("GET", "/v1/tokens"): (P.SEE, "none"),  # one's own (an admin's: everyone's)
    ("POST", "/v1/tokens"): (P.SEE, "none"),
    ("DELETE", "/v1/tokens/{id}"): (P.SEE, "none"),
    ("GET", "/v1/quotas"): (P.SEE, "none"),
}
# Listings answered with only the entries of aliases the principal may see.
FILTERED = frozenset(
    {
        "/v1/aliases",
        "/v1/states",
        "/v1/instances",
        "/v1/jobs",
        "/v1/connections",
        "/v1/status",
        "/v1/queue",
    }
)


def principal_of(request: web.Request) -> Principal:
    found: Principal = request.get(PRINCIPAL, ADMIN)
    return found


def route_of(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    return request.method, resource.canonical if resource is not None else request.path


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    s = services_of(request)
    principal = principal_of(request)
    if not s.team.enabled or principal.is_admin or PRINCIPAL not in request:
        return await handler(request)  # one user (or the admin, or a public path)
    method, path = route_of(request)
    permission, scope = ROUTES.get((method, path), (P.ADMINISTER, "none"))
    alias, unseen = await _alias(request, s, scope)
    own = False
    if permission is P.RESET and scope == "instance":
        own = _own(s, find_instance(s.instances, request.match_info["ref"]), principal)
    decide(s, principal, (method, path), alias, own=own, unseen=unseen)
    response = await handler(request)
    if method == "GET" and path in FILTERED and isinstance(response, web.Response):
        return _filtered(response, principal, path)
    return response


def decide(
    s: Services, principal: Principal, route: tuple[str, str], alias: str | None,
    *, own: bool = False, unseen: Exception | None = None,
) -> None:  # fmt: skip
    """Refuse unless `principal` may call `route` on `alias` (`own`: an instance only its
    own sessions use). The one decision, for the API and for what the dashboard offers."""
    permission, scope = ROUTES.get(route, (P.ADMINISTER, "none"))
    if unseen is not None and (alias is None or principal.role_for(alias) is None):
        raise unseen  # answered as the lookup answers an unknown name
    if permission is P.RESET and scope == "instance" and own:
        permission = P.RESET_OWN
    require(s.config, principal, permission, alias if scope != "none" else None)


def permitted(
    s: Services, principal: Principal, method: str, path: str, alias: str | None,
    *, own: bool = False,
) -> bool:  # fmt: skip
    """Whether `decide` lets the call through: the dashboard shows only these actions."""
    if not s.team.enabled or principal.is_admin:
        return True
    _, scope = ROUTES.get((method, path), (P.ADMINISTER, "none"))
    if scope not in ("none", "alias") and not may_see(s, principal, alias):
        return False
    try:
        decide(s, principal, (method, path), alias, own=own)
    except TaidonError:
        return False
    return True


def may_see(s: Services, principal: Principal, alias: str | None) -> bool:
    """Whether a resource of `alias` is listed to `principal` (as the API's listings are)."""
    if not s.team.enabled or principal.is_admin:
        return True
    return alias is not None and principal.role_for(alias) is not None


def _own(s: Services, target: object, principal: Principal) -> bool:
    """An instance only the principal's own sessions use (at least one)."""
    users = [
        a.principal.user
        for session in s.listener.sessions
        if (a := getattr(session, "admission", None)) is not None
        and (lease := getattr(session, "lease", None)) is not None
        and lease.instance is target
    ]
    return bool(users) and all(u == principal.user for u in users)


def owns(s: Services, principal: Principal, instance_id: str) -> bool:
    """`_own` for an instance by id (a dashboard row)."""
    target = s.instances.instances.get(instance_id)
    return target is not None and _own(s, target, principal)


async def _alias(
    request: web.Request, s: Services, scope: Scope
) -> tuple[str | None, Exception | None]:
    """The alias the action is on, and the error an unseen target is answered with."""
    if scope == "alias":
        return request.match_info["alias"], None
    ref = request.match_info.get("ref", "")
    if scope == "state":
        row = await find_state(s.meta, ref)
        return row.alias, not_found("state", ref)
    if scope in ("instance", "body_instance"):
        if scope == "body_instance":
            try:
                ref = str(json.loads(await request.read() or b"{}").get("instance", ""))
            except (ValueError, AttributeError):
                return None, None  # the handler refuses the body
        return find_instance(s.instances, ref).alias, not_found("instance", ref)
    return None, None


def _filtered(response: web.Response, principal: Principal, path: str) -> web.Response:
    assert isinstance(response.body, bytes)
    items: Any = json.loads(response.body)
    if path == "/v1/status":
        items["aliases"] = [a for a in items["aliases"] if principal.role_for(a) is not None]
        return web.json_response(items, status=response.status)
    kept = [i for i in items if i.get("alias") and principal.role_for(i["alias"]) is not None]
    return web.json_response(kept, status=response.status)
