"""The OpenAPI 3.1 document of the admin API (a test checks it against the real routes)."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import BaseModel

from taidon_proxy.admin.routes.aliases import ResetBody
from taidon_proxy.admin.routes.cache import GcBody
from taidon_proxy.admin.routes.instances import DrainBody, SnapshotBody
from taidon_proxy.admin.routes.login import LoginBody
from taidon_proxy.admin.routes.tokens import TokenBody
from taidon_proxy.admin.sessions import COOKIE, CSRF_HEADER

JSON = "application/json"
ZSTD = "application/zstd"  # a state bundle
NDJSON = "application/x-ndjson"
PUBLIC = {"/v1/health", "/v1/ready", "/v1/openapi.json", "/v1/login/oidc/start", "/v1/login/oidc"}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the invalid field (422)"},
                "candidates": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "matching ids of an ambiguous prefix (409)",
                },
                "blockers": {"type": "array", "items": {"type": "string"}},
                "problems": {
                    "type": "array",
                    "items": {"type": "object"},
                    "description": "config problems: file, line, key, message (reload)",
                },
            },
            "additionalProperties": True,
        }
    },
}
_REF = {
    "name": "ref",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "full id, unique id prefix, or (states) a state name",
}
_TOKEN_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_ALIAS = {"name": "alias", "in": "path", "required": True, "schema": {"type": "string"}}
_GIT_REF = {
    "name": "ref",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "a git ref (branch, tag, commit id): the recipe's files as of that commit",
}


def _flag(name: str, text: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": text,
    }


def _query(name: str, kind: str, text: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": kind},
        "description": text,
    }


# (method, path, summary, parameters, request body model, success status, media type)
_Op = tuple[str, str, str, list[dict[str, Any]], type[BaseModel] | None, int, str]
OPERATIONS: list[_Op] = [
    ("get", "/v1/health", "Liveness (no token)", [], None, 200, JSON),
    ("get", "/v1/ready", "Readiness: 503 while draining (no token)", [], None, 200, JSON),
    ("get", "/v1/openapi.json", "This document (no token)", [], None, 200, JSON),
    ("get", "/metrics", "Prometheus metrics", [], None, 200, "text/plain"),
    (
        "get",
        "/v1/status",
        "Version, uptime, backend, runtime, listeners, cache usage",
        [],
        None,
        200,
        JSON,
    ),
    ("get", "/v1/config", "The effective configuration (secrets hidden)", [], None, 200, JSON),
    ("get", "/v1/aliases", "Recipes with their current state, fresh or stale", [], None, 200, JSON),
    (
        "get",
        "/v1/aliases/{alias}/plan",
        "What a prepare would run, what is cached, and why the first miss misses",
        [_ALIAS, _GIT_REF],
        None,
        200,
        JSON,
    ),
    (
        "get",
        "/v1/aliases/{alias}/key",
        "A CI cache key: the recipe's final state id, planned without a build",
        [_ALIAS, _GIT_REF],
        None,
        200,
        JSON,
    ),
    (
        "post",
        "/v1/aliases/{alias}/prepare",
        "Build the recipe's current state; NDJSON progress lines, then a result or error line",
        [
            _ALIAS,
            _GIT_REF,
            {
                "name": "priority",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["interactive", "prewarm", "ci"]},
                "description": "its place in the build queue (default prewarm)",
            },
        ],
        None,
        200,
        NDJSON,
    ),
    (
        "post",
        "/v1/aliases/{alias}/reset",
        "End a shared instance's sessions (57P01); the next connection gets a fresh clone",
        [_ALIAS],
        ResetBody,
        200,
        JSON,
    ),
    (
        "get",
        "/v1/states",
        "Every state with parent link, size, last use, names, pins",
        [],
        None,
        200,
        JSON,
    ),
    ("get", "/v1/states/{ref}", "One state", [_REF], None, 200, JSON),
    (
        "delete",
        "/v1/states/{ref}",
        "Remove a state and its descendants",
        [
            _REF,
            _flag("force", "remove even when in use, pinned or a parent"),
            _flag("dry_run", "only say what would be removed"),
        ],
        None,
        200,
        JSON,
    ),
    (
        "get",
        "/v1/states/{ref}/bundle",
        "The state as a bundle (manifest, chain, checksum, zstd data); 409 if not exportable",
        [_REF],
        None,
        200,
        ZSTD,
    ),
    (
        "get",
        "/v1/states/{ref}/provenance",
        "Every input that made the state: per step its files, tool, parameters (hashed)",
        [_REF],
        None,
        200,
        JSON,
    ),
    ("post", "/v1/states/{ref}/pin", "Pin a state (never evicted)", [_REF], None, 200, JSON),
    ("delete", "/v1/states/{ref}/pin", "Unpin a state", [_REF], None, 200, JSON),
    (
        "post",
        "/v1/bundles",
        "Import a bundle (the body): verified whole, then stored and adopted by its recipe;"
        " 422 names the failed check",
        [
            {
                "name": "alias",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "the recipe to adopt it for (default: the manifest's alias)",
            }
        ],
        None,
        200,
        JSON,
    ),
    ("get", "/v1/instances", "Instances: running, spares, stopped shared", [], None, 200, JSON),
    (
        "get",
        "/v1/instances/{ref}",
        "One instance (id, id prefix, or ALIAS[:LABEL])",
        [_REF],
        None,
        200,
        JSON,
    ),
    (
        "delete",
        "/v1/instances/{ref}",
        "Stop an instance and remove its clone; its clients get 57P01",
        [_REF],
        None,
        200,
        JSON,
    ),
    ("get", "/v1/connections", "Open client connections", [], None, 200, JSON),
    (
        "post",
        "/v1/snapshots",
        "Turn a live instance into a named state",
        [],
        SnapshotBody,
        201,
        JSON,
    ),
    ("get", "/v1/jobs", "Recent prepare jobs", [], None, 200, JSON),
    (
        "get",
        "/v1/queue",
        "The build queue: running builds, then waiting ones with their position, team and priority",
        [],
        None,
        200,
        JSON,
    ),
    ("get", "/v1/jobs/{ref}", "One prepare job with its steps", [_REF], None, 200, JSON),
    (
        "get",
        "/v1/jobs/{ref}/events",
        "A job's events as NDJSON, or as server-sent events (`Accept: text/event-stream`:"
        " `id: SEQ`, `data: EVENT`, then `event: end`)",
        [
            _REF,
            _flag("follow", "keep the stream open until the job ends"),
            {
                "name": "after",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "default": -1},
                "description": "only events after seq",
            },
        ],
        None,
        200,
        NDJSON,
    ),
    ("get", "/v1/cache", "Cache usage and limits", [], None, 200, JSON),
    (
        "post",
        "/v1/cache/gc",
        "Evict unused states down to the low-water mark",
        [],
        GcBody,
        200,
        JSON,
    ),
    (
        "post",
        "/v1/drain",
        "Stop accepting, let sessions finish, then stop the proxy",
        [],
        DrainBody,
        202,
        JSON,
    ),
    (
        "get",
        "/v1/audit",
        "Audit records (newest `limit` matching, oldest first); `user` is the actor",
        [
            _query("user", "string", "the client's startup user, or admin"),
            _query("alias", "string", "records about this alias"),
            _query("kind", "string", "connection, auth_failure, build, reset, snapshot, ..."),
            _query("since", "string", "epoch seconds, ISO 8601, or an age: 15m, 2h, 7d"),
            _query("until", "string", "epoch seconds, ISO 8601, or an age (exclusive)"),
            _query("limit", "integer", "at most this many (1 to 10000, default 100)"),
        ],
        None,
        200,
        JSON,
    ),
    (
        "get",
        "/v1/audit/export",
        "Every audit record as JSON lines, in seq order",
        [],
        None,
        200,
        NDJSON,
    ),
    (
        "get",
        "/v1/audit/verify",
        "Walk the hash chain: ok, or the first broken seq and why",
        [],
        None,
        200,
        JSON,
    ),
    (
        "post",
        "/v1/reload",
        "Read the config file again: aliases added/removed/changed, keys that need a restart",
        [],
        None,
        200,
        JSON,
    ),
    (
        "get",
        "/v1/tokens",
        "Personal access tokens: one's own (an admin's: all)",
        [],
        None,
        200,
        JSON,
    ),
    (
        "post",
        "/v1/tokens",
        "Create a personal access token (teams only); its text is in this answer only",
        [],
        TokenBody,
        201,
        JSON,
    ),
    ("delete", "/v1/tokens/{id}", "Revoke a token", [_TOKEN_ID], None, 200, JSON),
    ("get", "/v1/quotas", "Use against each quota (instances, disk, TTLs)", [], None, 200, JSON),
    (
        "post",
        "/v1/login/oidc/start",
        "Start an OIDC sign-in: the provider's endpoints, the client id and a single-use nonce",
        [],
        None,
        200,
        JSON,
    ),
    (
        "post",
        "/v1/login/oidc",
        "An ID token (with the sign-in's nonce) for a proxy access token, shown this once",
        [],
        LoginBody,
        201,
        JSON,
    ),
]


def _operation(op: _Op) -> dict[str, Any]:
    method, path, summary, params, model, ok, media = op
    responses: dict[str, Any] = {
        str(ok): {"description": "success", "content": {media: {"schema": {}}}}
    }
    if path == "/v1/jobs/{ref}/events":
        responses[str(ok)]["content"]["text/event-stream"] = {"schema": {}}
    if path not in PUBLIC:
        responses["401"] = _err("missing or invalid bearer token")
        responses["403"] = _err(
            "with teams: the role lacks the permission (`permission`)"
            + (f"; a dashboard session without its {CSRF_HEADER} header" if method != "get" else "")
        )
    if params and params[0]["in"] == "path":
        responses["404"] = _err("no such resource")
        responses["409"] = _err("ambiguous prefix, or the resource is in use")
    if model is not None or any(p["in"] == "query" for p in params):
        responses["422"] = _err("invalid body or parameter (names the field)")
    if path == "/v1/bundles":
        responses["422"] = _err("the bundle is refused: `check` names what failed")
    if path.startswith("/v1/login/oidc"):
        responses["503"] = _err("the OIDC provider is not reachable; issued tokens keep working")
        responses["409"] = _err("OIDC login is not configured (code unsupported)")
    if path == "/v1/login/oidc":
        responses["401"] = _err("the ID token is refused: signature, issuer, audience, expiry,"
                                " nonce, or an unknown/expired sign-in")  # fmt: skip
        responses["403"] = _err("the user is in no team: none of its groups maps to one")
    if path == "/v1/reload":
        responses["422"] = _err("the config file is invalid; nothing changed (`problems`)")
    out: dict[str, Any] = {
        "summary": summary,
        "operationId": method + "_" + re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_"),
        "parameters": params,
        "responses": responses,
    }
    if path in PUBLIC:
        out["security"] = []
    if path == "/v1/bundles":
        out["requestBody"] = {"required": True, "content": {ZSTD: {"schema": {}}}}
    if model is not None:
        out["requestBody"] = {
            "required": False,
            "content": {JSON: {"schema": model.model_json_schema()}},
        }
    return out


def _err(text: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": text, "content": {JSON: {"schema": schema}}}


@cache
def _build() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op[1], {})[op[0]] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Taidon proxy admin API", "version": "1"},
        "servers": [{"url": "/"}],
        # Either one: the token as a bearer header, or a dashboard session's cookie (changes
        # made with the cookie also need the session's X-CSRF-Token header).
        "security": [{"bearer": []}, {"session": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": COOKIE,
                    "description": "the dashboard's sign-in (docs/dashboard.md); changes"
                    f" also need the {CSRF_HEADER} header",
                },
            },
            "schemas": {"Error": _ERROR},
        },
        "paths": paths,
    }


def document() -> dict[str, Any]:
    return _build()
