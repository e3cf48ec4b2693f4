"""The audit log with a real proxy and real clients: one record per connection (churned,
refused, failed auth), admin actions with their actor, tampering found by the API and by
`sqlrs admin audit verify`, and a chain that goes on across a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from taidon_proxy.admin.auth import read_token
from taidon_proxy.pgwire.scram import make_verifier
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

CHURN = 1000  # connections in the churn test (about 6 s of churn here)
CONCURRENCY = 8
PASSWORD = "s3cret-Pässword-never-logged"
ADMIN = {"listen": "127.0.0.1:0"}


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "audit.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


async def records(p: RunningProxy, limit: int = 10_000, **query: Any) -> list[dict[str, Any]]:
    return await p.proxy.audit.query(limit=limit, **query)


def tamper(p: RunningProxy, sql: str, *args: Any) -> None:
    """Change the table behind the proxy's back, as anyone who can write the file could."""
    db = sqlite3.connect(p.proxy.config.store / "meta.sqlite", isolation_level=None, timeout=10)
    try:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        db.execute(sql, args)
    finally:
        db.close()


async def api(p: RunningProxy, path: str, method: str = "GET", **kw: Any) -> Any:
    assert p.proxy.admin is not None and p.proxy.admin.address is not None
    headers = {"Authorization": f"Bearer {read_token(p.proxy.config.store)}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.request(method, f"http://{p.proxy.admin.address}{path}", headers=headers, **kw) as r,
    ):
        text = await r.text()
        assert r.status < 300, (r.status, text)
        if "ndjson" in r.headers.get("Content-Type", ""):
            return [json.loads(line) for line in text.splitlines()]
        return json.loads(text)


async def sqlrs(p: RunningProxy, *args: str) -> tuple[int, str, str]:
    """The CLI as a subprocess, with a config naming the admin address the proxy bound."""
    assert p.proxy.admin is not None and p.proxy.admin.address is not None
    cfg = yaml.safe_load(p.config_path.read_text())
    cfg["admin"] = {"listen": p.proxy.admin.address}
    path = p.config_path.with_name("cli-" + p.config_path.name)
    path.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taidon_proxy.cli", "--config", str(path), "admin", "audit", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def check_chain(lines: list[dict[str, Any]]) -> None:
    """The export checked without the proxy's code, as docs/audit.md says anyone can."""
    prev = "0" * 64
    for line in lines:
        r = dict(line)
        h = r.pop("hash")
        body = json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert r["prev_hash"] == prev, r["seq"]
        assert hashlib.sha256((prev + body).encode()).hexdigest() == h, r["seq"]
        prev = h


async def test_every_churned_connection_has_one_record(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)})
    addresses: list[str] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with gate:
            conn = await asyncpg.connect(p.dsn("shop"), timeout=60)
            try:
                host, port = conn._transport.get_extra_info("sockname")[:2]
                addresses.append(f"{host}:{port}")
                assert await conn.fetchval("select x from t") == 42
            finally:
                await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(CHURN)))
    churn_s = time.monotonic() - started
    # A session's record is written as it ends, which is just after the client's close.
    deadline = time.monotonic() + 10
    while len(await records(p, kind="connection")) < CHURN and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    conns = await records(p, kind="connection")
    assert len(conns) == CHURN, f"{len(conns)} records for {CHURN} connections"
    # One record per connection, by its client address (a port the kernel handed out again
    # later in the run appears once per connection that had it).
    assert Counter(r["fields"]["address"] for r in conns) == Counter(addresses)
    for r in conns:
        f = r["fields"]
        assert r["actor"] == "postgres"
        assert (f["alias"], f["label"], f["database"]) == ("shop", "default", "shop")
        assert f["outcome"] == "closed" and f["sqlstate"] is None
        assert f["bytes_in"] > 0 and f["bytes_out"] > 0
        assert f["instance"] and f["duration"] >= 0 and f["start"] <= r["time"]
    [build] = await records(p, kind="build")
    assert build["actor"] == "proxy"
    assert build["fields"]["alias"] == "shop" and build["fields"]["result"] == "succeeded"
    verified = await p.proxy.audit.verify()
    assert verified.ok and verified.records == CHURN + 1, verified
    print(f"{CHURN} churned connections in {churn_s:.1f}s")


