"""The team server through real clients: several users and teams at once, personal access
tokens as passwords (asyncpg, psycopg, psql; SCRAM and cleartext over TLS), roles on the wire
and over HTTP (aiohttp), and a quota race of concurrent asyncpg connects."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg
import pytest
import yaml

from taidon_proxy.admin.auth import read_token
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

USERS = ["ana", "bob", "ci-payments", "vic", "olga"]
TEAMS = {
    "payments": {
        "members": ["ana", "ci-payments"],
        "aliases": ["shop", "billing"],
        "role": "developer",
        "quotas": {"instances": 4},
    },
    "payments-leads": {"members": ["bob"], "aliases": ["shop"], "role": "maintainer"},
    "auditors": {"members": ["vic"], "aliases": ["hr"], "role": "viewer"},
    "ops": {"members": ["olga"], "role": "admin"},
}
WRONG = 'password authentication failed for user "{}"'


def recipes(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "team.sql"
    f.write_text("create table t (x int);\ninsert into t values (7);\n")
    one = {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": USERS}
    return {
        "shop": one,
        "billing": {**one, "isolation": "connection"},
        "hr": one,
    }


async def team_proxy(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, **settings: Any
) -> RunningProxy:
    settings.setdefault("auth", {"method": "scram-sha-256"})
    settings.setdefault("users", {"ana": {"quotas": {"instances": 2}}})
    return await make_proxy(
        recipes(pg_dir), store=store, admin={"listen": "127.0.0.1:0"}, teams=TEAMS, **settings
    )


class Api:
    """The admin API over real HTTP with one bearer."""

    def __init__(self, p: RunningProxy, http: aiohttp.ClientSession, bearer: str) -> None:
        assert p.proxy.admin is not None and p.proxy.admin.address is not None
        self.base = f"http://{p.proxy.admin.address}"
        self.http = http
        self.headers = {"Authorization": f"Bearer {bearer}"}

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, headers=self.headers, **kw) as r:
            return r.status, await r.json()


async def token_for(admin: Api, user: str, **body: Any) -> str:
    status, created = await admin.call(
        "POST", "/v1/tokens", json={"name": "ci", "user": user, **body}
    )
    assert status == 201, created
    assert created["token"].startswith(f"tdn_{created['id']}_")
    return str(created["token"])


async def psql(p: RunningProxy, user: str, password: str, db: str) -> tuple[int, str]:
    env = {k: v for k, v in p.libpq_env().items() if k not in ("PGSSLMODE",)}
    env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-w", "-U", user, "-d", db, "-c", "select current_user, x from t",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return proc.returncode or 0, (out + err).decode()


async def test_tokens_are_passwords_for_real_clients(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        ana_token = await token_for(admin, "ana")
        # ana manages her own tokens with her token; the secret is never listed
        ana = Api(p, http, ana_token)
        status, own = await ana.call("POST", "/v1/tokens", json={"name": "laptop"})
        assert status == 201
        status, listed = await ana.call("GET", "/v1/tokens")
        assert status == 200
        assert {t["name"] for t in listed} == {"ci", "laptop"}
        assert all("token" not in t and t["user"] == "ana" for t in listed)
        ci_token = await token_for(admin, "ci-payments")
        # every one of ana's tokens works (one SCRAM proof, tried against each verifier)
        for token in (ana_token, own["token"]):
            conn = await asyncpg.connect(p.dsn("shop", user="ana"), password=token)
            try:
                assert await conn.fetchval("select current_user") == "ana"
            finally:
                await conn.close()
        async with await psycopg.AsyncConnection.connect(
            p.dsn("billing", user="ci-payments"), password=ci_token
        ) as pc:
            cur = await pc.execute("select current_user, x from t")
            assert await cur.fetchone() == ("ci-payments", 7)
        code, out = await psql(p, "ci-payments", ci_token, "shop")
        assert code == 0, out
        assert out.strip() == "ci-payments|7"
        # a token is its own user's only
        with pytest.raises(asyncpg.InvalidPasswordError, match=WRONG.format("bob")):
            await asyncpg.connect(p.dsn("shop", user="bob"), password=ana_token)


async def test_revoked_expired_and_malformed_tokens_answer_as_a_wrong_password(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        revoked = await token_for(admin, "ana")
        token_id = revoked.split("_")[1]
        status, row = await admin.call("DELETE", f"/v1/tokens/{token_id}")
        assert status == 200 and row["revoked"] is not None
        expiring = await token_for(admin, "ana", expires_in=1)
        await asyncio.sleep(1.2)
        malformed = revoked[:-1] + ("A" if revoked[-1] != "A" else "B")
        for bad in (revoked, expiring, malformed, "tdn_nothing", "wrong"):
            with pytest.raises(asyncpg.InvalidPasswordError) as e:
                await asyncpg.connect(p.dsn("shop", user="ana"), password=bad)
            assert e.value.sqlstate == "28P01"
            assert str(e.value) == WRONG.format("ana")
            # and over HTTP: the same 401 as no token at all
            status, body = await Api(p, http, bad).call("GET", "/v1/status")
            assert status == 401 and body["error"]["code"] == "unauthorized"
        # another user's token cannot be revoked by ana: it answers as an unknown one
        ci = await token_for(admin, "ci-payments")
        ana = Api(p, http, await token_for(admin, "ana"))
        status, body = await ana.call("DELETE", f"/v1/tokens/{ci.split('_')[1]}")
        assert status == 404
        status, again = await ana.call("DELETE", "/v1/tokens/000000000000")
        assert status == 404
        assert body["error"]["message"].split('"')[0] == again["error"]["message"].split('"')[0]


async def test_cleartext_token_over_tls(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store, auth={"method": "password"}, tls=cert)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        token = await token_for(Api(p, http, admin_token), "ana")
    ctx = ssl.create_default_context(cafile=cert["cert"])
    conn = await asyncpg.connect(p.dsn("shop", user="ana"), password=token, ssl=ctx)
    try:
        assert await conn.fetchval("select x from t") == 7
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError, match=WRONG.format("ana")):
        await asyncpg.connect(p.dsn("shop", user="ana"), password=token[:-2] + "xx", ssl=ctx)


async def test_roles_on_the_wire_and_over_http(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        tokens = {u: await token_for(admin, u) for u in ("ana", "bob", "vic")}
        ana, bob, vic = (Api(p, http, tokens[u]) for u in ("ana", "bob", "vic"))
        # a developer is refused a maintainer route, naming the permission
        status, body = await ana.call("POST", "/v1/aliases/shop/reset", json={})
        assert status == 403, body
        assert body["error"]["code"] == "forbidden"
        assert body["error"]["permission"] == "reset"
        assert body["error"]["message"] == (
            'permission denied: reset on alias "shop" needs the maintainer role (ana has developer)'
        )
        conn = await asyncpg.connect(p.dsn("shop", user="bob"), password=tokens["bob"])
        await conn.close()
        status, body = await bob.call("POST", "/v1/aliases/shop/reset", json={})
        assert status == 200, body  # a maintainer of shop may
        # the audit log names the token's user, not "admin"; only an admin may read it
        status, recs = await admin.call("GET", "/v1/audit?kind=reset")
        assert status == 200 and [r["actor"] for r in recs] == ["bob"], recs
        status, body = await bob.call("GET", "/v1/audit")
        assert status == 403 and body["error"]["permission"] == "administer"
        # an alias ana cannot see answers exactly as one that does not exist
        status_hr, hr = await ana.call("GET", "/v1/aliases/hr/plan")
        status_no, no = await ana.call("GET", "/v1/aliases/nope/plan")
        assert status_hr == status_no == 404
        assert hr["error"]["message"].replace("hr", "X") == no["error"]["message"].replace(
            "nope", "X"
        )
        assert "hr" not in str(hr["error"].get("detail"))
        status, listed = await ana.call("GET", "/v1/aliases")
        assert status == 200 and [a["alias"] for a in listed] == ["billing", "shop"]
        status, body = await ana.call("POST", "/v1/drain", json={})
        assert status == 403 and body["error"]["permission"] == "administer"
        status, _ = await vic.call("GET", "/v1/aliases/hr/plan")
        assert status == 200
        status, body = await vic.call("POST", "/v1/aliases/hr/prepare")
        assert status == 403 and body["error"]["permission"] == "build"
        status, st = await ana.call("GET", "/v1/status")
        assert status == 200 and st["aliases"] == ["billing", "shop"]

        # a developer stops an instance only her own sessions use, not one bob's use too
        own = await asyncpg.connect(p.dsn("billing", user="ana"), password=tokens["ana"])
        shared = await asyncpg.connect(p.dsn("shop", user="bob"), password=tokens["bob"])
        try:
            status, listed = await ana.call("GET", "/v1/instances")
            by_alias = {i["alias"]: i["id"] for i in listed}
            assert status == 200 and set(by_alias) == {"billing", "shop"}
            status, body = await ana.call("DELETE", f"/v1/instances/{by_alias['shop']}")
            assert status == 403 and body["error"]["permission"] == "reset", body
            status, body = await ana.call("DELETE", f"/v1/instances/{by_alias['billing']}")
            assert status == 200 and body["removed"], body
        finally:
            await own.close()
            await shared.close()

    # on the wire: a foreign team's alias is unknown to ana; a viewer may not connect
    with pytest.raises(asyncpg.InvalidCatalogNameError) as unseen:
        await asyncpg.connect(p.dsn("hr", user="ana"), password=tokens["ana"])
    with pytest.raises(asyncpg.InvalidCatalogNameError) as unknown:
        await asyncpg.connect(p.dsn("nope", user="ana"), password=tokens["ana"])
    assert unseen.value.args[0] == 'database "hr" does not exist'
    assert unknown.value.hint == unseen.value.hint
    assert unseen.value.detail == unknown.value.detail == "known databases: billing, shop"
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as e:
        await asyncpg.connect(p.dsn("hr", user="vic"), password=tokens["vic"])
    assert e.value.sqlstate == "42501"
    assert e.value.args[0] == (
        'permission denied: connect on alias "hr" needs the developer role (vic has viewer)'
    )
    with pytest.raises(psycopg.OperationalError, match="needs the developer role"):
        await psycopg.AsyncConnection.connect(p.dsn("hr", user="vic"), password=tokens["vic"])


async def test_quota_race_exactly_the_quota_succeeds(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    """ana may hold 2 instances; 6 per-connection connects at once: exactly 2 get one."""
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        token = await token_for(admin, "ana")
        # the build first, so the race is about slots, not about who waits for the build
        conn = await asyncpg.connect(p.dsn("billing", user="ana"), password=token)
        await conn.close()
        results = await asyncio.gather(
            *(asyncpg.connect(p.dsn("billing", user="ana"), password=token) for _ in range(6)),
            return_exceptions=True,
        )
        try:
            won = [r for r in results if isinstance(r, asyncpg.Connection)]
            lost = [r for r in results if not isinstance(r, asyncpg.Connection)]
            assert len(won) == 2, results
            for err in lost:
                assert isinstance(err, asyncpg.TooManyConnectionsError), err
                assert err.sqlstate == "53300"
                assert err.args[0] == 'quota exceeded: instances for user "ana": 2 in use, limit 2'
            status, q = await Api(p, http, token).call("GET", "/v1/quotas")
            assert status == 200
            assert set(q["users"]) == {"ana"} and set(q["teams"]) == {"payments"}
            assert q["users"]["ana"]["instances"] == {"used": 2, "limit": 2}
            assert q["users"]["ana"]["refused"] == 4  # the four who lost the race
            assert q["teams"]["payments"]["instances"] == {"used": 2, "limit": 4}
            assert q["teams"]["payments"]["builds"] == {"used": 0, "limit": None}
            assert q["teams"]["payments"]["queued"] == {"used": 0, "limit": None}
        finally:
            for c in won:
                await c.close()
        for _ in range(50):  # the sessions' close runs after the client's
            status, q = await admin.call("GET", "/v1/quotas")
            if q["users"]["ana"]["instances"]["used"] == 0:
                break
            await asyncio.sleep(0.1)
        assert q["users"]["ana"]["instances"] == {"used": 0, "limit": 2}
        assert set(q["teams"]) == set(TEAMS)  # the admin sees every team


async def test_team_quota_race_of_two_users(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    """payments may hold 4 instances, ana 2 of them: ana and ci-payments race 6 connects each;
    exactly 4 get an instance, ana at most 2, and every refusal names its quota."""
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        tokens = {u: await token_for(admin, u) for u in ("ana", "ci-payments")}
    conn = await asyncpg.connect(p.dsn("billing", user="ana"), password=tokens["ana"])
    await conn.close()  # the build first
    users = ["ana", "ci-payments"] * 6
    results = await asyncio.gather(
        *(asyncpg.connect(p.dsn("billing", user=u), password=tokens[u]) for u in users),
        return_exceptions=True,
    )
    won = [(u, r) for u, r in zip(users, results, strict=True) if isinstance(r, asyncpg.Connection)]
    try:
        assert len(won) == 4, results
        assert sum(1 for u, _ in won if u == "ana") <= 2
        for r in results:
            if not isinstance(r, asyncpg.Connection):
                assert isinstance(r, asyncpg.TooManyConnectionsError), r
                assert r.args[0] in (
                    'quota exceeded: instances for user "ana": 2 in use, limit 2',
                    'quota exceeded: instances for team "payments": 4 in use, limit 4',
                )
    finally:
        for _, c in won:
            await c.close()


async def test_passwords_tokens_and_users_in_no_team(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    """bob has a configured SCRAM password and a token (made with that password's salt): both
    work; mallory authenticates but is in no team: 42501."""
    from taidon_proxy.pgwire.scram import make_verifier

    verifiers = {u: make_verifier(f"{u}-pw", salt=f"salt-{u}".encode()) for u in ("bob", "mallory")}
    p = await team_proxy(
        make_proxy, pg_dir, store, auth={"method": "scram-sha-256", "users": verifiers}
    )
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        token = await token_for(Api(p, http, admin_token), "bob")
    for password in ("bob-pw", token):
        conn = await asyncpg.connect(p.dsn("shop", user="bob"), password=password)
        try:
            assert await conn.fetchval("select current_user") == "bob"
        finally:
            await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(p.dsn("shop", user="bob"), password="mallory-pw")
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as e:
        await asyncpg.connect(p.dsn("shop", user="mallory"), password="mallory-pw")
    assert e.value.args[0] == 'permission denied: user "mallory" is in no team'


async def test_a_reload_that_drops_a_member_ends_her_access(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        token = await token_for(admin, "ci-payments")
        conn = await asyncpg.connect(p.dsn("shop", user="ci-payments"), password=token)
        await conn.close()
        cfg = yaml.safe_load(p.config_path.read_text())
        cfg["teams"]["payments"]["members"] = ["ana"]
        p.config_path.write_text(yaml.safe_dump(cfg))
        status, body = await admin.call("POST", "/v1/reload")
        assert status == 200, body
        status, _ = await Api(p, http, token).call("GET", "/v1/tokens")
        assert status == 401
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is in no team"):
        await asyncpg.connect(p.dsn("shop", user="ci-payments"), password=token)


async def test_without_teams_tokens_are_refused_and_nothing_changes(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy(recipes(pg_dir), store=store, admin={"listen": "127.0.0.1:0"})
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        status, body = await admin.call("POST", "/v1/tokens", json={"name": "x", "user": "ana"})
        assert status == 409 and body["error"]["code"] == "unsupported", body
        status, listed = await admin.call("GET", "/v1/aliases")
        assert status == 200 and len(listed) == 3
    conn = await asyncpg.connect(p.dsn("hr"))  # trust, as before; any alias
    try:
        assert await conn.fetchval("select x from t") == 7
    finally:
        await conn.close()


async def test_lifetime_quota_ends_the_instance_with_57p01_saying_why(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store, users={"ana": {"quotas": {"lifetime": "3s"}}})
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        tokens = {u: await token_for(Api(p, http, admin_token), u) for u in ("ana", "bob")}
    ana = await asyncpg.connect(p.dsn("billing", user="ana"), password=tokens["ana"])
    bob = await asyncpg.connect(p.dsn("shop", user="bob"), password=tokens["bob"])
    try:
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as e:
            await ana.fetchval("select pg_sleep(30)")
        cause = e.value.__cause__
        assert isinstance(cause, asyncpg.AdminShutdownError) and cause.sqlstate == "57P01"
        assert cause.args[0] == (
            "terminating connection: the instance reached its maximum lifetime of 3s"
            ' (quota of user "ana")'
        )
        assert await bob.fetchval("select x from t") == 7  # bob has no lifetime quota
    finally:
        await ana.close()
        await bob.close()


async def test_a_member_signs_in_to_the_dashboard_with_her_own_token(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await team_proxy(make_proxy, pg_dir, store)
    admin_token = read_token(p.proxy.config.store)
    assert admin_token and p.proxy.admin is not None
    base = f"http://{p.proxy.admin.address}"
    async with aiohttp.ClientSession() as http:
        ana_token = await token_for(Api(p, http, admin_token), "ana")
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.post(f"{base}/ui/signin", data={"token": "tdn_nope_x"}) as r:
            assert r.status == 401
        async with browser.post(f"{base}/ui/signin", data={"token": ana_token}) as r:
            assert r.status == 200 and str(r.url) == f"{base}/"
        # The session is ana's: the API through its cookie shows only her aliases.
        async with browser.get(f"{base}/v1/aliases") as r:
            assert r.status == 200
            assert [a["alias"] for a in await r.json()] == ["billing", "shop"]
        async with browser.get(f"{base}/v1/audit") as r:  # an admin's read, refused to her
            body = await r.json()
            assert r.status == 403 and body["error"]["permission"] == "administer", body
