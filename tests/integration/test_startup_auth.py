"""The proxy's own authentication: trust, SCRAM-SHA-256 from config, cleartext only over TLS."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from taidon_proxy.pgwire.scram import make_verifier
from tests import log_secrets
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

PASSWORDS = {"postgres": "pg-secret", "app": "app pässword"}
log_secrets.register(*PASSWORDS.values())
USERS = {u: make_verifier(pw, salt=f"salt-{u}".encode()) for u, pw in PASSWORDS.items()}


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": ["app"]}


async def scram_proxy(make_proxy: ProxyFactory, pg_dir: Path, store: str) -> RunningProxy:
    return await make_proxy(
        {"one": recipe(pg_dir)}, store=store, auth={"method": "scram-sha-256", "users": USERS}
    )


async def psql(
    p: RunningProxy, user: str, password: str | None, **env_extra: str
) -> tuple[int, str]:
    env = {k: v for k, v in p.libpq_env().items() if k not in ("PGPASSWORD", "PGSSLMODE")}
    env.update(env_extra)
    if password is not None:
        env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-w", "-U", user, "-d", "one", "-c", "select current_user, x from t",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return proc.returncode or 0, (out + err).decode()


async def test_scram_with_real_clients(make_proxy: ProxyFactory, pg_dir: Path, store: str) -> None:
    p = await scram_proxy(make_proxy, pg_dir, store)
    for user, password in PASSWORDS.items():
        conn = await asyncpg.connect(p.dsn("one", user=user), password=password)
        try:
            assert await conn.fetchval("select current_user") == user
        finally:
            await conn.close()
        async with await psycopg.AsyncConnection.connect(
            p.dsn("one", user=user), password=password
        ) as pc:
            cur = await pc.execute("select current_user, x from t")
            assert await cur.fetchone() == (user, 42)
        code, out = await psql(p, user, password)
        assert code == 0, out
        assert out.strip() == f"{user}|42"


async def test_wrong_password_and_unknown_user_get_28p01(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await scram_proxy(make_proxy, pg_dir, store)
    for user, password in (("app", "wrong"), ("postgres", ""), ("mallory", "anything")):
        with pytest.raises(asyncpg.InvalidPasswordError) as e:
            await asyncpg.connect(p.dsn("one", user=user), password=password or "x")
        assert e.value.sqlstate == "28P01"
        assert str(e.value) == f'password authentication failed for user "{user}"'
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await psycopg.AsyncConnection.connect(p.dsn("one", user=user), password=password or "x")
    code, out = await psql(p, "app", "nope")
    assert code == 2
    assert 'password authentication failed for user "app"' in out
    # No password at all: psql -w gives up instead of prompting.
    code, out = await psql(p, "app", None)
    assert code == 2 and "password" in out
    # Nothing was started for the refused clients; the right password still works.
    assert p.proxy.instances is not None and not p.proxy.instances.instances
    conn = await asyncpg.connect(p.dsn("one", user="app"), password=PASSWORDS["app"])
    await conn.close()


async def test_trust_needs_no_password(make_proxy: ProxyFactory, pg_dir: Path, store: str) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    conn = await asyncpg.connect(p.dsn("one", user="app"), password="ignored")
    try:
        assert await conn.fetchval("select current_user") == "app"
    finally:
        await conn.close()


async def test_cleartext_password_only_over_tls(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await make_proxy(
        {"one": recipe(pg_dir)}, store=store, tls=cert,
        auth={"method": "password", "users": USERS},
    )  # fmt: skip
    async with await psycopg.AsyncConnection.connect(
        p.dsn("one", user="app"), password=PASSWORDS["app"], sslmode="require"
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        cur = await conn.execute("select current_user")
        assert await cur.fetchone() == ("app",)
    with pytest.raises(
        psycopg.OperationalError, match='password authentication failed for user "app"'
    ):
        await psycopg.AsyncConnection.connect(
            p.dsn("one", user="app"), password="wrong", sslmode="require"
        )
    # Without TLS the proxy refuses before asking for the password.
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn("one", user="app"), password=PASSWORDS["app"], ssl=False)
    assert e.value.sqlstate == "28000"
    assert "requires TLS" in str(e.value)
    code, out = await psql(p, "app", PASSWORDS["app"])
    assert code == 0, out  # psql's default sslmode=prefer takes the TLS path
    code, out = await psql(p, "app", PASSWORDS["app"], PGSSLMODE="disable")
    assert code == 2 and "cleartext password authentication requires TLS" in out


async def test_scram_over_tls(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await make_proxy(
        {"one": recipe(pg_dir)}, store=store, tls=cert,
        auth={"method": "scram-sha-256", "users": USERS},
    )  # fmt: skip
    # libpq's default channel_binding=prefer falls back to plain SCRAM-SHA-256 (no -PLUS offered).
    async with await psycopg.AsyncConnection.connect(
        p.dsn("one", user="app"), password=PASSWORDS["app"], sslmode="require"
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        cur = await conn.execute("select current_user")
        assert await cur.fetchone() == ("app",)
    conn2 = await asyncpg.connect(p.dsn("one"), password=PASSWORDS["postgres"], ssl="require")
    try:
        assert await conn2.fetchval("select 1") == 1
    finally:
        await conn2.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(p.dsn("one"), password="bad", ssl="require")