async def test_refused_and_failed_connections_have_one_record_and_no_secret(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    users = {"postgres": make_verifier(PASSWORD, salt=b"audit-salt")}
    p = await make_proxy(
        {"shop": recipe(pg_dir)}, auth={"method": "scram-sha-256", "users": users}, admin=ADMIN
    )
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(p.dsn("shop", user="postgres"), password="wrong-" + PASSWORD)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(p.dsn("shop", user="mallory"), password=PASSWORD)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(p.dsn("nosuchdb"), password=PASSWORD)
    conn = await asyncpg.connect(p.dsn("shop"), password=PASSWORD)
    await conn.close()
    await asyncio.sleep(0.3)
    failures = await records(p, kind="auth_failure")
    assert [(r["actor"], r["fields"]["sqlstate"]) for r in failures] == [
        ("postgres", "28P01"),
        ("mallory", "28P01"),
    ]
    assert all(r["fields"]["address"].startswith("127.0.0.1:") for r in failures)
    conns = await records(p, kind="connection")
    assert [(r["fields"]["database"], r["fields"]["sqlstate"]) for r in conns] == [
        ("nosuchdb", "3D000"),
        ("shop", None),
    ]
    assert conns[0]["fields"]["outcome"] == "refused 3D000"
    # No secret in the records, the export, or anywhere in the files that hold them.
    exported = await api(p, "/v1/audit/export")
    assert len(exported) == 5  # the two failures, two connections and the build
    store = p.proxy.config.store
    raw = (
        b"".join(f.read_bytes() for f in store.glob("meta.sqlite*")) + json.dumps(exported).encode()
    )
    for secret in (PASSWORD, users["postgres"], users["postgres"].split("$")[2]):
        assert secret.encode() not in raw
    assert b"SCRAM-SHA-256$" not in raw  # no verifier at all (a token table's schema names SCRAM)


async def test_admin_actions_and_tampering(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    p = await make_proxy({"shop": recipe(pg_dir)}, admin=ADMIN)
    conn = await asyncpg.connect(p.dsn("shop"))
    await conn.close()
    state = (await api(p, "/v1/aliases"))[0]["state"]
    await api(p, f"/v1/states/{state}/pin", "POST")
    await api(p, f"/v1/states/{state}/pin", "DELETE")
    await api(p, "/v1/aliases/shop/reset", "POST", json={"label": "default"})
    actions = [r for r in await api(p, "/v1/audit?limit=50") if r["actor"] == "admin"]
    what = [(r["kind"], r["fields"].get("state") or r["fields"].get("target")) for r in actions]
    assert what == [
        ("pin", state),
        ("unpin", state),
        ("reset", "shop:default"),
    ]
    assert [r["seq"] for r in await api(p, "/v1/audit?user=admin&kind=reset")] == [
        actions[2]["seq"]
    ]
    conn = await asyncpg.connect(p.dsn("shop"))
    await conn.close()
    await api(p, "/v1/instances/shop:default", "DELETE")
    await api(p, "/v1/reload", "POST")
    await api(p, "/v1/drain", "POST", json={"timeout": 5})  # the proxy stops accepting
    await asyncio.sleep(0.5)
    later = [r for r in await api(p, "/v1/audit?user=admin") if r["seq"] > actions[2]["seq"]]
    assert [r["kind"] for r in later] == ["instance_removal", "reload", "drain"]
    assert later[0]["fields"]["alias"] == "shop" and later[0]["fields"]["status"] == "running"
    assert later[1]["fields"]["result"] == "applied"
    code, out, err = await sqlrs(p, "--kind", "pin", "--json")
    assert code == 0, err
    assert [r["seq"] for r in json.loads(out)] == [actions[0]["seq"]]
    code, out, err = await sqlrs(p, "--user", "admin")
    assert code == 0 and "reset" in out and "target=shop:default" in out, out
    code, out, err = await sqlrs(p, "verify")
    assert code == 0 and "audit log intact" in out, (out, err)
    code, out, _ = await sqlrs(p, "export")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, len(lines) + 1)) and len(lines) >= 5
    check_chain(lines)

    # An edited field: the API and the CLI name its seq; putting it back heals the chain.
    victim = actions[0]["seq"]
    tamper(p, "UPDATE audit SET actor = 'someone-else' WHERE seq = ?", victim)
    result = await api(p, "/v1/audit/verify")
    assert not result["ok"] and result["broken_seq"] == victim and "edited" in result["reason"]
    code, out, err = await sqlrs(p, "verify")
    assert code == 1 and f"audit log broken at seq {victim}" in err, (out, err)
    tamper(p, "UPDATE audit SET actor = 'admin' WHERE seq = ?", victim)
    assert (await api(p, "/v1/audit/verify"))["ok"]
    # A removed record, and a cut tail.
    tamper(p, "DELETE FROM audit WHERE seq = ?", victim + 1)
    result = await api(p, "/v1/audit/verify")
    assert result["broken_seq"] == victim + 1 and "missing" in result["reason"]
    tamper(p, "DELETE FROM audit WHERE seq > ?", victim - 1)
    result = await api(p, "/v1/audit/verify")
    assert result["broken_seq"] == victim and "missing from the end" in result["reason"], result
    code, _, err = await sqlrs(p, "verify")
    assert code == 1 and f"broken at seq {victim}" in err


async def test_the_chain_goes_on_across_a_restart(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    store = str(pg_dir / "audit-store")
    first = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    for _ in range(3):
        conn = await asyncpg.connect(first.dsn("shop"))
        await conn.close()
    await asyncio.sleep(0.2)
    before = (await first.proxy.audit.verify()).last_seq
    # Connections 2 and 3 reuse the first one's server connection: the proxy answers their
    # startup itself, and those bytes count too.
    conns = await records(first, kind="connection")
    assert len(conns) == 3 and all(r["fields"]["bytes_out"] > 100 for r in conns), conns
    await first.proxy.close()  # writes what is pending
    second = await make_proxy({"shop": recipe(pg_dir)}, store=store)
    conn = await asyncpg.connect(second.dsn("shop"))
    await conn.close()
    await asyncio.sleep(0.2)
    result = await second.proxy.audit.verify()
    assert result.ok and result.last_seq == before + 1 and result.head_seq == before + 1
    [last] = await records(second, since=str(time.time() - 60), kind="connection", limit=1)
    assert last["seq"] == before + 1 and last["fields"]["bytes_out"] > 0
