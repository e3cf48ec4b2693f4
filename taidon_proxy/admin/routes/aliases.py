"""Recipes by alias: freshness, plan, prepare (NDJSON progress) and reset of shared instances."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from taidon_proxy.admin.context import actor_of, body, services_of
from taidon_proxy.admin.errors import from_domain
from taidon_proxy.admin.permissions import principal_of
from taidon_proxy.admin.views import event_view, instance_view
from taidon_proxy.errors import TaidonError
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.routing import parse_ref
from taidon_proxy.services.explain import first_miss
from taidon_proxy.services.instances import reset_shared
from taidon_proxy.services.recipes import Prepared, known_alias, requester_for
from taidon_proxy.services.recipes import prepare as prepare_alias

routes = web.RouteTableDef()
LABEL_PATTERN = r"^[A-Za-z0-9_.-]{1,63}$"


class ResetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(default="default", pattern=LABEL_PATTERN)
    ref: str | None = None  # the instance of alias@ref:label


def _known(request: web.Request) -> str:
    return known_alias(services_of(request).config, request.match_info["alias"])


def _ref(request: web.Request) -> str | None:
    """`?ref=feature-x`: the recipe's files as of that git ref (docs/git-refs.md)."""
    ref = request.query.get("ref")
    return None if ref is None else parse_ref(ref)


@routes.get("/v1/aliases")
async def list_aliases(request: web.Request) -> web.Response:
    return web.json_response(await alias_list(request))


async def alias_list(request: web.Request) -> list[dict[str, Any]]:
    """What GET /v1/aliases answers."""
    s = services_of(request)
    cfg = s.config
    out: list[dict[str, Any]] = []
    for alias, recipe in sorted(cfg.databases.items()):
        out.append(
            {
                "alias": alias,
                "kind": recipe.prepare.kind,
                "database": cfg.database_of(alias),
                "isolation": recipe.isolation,
                "recipe": recipe.model_dump(mode="json"),
                **await s.recipes.freshness(alias),
            }
        )
    return out


@routes.get("/v1/aliases/{alias}/plan")
async def plan(request: web.Request) -> web.Response:
    s = services_of(request)
    alias = _known(request)
    ref = _ref(request)
    steps = await s.builder.plan(alias, ref)
    miss = await first_miss(s.builder, s.meta, alias, steps)
    return web.json_response(
        {
            "alias": alias,
            "ref": ref,
            "kind": s.config.databases[alias].prepare.kind,
            "steps": [{"state": s.state_id, "label": s.label, "cached": s.cached} for s in steps],
            "cached": all(s.cached for s in steps),
            "first_miss": miss.view() if miss is not None else None,
            **await s.recipes.freshness(alias, ref),
        }
    )


@routes.post("/v1/aliases/{alias}/prepare")
async def prepare(request: web.Request) -> web.StreamResponse:
    """Build the recipe's current state; stream progress as NDJSON, end with a result line.

    The build goes on if the client disconnects: builds are shared and single-flight.
    """
    alias = _known(request)
    ref = _ref(request)
    s = services_of(request)
    # ?priority=ci: behind interactive connections and prewarms in the build queue.
    who = requester_for(
        s.config, principal_of(request), alias, request.query.get("priority", "prewarm")
    )
    queue: asyncio.Queue[JobEvent] = asyncio.Queue()
    task = asyncio.ensure_future(prepare_alias(s.builder, alias, queue.put_nowait, ref, who))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await _line(resp, {"event": event_view(getter.result())})
            else:
                getter.cancel()
        while not queue.empty():
            await _line(resp, {"event": event_view(queue.get_nowait())})
        try:
            done = task.result()
        except TaidonError as e:
            await _line(resp, from_domain(e).body())
        else:
            await _line(resp, {"result": dataclasses.asdict(done)})
    except ConnectionResetError:  # the client left (a closed tab): the build goes on
        return resp
    finally:
        if not task.done():
            task.add_done_callback(_consume)
    await resp.write_eof()
    return resp


def _consume(task: asyncio.Future[Prepared]) -> None:
    with contextlib.suppress(BaseException):
        task.result()


async def _line(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(json.dumps(obj).encode() + b"\n")


@routes.post("/v1/aliases/{alias}/reset")
async def reset(request: web.Request) -> web.Response:
    """Throw the shared instance's clone away (running: its sessions end with 57P01, or
    stopped); the next connection gets a fresh clone of the recipe's current state."""
    s = services_of(request)
    instances = s.instances
    alias = _known(request)
    args = await body(request, ResetBody)
    ref = None if args.ref is None else parse_ref(args.ref)
    key = InstanceKey.recipe(alias, args.label, ref=ref)
    inst = instances.shared(key)
    view = instance_view(inst, instances) if inst is not None else None
    await reset_shared(instances, key, audit=s.audit, actor=actor_of(request))
    return web.json_response({"reset": str(key), "instance": view})
