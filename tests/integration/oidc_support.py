"""The real OpenID Provider of the OIDC tests (npm oidc-provider under node, on 127.0.0.1),
a browser played with aiohttp against its own login and consent pages, and forged tokens
signed with its real key (the test made that key and handed it to the provider)."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.conftest import ProxyFactory, RunningProxy

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / ".tools" / "node_modules" / "oidc-provider" / "lib" / "index.js"
SCRIPT = Path(__file__).with_name("oidc_provider.mjs")
CLIENT_ID = "sqlrs"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ACCOUNTS = {
    "ana": {
        "preferred_username": "ana", "email": "ana@example.test", "name": "Ana",
        "groups": ["eng-payments", "everyone"],
    },
    "zed": {"preferred_username": "zed", "email": "zed@example.test", "groups": ["marketing"]},
}  # fmt: skip


def new_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})


@dataclass
class Provider:
    issuer: str
    key: RSAKey
    proc: asyncio.subprocess.Process
    log: list[str]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            async with asyncio.timeout(10):
                await self.proc.wait()

    def sign(self, **claims: Any) -> str:
        """An ID token signed with the provider's own key (defaults: valid for the CLI)."""
        now = int(time.time())
        body = {"iss": self.issuer, "sub": "ana", "aud": CLIENT_ID, "iat": now, "exp": now + 300,
                "preferred_username": "ana", "groups": ["eng-payments"], **claims}  # fmt: skip
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode({"alg": "RS256", "kid": self.key.kid}, body, self.key)


async def start_provider(tmp: Path, port: int = 0) -> Provider:
    key = new_key("op-1")
    settings = {
        "module": str(MODULE),
        "port": port,
        "jwks": {"keys": [key.as_dict(private=True)]},
        "accounts": ACCOUNTS,
        "client": {
            "client_id": CLIENT_ID,
            "application_type": "native",
            "token_endpoint_auth_method": "none",
            "redirect_uris": ["http://127.0.0.1/callback", "http://127.0.0.1/ui/oidc/callback"],
            "grant_types": ["authorization_code", DEVICE_GRANT],
            "response_types": ["code"],
        },
    }
    conf = tmp / f"op-{time.monotonic_ns()}.json"
    conf.write_text(json.dumps(settings))
    proc = await asyncio.create_subprocess_exec(
        "node", str(SCRIPT), str(conf),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    log: list[str] = []
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError("oidc-provider exited at start:\n" + "".join(log))
            log.append(line)
            if line.startswith("listening "):
                break

    async def drain() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            log.append(line.decode())

    asyncio.get_running_loop().create_task(drain())
    return Provider(line.split()[1], key, proc, log)


_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_INPUT = re.compile(r"<input\b([^>]*)>", re.I)


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # 127.0.0.1 too


async def play_browser(
    url: str,
    login: str,
    *,
    done: Callable[[str, str], bool],
    http: aiohttp.ClientSession | None = None,
) -> str:
    """Sign `login` in by following the provider's pages as a browser would: each page's
    first form is submitted (login and password filled in) until `done(url, page)`."""
    async with browser() as own:
        http = http or own
        async with http.get(url) as r:
            page, at = await r.text(), str(r.url)
        for _ in range(8):
            if done(at, page):
                return page
            form = _FORM.search(page)
            assert form is not None, f"no form at {at}:\n{page[:2000]}"
            attrs = dict(_ATTR.findall(form.group(1)))
            fields: dict[str, str] = {}
            for tag in _INPUT.findall(form.group(2)):
                a = dict(_ATTR.findall(tag))
                if "name" in a:
                    fields[a["name"]] = html.unescape(a.get("value", ""))
            if "login" in fields:
                fields.update(login=login, password="anything")
            action = html.unescape(attrs.get("action", at))
            async with http.post(aiohttp.client.URL(at).join(aiohttp.client.URL(action)),
                                 data=fields) as r:  # fmt: skip
                page, at = await r.text(), str(r.url)
        raise AssertionError(f"the sign-in did not reach {done}; last page {at}:\n{page[:2000]}")


@pytest.fixture
async def op(pg_dir: Path) -> AsyncIterator[Provider]:
    provider = await start_provider(pg_dir)
    try:
        yield provider
    finally:
        await provider.stop()
        print("".join(provider.log))  # shown when the test fails


def settings(pg_dir: Path, issuer: str) -> dict[str, Any]:
    f = pg_dir / "shop.sql"
    f.write_text("create table t (x int);\ninsert into t values (7);\n")
    return {
        "databases": {
            "shop": {"prepare": {"kind": "psql", "files": [str(f)]}, "roles": ["ana", "zed", "bob"]}
        },
        "auth": {"method": "scram-sha-256"},
        "admin": {"listen": "127.0.0.1:0"},
        "teams": {
            "payments": {"aliases": ["shop"]},  # filled by the provider's groups only
            "leads": {"members": ["bob"], "aliases": ["shop"], "role": "maintainer"},
        },
        "oidc": {
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "scopes": ["openid", "profile", "email", "groups"],
            "groups": {"eng-payments": "payments"},
            "token_ttl": "2h",
        },
    }


async def oidc_proxy(
    make_proxy: ProxyFactory, pg_dir: Path, op: Provider, store: str
) -> RunningProxy:
    cfg = settings(pg_dir, op.issuer)
    return await make_proxy(cfg.pop("databases"), store=store, **cfg)


def admin_base(p: RunningProxy) -> str:
    assert p.proxy.admin is not None and p.proxy.admin.address is not None
    return f"http://{p.proxy.admin.address}"
