"""Security properties as tests: the admin API's token on every route, no secret in any log
line, instances reachable only through the proxy, no TLS below 1.2."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import stat
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg
import pytest

from taidon_proxy.admin.auth import read_token
from taidon_proxy.pgwire.scram import make_verifier
from tests import log_secrets
from tests.conftest import ProxyFactory

pytestmark = pytest.mark.integration

PASSWORDS = {"postgres": "pg-Sekr1t-4242", "app": "app-Sekr1t-9191"}
log_secrets.register(*PASSWORDS.values())
USERS = {u: make_verifier(pw, salt=f"salt-{u}".encode()) for u, pw in PASSWORDS.items()}
WRONG = "wrong-Sekr1t-0000"
PUBLIC = {"/v1/health", "/v1/ready", "/v1/openapi.json"}
# Signing in is how a token is got: these answer without one (409 here, no OIDC configured).
LOGIN = {"/v1/login/oidc/start", "/v1/login/oidc"}


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": ["app"]}


def _filled(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_route_but_the_public_ones_refuses_a_missing_or_wrong_token(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store, admin={"listen": "127.0.0.1:0"})
    assert p.proxy.admin is not None
    base = f"http://{p.proxy.admin.address}"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(base + "/v1/openapi.json") as r:
            doc = await r.json()
        checked = 0
        for path, ops in doc["paths"].items():
            if path in PUBLIC:
                continue
            if path in LOGIN:
                body = {"login_id": "x", "id_token": "x"} if path == "/v1/login/oidc" else {}
                for method in ops:
                    async with http.request(method, base + path, json=body) as r:
                        assert r.status == 409, (method, path, r.status)
                        assert (await r.json())["error"]["code"] == "unsupported"
                continue
            for method in ops:
                for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                    async with http.request(method, base + _filled(path), headers=headers) as r:
                        assert r.status == 401, (method, path, headers, r.status)
                        body = await r.json()
                        assert body["error"]["code"] == "unauthorized"
                        checked += 1
        assert checked >= 2 * 20  # the document lists every route (another test holds that)
        # The token itself still opens them.
        token = read_token(p.proxy.config.store)
        async with http.get(base + "/v1/states", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200


async def test_no_secret_reaches_a_log_line(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, capfd: pytest.CaptureFixture[str]
) -> None:
    p = await make_proxy(
        {"one": recipe(pg_dir)}, store=store, admin={"listen": "127.0.0.1:0"},
        auth={"method": "scram-sha-256", "users": USERS},
    )  # fmt: skip
    token = read_token(p.proxy.config.store)
    # Good and bad logins through two drivers, an unknown user, and admin calls with the token.
    conn = await asyncpg.connect(p.dsn("one"), user="app", password=PASSWORDS["app"])
    assert await conn.fetchval("select x from t") == 42
    await conn.close()
    for user in ("app", "postgres", "nobody"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(p.dsn("one"), user=user, password=WRONG)
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(p.dsn("one"), user="postgres", password=WRONG)
    async with await psycopg.AsyncConnection.connect(
        p.dsn("one"), user="postgres", password=PASSWORDS["postgres"]
    ) as pconn:
        await pconn.execute("select 1")
    assert p.proxy.admin is not None
    base = f"http://{p.proxy.admin.address}"
    async with aiohttp.ClientSession() as http:
        for route in ("/v1/connections", "/v1/instances", "/v1/jobs", "/v1/status"):
            async with http.get(base + route, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, route
                served = await r.text()
                assert token not in served and PASSWORDS["app"] not in served
    out, err = capfd.readouterr()
    logs = out + err
    assert "auth" in logs or "session" in logs  # the proxy did log while this ran
    secrets_used = [*PASSWORDS.values(), WRONG, token, *USERS.values()]
    # A verifier's parts (salt, stored and server keys) are secret too.
    secrets_used += [
        part for v in USERS.values() for part in re.split(r"[$:]", v) if len(part) > 20
    ]
    for secret in secrets_used:
        assert secret not in logs, f"a secret ({secret[:6]}…) is in the proxy's log output"


async def test_instances_listen_only_on_a_private_socket(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    conn = await asyncpg.connect(p.dsn("one"))
    try:
        assert await conn.fetchval("show listen_addresses") == ""
    finally:
        await conn.close()
    assert p.proxy.instances is not None
    [inst] = p.proxy.instances.instances.values()
    mode = inst.handle.socket_dir.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o700, oct(mode.st_mode)
    # Its owner is the user the server runs as (the same as its data directory's).
    assert mode.st_uid == inst.handle.pgdata.stat().st_uid


def _old_client(newest: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers TLS 1.0 up to `newest`, with every cipher its OpenSSL has."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    with contextlib.suppress(ValueError, ssl.SSLError):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # old on purpose
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = newest
    return ctx


async def _handshake(host: str, port: int, ctx: ssl.SSLContext) -> str | None:
    """The TLS version the server agreed to (direct TLS, ALPN postgresql)."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"), 30
    )
    try:
        version: str | None = writer.get_extra_info("ssl_object").version()
        return version
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_tls_below_1_2_is_refused(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store, tls=cert)
    # The same old client, allowed TLS 1.2, gets it: what is refused below is the version.
    assert await _handshake(p.host, p.port, _old_client(ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    with warnings.catch_warnings(), pytest.raises((ssl.SSLError, ConnectionError)):
        warnings.simplefilter("ignore", DeprecationWarning)
        await _handshake(p.host, p.port, _old_client(ssl.TLSVersion.TLSv1_1))
    async with await psycopg.AsyncConnection.connect(p.dsn("one"), sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
