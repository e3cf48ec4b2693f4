"""State bundles between two proxies with separate stores, over the real admin API: a state
built by one is served by the other with no build, and bad bundles change nothing there."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import ProxyFactory, RunningProxy, demo_recipe
from tests.integration.bundle_support import ADMIN, Api, as_other_major, join, split, store_view

pytestmark = pytest.mark.integration
FILMS = "select count(*) from film"


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def films(p: RunningProxy, database: str = "demo") -> int:
    conn = await asyncpg.connect(p.dsn(database), timeout=120)
    try:
        return int(await conn.fetchval(FILMS))
    finally:
        await conn.close()


async def test_export_then_import_serves_the_alias_without_a_build(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    a = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    b = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    api_a, api_b = Api(a, http), Api(b, http)
    assert await films(a) == 1000
    _, key_a = await api_a.get("/v1/aliases/demo/key")
    _, key_b = await api_b.get("/v1/aliases/demo/key")
    assert key_a["key"] == key_b["key"] and key_a["cached"] and not key_b["cached"]
    assert key_a["steps"] == 3
    data = await api_a.export(key_a["key"][:12])
    manifest, rest = split(data)
    assert manifest["state"] == key_a["key"] and manifest["alias"] == "demo"
    assert [link["kind"] for link in manifest["chain"]] == [
        "initdb",
        "root",
        "psql",
        "psql",
        "psql",
    ]
    assert manifest["engine"]["major"] == 15

    before = await store_view(b)
    assert before[0][0] == []  # no state at all in b: no initdb, no root
    tampered = {**manifest["chain"][-1], "step_hash": "e" * 64}
    bad = {
        "flipped byte": data[:-100] + bytes([data[-100] ^ 0x40]) + data[-99:],
        "truncated": data[: len(data) * 2 // 3],
        "id not from chain": join({**manifest, "state": "d" * 64}, rest),
        "link tampered": join({**manifest, "chain": [*manifest["chain"][:-1], tampered]}, rest),
        "postgres 16": join(as_other_major(manifest, "16.4"), rest),
    }
    answers = {}
    for what, body in bad.items():
        status, out = await api_b.import_(body)
        assert status == 422, (what, out)
        answers[what] = out["error"]
        assert await store_view(b) == before, what
    assert answers["flipped byte"]["check"] == "content"
    assert answers["truncated"] == {
        "code": "invalid_bundle",
        "check": "truncated",
        "message": "truncated: the file ends inside the data (incomplete zstd frame)",
        "hint": None,
    }
    assert answers["id not from chain"]["message"] == (
        f"the chain ends at {manifest['state'][:12]}, not at the bundle's state dddddddddddd"
    )
    assert answers["link tampered"]["message"].startswith("link 5 (03_views.sql) is listed as")
    assert answers["postgres 16"]["code"] == "incompatible"
    assert answers["postgres 16"]["message"].startswith(
        "the bundle holds a Postgres 16 state (built with 16.4); this proxy runs Postgres 15 ("
    )

    status, out = await api_b.import_(data)
    assert status == 200, out
    assert out["imported"] and out["adopted"] and out["state"] == key_a["key"]
    assert out["message"].endswith("demo serves it now, without a build")
    assert (await api_b.get("/v1/aliases/demo/key"))[1]["cached"]
    assert await films(b) == 1000
    assert b.proxy.builder is not None and b.proxy.builder.jobs == {}
    assert (await api_b.get("/v1/jobs"))[1] == []
    rows = (await store_view(b))[0][0]
    assert [r[0] for r in rows] == [key_a["key"]]  # only the final state: no initdb ran
    # Again: nothing new, and a damaged copy of a state it has is still called damaged.
    status, out = await api_b.import_(data)
    assert status == 200 and not out["imported"] and out["adopted"]
    status, out = await api_b.import_(bad["flipped byte"])
    assert status == 422 and out["error"]["check"] == "content"


async def test_without_a_recipe_here_by_id_and_live_snapshots_refused(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    a = await make_proxy({"demo": demo_recipe()}, admin=ADMIN)
    b = await make_proxy({}, admin=ADMIN)
    api = Api(a, http)
    assert await films(a) == 1000
    _, key = await api.get("/v1/aliases/demo/key")
    data = await api.export(key["key"])
    status, out = await Api(b, http).import_(data)
    assert status == 200 and out["imported"] and not out["adopted"]
    assert out["message"].endswith(
        f"no recipe demo is configured here: connect with state:{out['state']}"
    )
    assert await films(b, f"state:{out['state']}") == 1000
    status, out = await Api(b, http).import_(data, alias="nope")
    assert status == 404 and out["error"]["message"] == 'alias "nope" does not exist'
    # A live snapshot's id is random, not derived: another store could not check it.
    conn = await asyncpg.connect(a.dsn("demo:snap"), timeout=60)
    try:
        async with http.post(
            api.base + "/v1/snapshots", headers=api.headers,
            json={"instance": "demo:snap", "name": "mine"},
        ) as r:  # fmt: skip
            assert r.status == 201, await r.text()
    finally:
        await conn.close()
    async with http.get(api.base + "/v1/states/mine/bundle", headers=api.headers) as r:
        assert r.status == 409
        err = (await r.json())["error"]
    assert err["code"] == "not_exportable" and err["check"] == "chain"
    assert "has no recorded derivation" in err["message"]
