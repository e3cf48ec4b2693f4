"""API errors as JSON bodies: one shape for every refusal, nothing internal leaked."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from taidon_proxy.errors import (
    BuildFailed,
    CapacityError,
    RoutingError,
    TaidonError,
    UnknownDatabase,
)
from taidon_proxy.services.access import Forbidden
from taidon_proxy.services.errors import Refusal
from taidon_proxy.store.metadata_api import MetadataUnavailable

log = structlog.get_logger("taidon.admin")


class ApiError(TaidonError):
    """A refusal the client should see: HTTP status, a stable code, a message, extra fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def not_found(kind: str, ref: str) -> ApiError:
    return ApiError(404, "not_found", f'{kind} "{ref}" does not exist')


def ambiguous(kind: str, ref: str, candidates: list[str]) -> ApiError:
    return ApiError(409, "ambiguous", f'{kind} prefix "{ref}" is ambiguous', candidates=candidates)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid", f"{field}: {message}", field=field)


def from_validation(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(body)"
    return invalid(field, first["msg"])


# A use-case's refusal by its code; any other code is a conflict (409).
REFUSAL_STATUS = {"not_found": 404, "invalid": 422, "unauthorized": 401, "unavailable": 503}


def from_domain(e: TaidonError) -> ApiError:
    """Domain errors keep their user-facing message; the status says whose problem it is."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Forbidden):
        return ApiError(403, "forbidden", e.message, permission=e.permission.value)
    if isinstance(e, Refusal):
        return ApiError(REFUSAL_STATUS.get(e.code, 409), e.code, e.message, **e.extra)
    extra: dict[str, Any] = {"sqlstate": e.sqlstate}
    if e.detail:
        extra["detail"] = e.detail
    if e.hint:
        extra["hint"] = e.hint
    if isinstance(e, RoutingError):  # a bad ?ref=, as a route would refuse it
        return ApiError(400, "invalid", e.message, **extra)
    if isinstance(e, UnknownDatabase):
        return ApiError(404, "not_found", e.message, **extra)
    if isinstance(e, CapacityError):
        return ApiError(503, "capacity", e.message, **extra)
    if isinstance(e, MetadataUnavailable):  # the shared metadata database is away: retry
        return ApiError(503, "unavailable", e.message, **extra)
    if isinstance(e, BuildFailed):
        return ApiError(422, "build_failed", e.message, **extra)
    return ApiError(409, "refused", e.message, **extra)


def error_response(err: ApiError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return web.json_response(err.body(), status=err.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except TaidonError as e:
        return error_response(from_domain(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        return error_response(ApiError(e.status, code, e.reason))
    except Exception:
        log.exception("admin.crashed", path=request.path, method=request.method)
        return error_response(ApiError(500, "internal", "internal error (see the proxy log)"))
