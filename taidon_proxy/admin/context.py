"""What handlers find on the aiohttp app: the services and the admin server's own helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from taidon_proxy.admin.auth import PRINCIPAL
from taidon_proxy.admin.errors import from_validation, invalid
from taidon_proxy.admin.metrics import Metrics
from taidon_proxy.admin.sessions import SessionStore
from taidon_proxy.services import Services
from taidon_proxy.services.audit import ADMIN

M = TypeVar("M", bound=BaseModel)

SERVICES = web.AppKey("services", Services)
METRICS = web.AppKey("metrics", Metrics)
SESSIONS = web.AppKey("sessions", SessionStore)  # the dashboard's signed-in browsers
TOKEN = web.AppKey("token", str)  # the admin token the sign-in page compares against
ADMIN_ADDRESS: web.AppKey[list[str]] = web.AppKey("admin_address")  # once listening
# Background work that outlives a request; the admin server cancels it at close.
TASKS: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("tasks")
MAX_BODY = 64 * 1024


def services_of(request: web.Request) -> Services:
    return request.app[SERVICES]


def actor_of(request: web.Request) -> str:
    """Who the audit log names for this request: the bearer token's principal's user
    (`admin` for the store's admin token)."""
    principal = request.get(PRINCIPAL)
    return principal.user if principal is not None else ADMIN


async def body(request: web.Request, model: type[M]) -> M:
    """The request's JSON body validated by `model` (an empty body means all defaults)."""
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise invalid("(body)", f"larger than {MAX_BODY} bytes")
    try:
        data: Any = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise invalid("(body)", "not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


def flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter: ?force, ?force=1, ?force=true."""
    value = request.query.get(name)
    if value is None:
        return False
    if value.lower() in ("", "1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise invalid(name, f"not a boolean: {value!r} (use true or false)")


def spawn(request: web.Request, coro: Coroutine[Any, Any, None]) -> None:
    """Run work that outlives the request; the admin server cancels it at close."""
    tasks: set[asyncio.Task[None]] = request.app[TASKS]
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
