"""The disk and idle TTL quotas of the team server with real Postgres and asyncpg: a team's
quota of a few MB filled by INSERTs refuses new instances (53100), an audit record says so,
a reset frees it; an idle TTL ceiling of seconds stops a recipe's instance that asked for 1h."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from taidon_proxy.admin.auth import read_token
from taidon_proxy.services.disk import DISK_EVERY_S
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration
USERS = ["ana", "bob", "cy"]
LIMIT = 4 * 2**20
TEAMS = {
    "payments": {"members": ["ana", "bob"], "aliases": ["shop"], "quotas": {"disk": "4MiB"}},
    "ops": {"members": ["cy"], "aliases": ["shop"]},
}
# About 9 MB of rows: past the 4 MiB limit whatever Postgres preallocates.
FILL = "create table big as select g, repeat('x', 1000) as pad from generate_series(1, 9000) g"


def shop(pg_dir: Path, **extra: Any) -> dict[str, Any]:
    f = pg_dir / "shop.sql"
    f.write_text("create table t (x int);\ninsert into t values (7);\n")
    return {"shop": {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": USERS, **extra}}


class Admin:
    def __init__(self, p: RunningProxy, http: aiohttp.ClientSession) -> None:
        assert p.proxy.admin is not None and p.proxy.admin.address is not None
        token = read_token(p.proxy.config.store)
        self.base, self.http = f"http://{p.proxy.admin.address}", http
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        async with self.http.request(method, self.base + path, headers=self.headers, **kw) as r:
            assert r.status < 300, (method, path, r.status, await r.text())
            return await r.json()

    async def tokens(self) -> dict[str, str]:
        made = {}
        for user in USERS:
            created = await self.call("POST", "/v1/tokens", json={"name": "t", "user": user})
            made[user] = created["token"]
        return made

    async def disk(self, team: str, until: Any) -> dict[str, Any]:
        """The team's disk entry once `until(entry)` holds (measurements come every few s)."""
        deadline = time.monotonic() + 3 * DISK_EVERY_S + 5
        while True:
            entry: dict[str, Any] = (await self.call("GET", "/v1/quotas"))["teams"][team]
            if until(entry["disk"]) or time.monotonic() > deadline:
                return entry
            await asyncio.sleep(0.3)


async def test_disk_quota_refuses_new_instances_with_53100_until_a_reset(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy(
        shop(pg_dir), store=store, admin={"listen": "127.0.0.1:0"}, teams=TEAMS,
        auth={"method": "scram-sha-256"},
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        admin = Admin(p, http)
        tokens = await admin.tokens()
        ana = await asyncpg.connect(p.dsn("shop:ana", user="ana"), password=tokens["ana"])
        try:
            await ana.execute(FILL)
            entry = await admin.disk("payments", lambda d: d["used"] > LIMIT)
            assert entry["disk"]["limit"] == LIMIT and entry["disk"]["used"] > LIMIT, entry
            used = (await admin.call("GET", "/v1/quotas"))["users"]["ana"]["disk"]["used"]
            assert used > LIMIT  # charged to the user who wrote it too

            # A new instance for anyone of the team: refused, saying which quota, use, limit.
            with pytest.raises(asyncpg.PostgresError) as refused:
                await asyncpg.connect(p.dsn("shop:bobs", user="bob"), password=tokens["bob"])
            err = refused.value
            assert err.sqlstate == "53100"
            message = err.args[0]
            assert message.startswith(
                'quota exceeded: disk written by the instances of team "payments": '
            ), message
            assert message.endswith(" MiB in use, limit 4.0 MiB"), message
            assert "sqlrs admin quotas" in (err.hint or "")
            # Her existing instance is no new one; another team's member is not limited.
            again = await asyncpg.connect(p.dsn("shop:ana", user="ana"), password=tokens["ana"])
            assert await again.fetchval("select count(*) from big") == 9000
            await again.close()
            cy = await asyncpg.connect(p.dsn("shop:cys", user="cy"), password=tokens["cy"])
            await cy.close()

            records = await admin.call("GET", "/v1/audit?kind=quota_refusal")
            assert [r["actor"] for r in records] == ["bob"]
            fields = records[0]["fields"]
            assert fields["quota"] == "disk" and fields["of"] == 'team "payments"'
            assert fields["limit"] == LIMIT and fields["used"] > LIMIT
            assert fields["sqlstate"] == "53100" and fields["alias"] == "shop"
            q = await admin.call("GET", "/v1/quotas")
            assert q["teams"]["payments"]["refused"] == 1
        finally:
            await ana.close()

        # A reset drops what the instance wrote: once measured, the team may start one again.
        await admin.call("POST", "/v1/aliases/shop/reset", json={"label": "ana"})
        entry = await admin.disk("payments", lambda d: d["used"] <= LIMIT)
        assert entry["disk"]["used"] <= LIMIT, entry
        bob = await asyncpg.connect(p.dsn("shop:bobs", user="bob"), password=tokens["bob"])
        assert await bob.fetchval("select x from t") == 7
        await bob.close()


async def instance(admin: Admin, key: str) -> dict[str, Any]:
    found = [i for i in await admin.call("GET", "/v1/instances") if i["key"] == key]
    assert len(found) == 1, found
    return found[0]


async def test_idle_ttl_ceiling_caps_what_the_recipe_asks_for(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    ops = {"members": ["cy"], "aliases": ["shop"], "quotas": {"idle_ttl": "3s"}}
    teams = {"payments": {"members": ["ana", "bob"], "aliases": ["shop"]}, "ops": ops}
    p = await make_proxy(
        shop(pg_dir, idle_ttl="1h"), store=store, admin={"listen": "127.0.0.1:0"}, teams=teams,
        users={"ana": {"quotas": {"idle_ttl": "2s"}}}, auth={"method": "scram-sha-256"},
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        admin = Admin(p, http)
        tokens = await admin.tokens()
        conns = {
            user: await asyncpg.connect(p.dsn(f"shop:{user}", user=user), password=tokens[user])
            for user in USERS
        }
        assert (await instance(admin, "shop:ana"))["ttl_seconds"] == 2  # her own ceiling
        assert (await instance(admin, "shop:bob"))["ttl_seconds"] == 3600  # the recipe's
        assert (await instance(admin, "shop:cy"))["ttl_seconds"] == 3  # his team's
        q = await admin.call("GET", "/v1/quotas")
        assert q["users"]["ana"]["idle_ttl"] == {"limit": 2.0}
        assert q["teams"]["ops"]["idle_ttl"] == {"limit": 3.0}
        # Busy instances are not idle: an open session keeps its instance past the ceiling.
        await asyncio.sleep(3.5)
        assert await conns["ana"].fetchval("select x from t") == 7
        closed = time.monotonic()
        for c in conns.values():
            await c.close()
        deadline = closed + 10
        while time.monotonic() < deadline:
            if (await instance(admin, "shop:cy"))["status"] == "stopped":
                break
            await asyncio.sleep(0.2)
        stopped_after = time.monotonic() - closed
        assert (await instance(admin, "shop:ana"))["status"] == "stopped"
        assert (await instance(admin, "shop:cy"))["status"] == "stopped"
        assert 2.5 <= stopped_after < 8, stopped_after
        assert (await instance(admin, "shop:bob"))["status"] == "running"  # 1h, as asked
        # The clone is kept: her next connection finds her data on a restarted server.
        ana = await asyncpg.connect(p.dsn("shop:ana", user="ana"), password=tokens["ana"])
        assert await ana.fetchval("select x from t") == 7
        await ana.close()
