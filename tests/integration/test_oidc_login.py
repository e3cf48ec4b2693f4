"""OIDC login against a real OpenID Provider (npm oidc-provider on 127.0.0.1): `sqlrs login`
(code + PKCE on a loopback redirect, and the device flow) as a subprocess with the test
playing the browser, the proxy token it keeps working for asyncpg and the admin API with the
team's role, forged and broken ID tokens refused, and a provider that is down."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from taidon_proxy.admin.auth import read_token
from tests.conftest import ProxyFactory, RunningProxy
from tests.integration.oidc_support import (
    MODULE,
    Provider,
    admin_base,
    browser,
    new_key,
    oidc_proxy,
    play_browser,
    settings,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MODULE.is_file(), reason="oidc-provider missing: scripts/setup --full"),
]


class Cli:
    """`sqlrs` as a subprocess with its own config dir (where login keeps the token)."""

    def __init__(self, p: RunningProxy, tmp: Path) -> None:
        self.home = tmp / f"cli-{time.monotonic_ns()}"
        self.home.mkdir()
        assert p.proxy.admin is not None
        self.config = self.home / "taidon.yaml"
        self.config.write_text(
            yaml.safe_dump({"admin": {"listen": p.proxy.admin.address}, "store": str(tmp / "x")})
        )
        self.env = {**os.environ, "TAIDON_CONFIG_DIR": str(self.home / "conf")}
        self.env.pop("TAIDON_TOKEN", None)

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "taidon_proxy.cli", "--config", str(self.config), *args,
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def run(self, *args: str) -> tuple[int, str, str]:
        proc = await self.start(*args)
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    @property
    def credentials(self) -> Path:
        return self.home / "conf" / "credentials.json"


async def url_from(proc: asyncio.subprocess.Process, marker: str) -> tuple[str, list[str]]:
    """The first URL the CLI prints on stderr after `marker`."""
    assert proc.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "the CLI ended before it printed a URL: " + "".join(seen)
            seen.append(line)
            for word in line.split():
                if word.startswith("http") and marker in "".join(seen):
                    return word, seen


async def login(cli: Cli, who: str, *flags: str) -> tuple[int, str]:
    proc = await cli.start("login", "--no-browser", "--timeout", "60", *flags)
    if "--device" in flags:
        url, seen = await url_from(proc, "open")
        await play_browser(url, who, done=lambda at, page: "Sign-in Success" in page)
    else:
        url, seen = await url_from(proc, "Open this URL")
        assert "code_challenge_method=S256" in url and "nonce=" in url
        assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
        await play_browser(url, who, done=lambda at, page: "/callback" in at)
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    return proc.returncode or 0, "".join(seen) + err.decode()


async def audit(p: RunningProxy, kind: str) -> list[dict[str, Any]]:
    """Records of this kind since the proxy started (the module's tests share a store)."""
    token = read_token(p.proxy.config.store)
    since = str(p.proxy.started_at - 0.01)  # the previous test may have ended just before
    async with aiohttp.ClientSession() as http, http.get(
        admin_base(p) + "/v1/audit", params={"kind": kind, "since": since},
        headers={"Authorization": f"Bearer {token}"},
    ) as r:  # fmt: skip
        assert r.status == 200
        records: list[dict[str, Any]] = await r.json()
        return records


async def connect_as(p: RunningProxy, user: str, token: str) -> str:
    conn = await asyncpg.connect(p.dsn("shop", user=user), password=token)
    try:
        return str(await conn.fetchval("select current_user || ':' || x from t"))
    finally:
        await conn.close()


async def test_code_flow_login_then_psql_api_roles_audit_and_logout(
    make_proxy: ProxyFactory, pg_dir: Path, op: Provider, store: str
) -> None:
    p = await oidc_proxy(make_proxy, pg_dir, op, store)
    cli = Cli(p, pg_dir)
    code, err = await login(cli, "ana")
    assert code == 0, err
    assert "signed in as ana (teams: payments; role developer)" in err
    assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
    entry = yaml.safe_load(cli.credentials.read_text())[admin_base(p)]
    token = entry["token"]
    assert token.startswith("tdn_") and entry["user"] == "ana"
    assert 7100 < entry["expires"] - time.time() <= 7200  # token_ttl: 2h
    # the proxy token is ana's Postgres password (SCRAM) ...
    assert await connect_as(p, "ana", token) == "ana:7"
    # ... and later sqlrs commands send it: ana's own tokens, her team's alias, her role
    rc, out, err = await cli.run("--json", "token", "list")
    assert rc == 0, err
    assert '"user": "ana"' in out and token not in out
    rc, out, err = await cli.run("ls", "aliases")
    assert rc == 0 and "shop" in out, err
    rc, out, err = await cli.run("admin", "reset", "shop")
    assert rc != 0
    assert 'reset on alias "shop" needs the maintainer role (ana has developer)' in err
    # a login is an audit record: who, how, which teams; never the token
    (rec,) = await audit(p, "login")
    assert rec["actor"] == "ana"
    assert rec["fields"]["flow"] == "code" and rec["fields"]["teams"] == ["payments"]
    assert rec["fields"]["issuer"] == op.issuer and token not in str(rec)
    # logout revokes it: Postgres and the API refuse it from then on
    rc, out, err = await cli.run("logout")
    assert rc == 0 and "revoked" in err, err
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect_as(p, "ana", token)
    assert admin_base(p) not in cli.credentials.read_text()


async def test_device_flow_and_a_user_in_no_mapped_group(
    make_proxy: ProxyFactory, pg_dir: Path, op: Provider, store: str
) -> None:
    p = await oidc_proxy(make_proxy, pg_dir, op, store)
    cli = Cli(p, pg_dir)
    code, err = await login(cli, "ana", "--device")
    assert code == 0, err
    assert "enter the code:" in err and "signed in as ana" in err
    token = yaml.safe_load(cli.credentials.read_text())[admin_base(p)]["token"]
    assert await connect_as(p, "ana", token) == "ana:7"
    (rec,) = await audit(p, "login")
    assert rec["fields"]["flow"] == "device"
    # zed's groups map to no team: no token, the same words as for any user in no team
    other = Cli(p, pg_dir)
    code, err = await login(other, "zed")
    assert code != 0
    assert 'permission denied: user "zed" is in no team' in err
    assert not other.credentials.exists()
    (failure,) = await audit(p, "login_failure")
    assert failure["actor"] == "anonymous" and "zed" in failure["fields"]["reason"]


async def finish(p: RunningProxy, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
        admin_base(p) + "/v1/login/oidc", json=body
    ) as r:  # fmt: skip
        return r.status, await r.json()


Sign = Callable[[str], str]  # the sign-in's nonce -> the ID token to send


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def exchange(p: RunningProxy, sign: Sign, body: dict[str, Any] | None = None
                   ) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """Start a sign-in and exchange the ID token `sign` makes with its nonce; `body` gets the
    request sent."""
    async with aiohttp.ClientSession() as http, http.post(
        admin_base(p) + "/v1/login/oidc/start"
    ) as r:  # fmt: skip
        assert r.status == 200, await r.text()
        start = await r.json()
    sent = {"login_id": start["login_id"], "id_token": sign(start["nonce"])}
    if body is not None:
        body.update(sent)
    return await finish(p, sent)


async def test_forged_expired_and_foreign_id_tokens_are_refused(
    make_proxy: ProxyFactory, pg_dir: Path, op: Provider, store: str
) -> None:
    p = await oidc_proxy(make_proxy, pg_dir, op, store)
    now = int(time.time())
    stranger = Provider(op.issuer, new_key("op-1"), op.proc, [])  # same kid, another key

    def tampered(nonce: str) -> str:
        head, body, sig = op.sign(nonce=nonce).split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["groups"] = ["eng-payments", "admins"]
        return f"{head}.{b64(json.dumps(claims).encode())}.{sig}"

    cases: dict[str, tuple[Sign, str]] = {
        "wrong audience": (lambda n: op.sign(nonce=n, aud="other-app"), "its audience is not"),
        "foreign issuer": (lambda n: op.sign(nonce=n, iss="http://127.0.0.1:1"),
                           "its issuer is not"),
        "foreign key": (lambda n: stranger.sign(nonce=n), "signature does not match"),
        "expired": (lambda n: op.sign(nonce=n, iat=now - 900, exp=now - 120), "expired"),
        "issued in the future": (lambda n: op.sign(nonce=n, iat=now + 600, exp=now + 900),
                                 "issued in the future"),
        "tampered": (tampered, "signature does not match"),
        "no nonce": (lambda n: op.sign(), "it has no nonce claim"),
        "another nonce": (lambda n: op.sign(nonce="not-the-one"), "nonce is not this sign-in"),
        "no user name": (lambda n: op.sign(nonce=n, preferred_username=None),
                         "no preferred_username claim"),
        "unusable user name": (lambda n: op.sign(nonce=n, preferred_username="ana; drop"),
                               "not usable as a user name"),
        "malformed": (lambda n: "not-a-jwt", "not a signed JWT"),
        "no signature": (lambda n: op.sign(nonce=n).rsplit(".", 1)[0] + ".", "signature does not"),
        "alg none": (lambda n: b64(b'{"alg":"none"}') + "." + op.sign(nonce=n).split(".")[1] + ".",
                     "not a valid JWT of the issuer (unsupported_algorithm)"),
    }  # fmt: skip
    for why, (sign, reason) in cases.items():
        status, answer = await exchange(p, sign)
        assert status == 401, (why, answer)
        assert answer["error"]["code"] == "unauthorized", why
        message = answer["error"]["message"]
        assert message.startswith("ID token refused: ") and reason in message, (why, message)
    # a sign-in is single-use: a second exchange of the same login and token is refused
    sent: dict[str, Any] = {}
    status, made = await exchange(p, lambda n: op.sign(nonce=n), sent)
    assert status == 201, made
    assert made["user"] == "ana" and made["teams"] == ["payments"]
    status, again = await finish(p, sent)
    assert status == 401 and "unknown or expired" in again["error"]["message"]
    # clock skew: a token that expired 30 s ago is inside the 60 s leeway (120 s was not)
    status, skewed = await exchange(p, lambda n: op.sign(nonce=n, iat=now - 600, exp=now - 30))
    assert status == 201, skewed
    assert await connect_as(p, "ana", made["token"]) == "ana:7"
    failures = await audit(p, "login_failure")
    assert len(failures) == len(cases) + 1
    assert all(f["actor"] == "anonymous" for f in failures)


async def test_provider_down_login_fails_clearly_and_tokens_keep_working(
    make_proxy: ProxyFactory, pg_dir: Path, op: Provider, store: str
) -> None:
    p = await oidc_proxy(make_proxy, pg_dir, op, store)
    status, made = await exchange(p, lambda n: op.sign(nonce=n))
    assert status == 201, made
    await op.stop()
    cli = Cli(p, pg_dir)
    rc, _, err = await cli.run("login", "--no-browser", "--timeout", "5")
    assert rc != 0
    assert f"cannot reach the OIDC provider {op.issuer}" in err, err
    assert "tokens you already hold keep working" in err
    # what was issued keeps working: Postgres and the API
    assert await connect_as(p, "ana", made["token"]) == "ana:7"
    async with aiohttp.ClientSession() as http, http.get(
        admin_base(p) + "/v1/tokens", headers={"Authorization": f"Bearer {made['token']}"}
    ) as r:  # fmt: skip
        assert r.status == 200
    # a proxy that never reached the provider answers 503 with the reason
    cfg = settings(pg_dir, op.issuer)
    fresh = await make_proxy(cfg.pop("databases"), store=str(pg_dir / "fresh"), **cfg)
    async with aiohttp.ClientSession() as http, http.post(
        admin_base(fresh) + "/v1/login/oidc/start"
    ) as r:  # fmt: skip
        answer = await r.json()
        assert r.status == 503, answer
    assert answer["error"]["code"] == "unavailable"
    assert f"the OIDC provider {op.issuer} is not reachable" in answer["error"]["message"]


async def test_dashboard_sign_in_with_the_provider(
    make_proxy: ProxyFactory, pg_dir: Path, op: Provider, store: str
) -> None:
    p = await oidc_proxy(make_proxy, pg_dir, op, store)
    base = admin_base(p)
    async with browser() as http:
        async with http.get(base + "/ui/signin") as r:
            assert f"Sign in with {op.issuer}" in await r.text()
        page = await play_browser(
            base + "/ui/oidc/login", "ana", http=http,
            done=lambda at, page: "/ui/oidc/callback" in at,
        )  # fmt: skip
        assert "Signed in" in page, page[-1200:]
        # the session cookie carries ana's principal: her team's alias, her role
        async with http.get(base + "/v1/aliases") as r:
            assert r.status == 200
            assert [a["alias"] for a in await r.json()] == ["shop"]
        async with http.get(base + "/") as r:
            assert r.status == 200 and "/ui/signin" not in str(r.url)
        async with http.post(base + "/v1/drain", headers={"Origin": base}) as r:
            assert r.status == 403  # no CSRF header: the cookie alone changes nothing
    (rec,) = await audit(p, "login")
    assert rec["actor"] == "ana" and rec["fields"]["flow"] == "dashboard"
    # zed's groups map to no team: the sign-in page says so, no session
    async with browser() as http:
        page = await play_browser(
            base + "/ui/oidc/login", "zed", http=http,
            done=lambda at, page: "/ui/oidc/callback" in at,
        )  # fmt: skip
        assert 'user "zed" is in no team' in html.unescape(page)
        async with http.get(base + "/v1/aliases") as r:
            assert r.status == 401
        # a callback this browser did not start is refused before anything is exchanged
        async with http.get(base + "/ui/oidc/callback?state=forged&code=x") as r:
            assert r.status == 400
            assert "did not start in this browser" in await r.text()
