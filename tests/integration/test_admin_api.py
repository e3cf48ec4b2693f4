"""The admin API over real HTTP against an in-process proxy: resources, errors, auth, OpenAPI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg
import pytest

from taidon_proxy.admin.auth import is_page, read_token
from tests.conftest import ProxyFactory, RunningProxy, demo_recipe

pytestmark = pytest.mark.integration

ADMIN = {"listen": "127.0.0.1:0"}


class Api:
    """A tiny client: JSON in and out, the token from the store like the CLI reads it."""

    def __init__(self, p: RunningProxy, http: aiohttp.ClientSession) -> None:
        assert p.proxy.admin is not None and p.proxy.admin.address is not None
        self.base = f"http://{p.proxy.admin.address}"
        token = read_token(p.proxy.config.store)
        assert token
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = http

    async def call(
        self, method: str, path: str, *, auth: bool = True, **kw: Any
    ) -> tuple[int, Any]:
        headers = self.headers if auth else {}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            text = await r.text()
            ctype = r.headers.get("Content-Type", "")
            if "ndjson" in ctype:
                return r.status, [json.loads(line) for line in text.splitlines() if line]
            if "json" in ctype:
                return r.status, json.loads(text)
            return r.status, text


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def test_token_file_and_auth(make_proxy: ProxyFactory, http: aiohttp.ClientSession) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    token_file = p.proxy.config.store / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    api = Api(p, http)
    assert await api.call("GET", "/v1/health", auth=False) == (200, {"status": "ok"})
    status, doc = await api.call("GET", "/v1/openapi.json", auth=False)
    assert status == 200 and doc["openapi"].startswith("3.")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        async with http.get(api.base + "/v1/status", headers=headers) as r:
            assert r.status == 401
            body = await r.json()
            assert body == {
                "error": {"code": "unauthorized", "message": "missing or invalid bearer token"}
            }
    async with http.get(api.base + "/metrics") as r:
        assert r.status == 401
    status, body = await api.call("GET", "/v1/status")
    assert status == 200
    assert body["backend"]["name"] == "copy"
    assert body["runtime"]["kind"] == "process"
    assert body["listeners"]["admin"] == [p.proxy.admin.address]
    assert body["listeners"]["proxy"] == [f"{p.host}:{p.port}"]
    assert body["aliases"] == ["demo"]
    assert "used_bytes" in body["cache"]


async def test_openapi_matches_routes(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy({}, admin=ADMIN)
    assert p.proxy.admin is not None and p.proxy.admin.app is not None
    served = set()
    for route in p.proxy.admin.app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if is_page(path):  # the dashboard's HTML pages and files: not the API
            continue
        served.add((route.method.lower(), path))
    _, doc = await Api(p, http).call("GET", "/v1/openapi.json", auth=False)
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert served == documented
    # Every documented path parameter is in its path, and every route needs the token but
    # the probes and this document.
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for param in op["parameters"]:
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in path
            public = (
                "/v1/health",
                "/v1/ready",
                "/v1/openapi.json",
                "/v1/login/oidc/start",
                "/v1/login/oidc",
            )
            assert (op.get("security") == []) == (path in public), path
            if path not in public:
                assert "401" in op["responses"], path


async def test_prepare_states_jobs_and_connections(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api = Api(p, http)
    _, aliases = await api.call("GET", "/v1/aliases")
    assert [(a["alias"], a["status"], a["state"]) for a in aliases] == [("demo", "unbuilt", None)]

    status, lines = await api.call("POST", "/v1/aliases/demo/prepare")
    assert status == 200
    kinds = [line["event"]["kind"] for line in lines if "event" in line]
    assert "job.start" in kinds and kinds.count("step.start") == 3
    result = lines[-1]["result"]
    assert result["built"] is True and result["job"].startswith("j-")
    state = result["state"]

    _, aliases = await api.call("GET", "/v1/aliases")
    assert (aliases[0]["status"], aliases[0]["state"]) == ("fresh", state)
    _, plan = await api.call("GET", "/v1/aliases/demo/plan")
    assert plan["cached"] is True and [s["cached"] for s in plan["steps"]] == [True] * 3
    assert plan["steps"][-1]["state"] == state
    # A second prepare is a cache hit: no job.
    _, lines = await api.call("POST", "/v1/aliases/demo/prepare")
    hit = {"alias": "demo", "state": state, "ref": None, "built": False, "job": None}
    assert lines == [{"result": hit}]

    _, states = await api.call("GET", "/v1/states")
    by_id = {s["id"]: s for s in states}
    chain = [state]
    while by_id[chain[-1]]["parent"] is not None:
        chain.append(by_id[chain[-1]]["parent"])
    assert [by_id[s]["kind"] for s in reversed(chain)] == ["initdb", "root", "psql", "psql", "psql"]
    status, one = await api.call("GET", f"/v1/states/{state[:10]}")
    assert status == 200 and one["id"] == state

    _, jobs = await api.call("GET", "/v1/jobs")
    assert jobs[0]["id"] == result["job"] and jobs[0]["status"] == "succeeded"
    assert len(jobs[0]["steps"]) == 3
    status, events = await api.call("GET", f"/v1/jobs/{result['job'][:6]}/events?follow=true")
    assert status == 200 and events[-1]["kind"] == "job.done"
    assert [e["seq"] for e in events] == list(range(len(events)))

    conn = await asyncpg.connect(p.dsn("demo"))
    try:
        _, conns = await api.call("GET", "/v1/connections")
        assert len(conns) == 1 and conns[0]["user"] == "postgres"
        assert conns[0]["alias"] == "demo" and conns[0]["bytes_to_client"] > 0
        _, insts = await api.call("GET", "/v1/instances")
        assert len(insts) == 1
        inst = insts[0]
        assert (inst["alias"], inst["label"], inst["state"], inst["isolation"]) == (
            "demo",
            "default",
            state,
            "shared",
        )
        assert inst["connections"] == 1 and conns[0]["instance"] == inst["id"]
        status, got = await api.call("GET", "/v1/instances/demo")
        assert status == 200 and got["id"] == inst["id"]
        _, one = await api.call("GET", f"/v1/states/{state}")
        assert one["instances"] == [inst["id"]] and one["use_count"] >= 1
    finally:
        await conn.close()


async def test_reset_ends_sessions_and_next_gets_fresh_clone(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api = Api(p, http)
    conn = await asyncpg.connect(p.dsn("demo"))
    await conn.execute("delete from rental")
    busy = asyncio.create_task(conn.execute("select pg_sleep(30)"))
    await asyncio.sleep(0.5)
    status, body = await api.call("POST", "/v1/aliases/demo/reset", json={})
    assert status == 200 and body["reset"] == "demo:default"
    # asyncpg reports the ErrorResponse as the cause of the closed connection.
    with pytest.raises(asyncpg.ConnectionDoesNotExistError) as e:
        await asyncio.wait_for(busy, 10)
    assert isinstance(e.value.__cause__, asyncpg.AdminShutdownError)
    assert e.value.__cause__.sqlstate == "57P01"
    await conn.close()
    conn = await asyncpg.connect(p.dsn("demo"))
    try:
        assert await conn.fetchval("select count(*) from rental") == 5000
    finally:
        await conn.close()
    status, body = await api.call("POST", "/v1/aliases/demo/reset", json={"label": "other"})
    assert status == 404 and "demo:other" in body["error"]["message"]
    status, body = await api.call("POST", "/v1/aliases/demo/reset", json={"label": "bad label"})
    assert status == 422 and body["error"]["field"] == "label"


async def test_snapshot_live_instance_opens_as_state_name(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api = Api(p, http)
    conn = await asyncpg.connect(p.dsn("demo:work"))
    try:
        await conn.execute("create table note (t text); insert into note values ('kept')")
        status, body = await api.call(
            "POST", "/v1/snapshots", json={"instance": "demo:work", "name": "with-note"}
        )
        assert status == 201, body
        assert body["kind"] == "snapshot" and body["names"] == ["with-note"]
        # The instance kept running through the pause.
        assert await conn.fetchval("select t from note") == "kept"
    finally:
        await conn.close()
    other = await asyncpg.connect(p.dsn("state:with-note"))
    try:
        assert await other.fetchval("select t from note") == "kept"
        assert await other.fetchval("select count(*) from film") == 1000
    finally:
        await other.close()
    _, states = await api.call("GET", "/v1/states")
    snap = next(s for s in states if s["kind"] == "snapshot")
    _, insts = await api.call("GET", "/v1/instances")
    work = next(i for i in insts if i["label"] == "work")
    assert snap["parent"] == work["state"]
    status, body = await api.call(
        "POST", "/v1/snapshots", json={"instance": "demo:work", "name": "with-note"}
    )
    assert status == 409 and body["error"]["code"] == "conflict"


async def test_bad_input(make_proxy: ProxyFactory, http: aiohttp.ClientSession) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api = Api(p, http)
    status, body = await api.call("GET", "/v1/states/feedface")
    assert status == 404 and body["error"]["message"] == 'state "feedface" does not exist'
    status, body = await api.call("GET", "/v1/aliases/nope/plan")
    assert status == 404
    status, body = await api.call("POST", "/v1/snapshots", json={"instance": "x"})
    assert status == 422 and body["error"]["field"] == "name"
    status, body = await api.call("POST", "/v1/snapshots", data=b"{not json")
    assert status == 422 and body["error"]["field"] == "(body)"
    status, body = await api.call("POST", "/v1/cache/gc", json={"dry_run": "maybe"})
    assert status == 422 and body["error"]["field"] == "dry_run"
    status, body = await api.call("GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    # Two per-connection instances: the prefix "i-" is ambiguous and names both.
    a = await asyncpg.connect(p.dsn("demo", options="-c taidon.isolation=connection"))
    b = await asyncpg.connect(p.dsn("demo", options="-c taidon.isolation=connection"))
    try:
        _, insts = await api.call("GET", "/v1/instances")
        status, body = await api.call("GET", "/v1/instances/i-")
        assert status == 409 and body["error"]["code"] == "ambiguous"
        assert sorted(body["error"]["candidates"]) == sorted(i["id"] for i in insts)
        # Removing the state under them is refused, then forced.
        state = insts[0]["state"]
        status, body = await api.call("DELETE", f"/v1/states/{state}")
        assert status == 409 and body["error"]["code"] == "in_use"
        assert (
            body["error"]["instances"] and (await api.call("GET", f"/v1/states/{state}"))[0] == 200
        )
        status, body = await api.call("DELETE", f"/v1/states/{state}?dry_run=true")
        assert status == 200 and body["removed"] is False and body["states"] == [state]
        status, body = await api.call("DELETE", f"/v1/states/{state}?force=true")
        assert status == 200 and body["removed"] is True
        assert (await api.call("GET", f"/v1/states/{state}"))[0] == 404
        assert a.is_closed() or await _closed_on_use(a)
    finally:
        await a.close()
        await b.close()


async def test_pin_cache_and_metrics(make_proxy: ProxyFactory, http: aiohttp.ClientSession) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api = Api(p, http)
    for _ in range(2):
        conn = await asyncpg.connect(p.dsn("demo", options="-c taidon.isolation=connection"))
        await conn.fetchval("select count(*) from film")
        await conn.close()
    _, states = await api.call("GET", "/v1/states")
    leaf = states[-1]["id"]
    status, body = await api.call("POST", f"/v1/states/{leaf}/pin")
    assert status == 200 and body["pinned"] is True
    status, body = await api.call("DELETE", f"/v1/states/{leaf}/pin")
    assert status == 200 and body["pinned"] is False
    status, body = await api.call("GET", "/v1/cache")
    assert status == 200 and body["state_count"] == len(states)
    status, body = await api.call("POST", "/v1/cache/gc", json={"dry_run": True})
    assert status == 200 and body["dry_run"] is True and body["evicted"] == []

    status, text = await api.call("GET", "/metrics")
    assert status == 200
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert metrics["taidon_connections_total"] == 2
    assert metrics["taidon_cache_misses_total"] == 1  # the first connection built
    assert metrics["taidon_cache_hits_total"] == 1
    assert metrics['taidon_builds_total{outcome="succeeded"}'] == 1
    assert metrics["taidon_build_seconds_count"] == 1
    assert metrics['taidon_clone_seconds_count{purpose="instance"}'] == 2
    assert metrics['taidon_relayed_bytes_total{direction="instance_to_client"}'] > 0
    assert metrics["taidon_connections_open"] == 0
    assert metrics["taidon_evictions_total"] == 0
    # Per-connection instances keep no server connections for the next client.
    assert metrics["taidon_server_connections_reused_total"] == 0


async def test_drain_stops_accepting_then_requests_stop(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    p = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api = Api(p, http)
    conn = await asyncpg.connect(p.dsn("demo"))
    assert await api.call("GET", "/v1/ready", auth=False) == (200, {"status": "ready"})
    status, body = await api.call("POST", "/v1/drain", json={"timeout": 30})
    assert status == 202 and body == {"draining": True, "sessions": 1}
    assert (await api.call("GET", "/v1/health", auth=False))[1] == {"status": "draining"}
    # Readiness fails (a Service stops routing here); liveness stays 200.
    assert await api.call("GET", "/v1/ready", auth=False) == (503, {"status": "draining"})
    with pytest.raises(OSError):
        await asyncpg.connect(p.dsn("demo"), timeout=5)
    assert await conn.fetchval("select 1") == 1  # open sessions carry on
    assert not p.proxy.stop_requested.is_set()
    await conn.close()
    async with asyncio.timeout(10):
        await p.proxy.stop_requested.wait()


async def _closed_on_use(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("select 1")
    except (
        asyncpg.AdminShutdownError,
        asyncpg.ConnectionDoesNotExistError,
        asyncpg.InterfaceError,
    ):
        return True
    return False
