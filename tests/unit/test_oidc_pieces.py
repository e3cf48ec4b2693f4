"""OIDC login without sockets: the `oidc:` config and its errors (file:line), groups to teams,
principals from granted teams, the ID-token checks at the edges of the clock-skew leeway,
and the CLI's credentials file. (The real provider runs in tests/integration.)"""

from __future__ import annotations

import asyncio
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from taidon_proxy.admin.openapi import document
from taidon_proxy.cli import credentials
from taidon_proxy.config import Config
from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.services.access import principal_for
from taidon_proxy.services.errors import Refusal
from taidon_proxy.services.oidc import OidcLogin, _Pending

pytestmark = pytest.mark.unit

ISSUER = "https://id.example.test"
BASE = f"""\
auth: {{method: scram-sha-256}}
databases:
  shop: {{prepare: {{kind: psql, files: [a.sql]}}}}
teams:
  payments: {{aliases: [shop]}}
  leads: {{members: [bob], aliases: [shop], role: maintainer}}
oidc:
  issuer: {ISSUER}
  client_id: sqlrs
  groups: {{eng-payments: payments, eng-leads: leads}}
"""


def load(text: str, tmp_path: Path) -> Config:
    (tmp_path / "a.sql").write_text("select 1;\n")
    return parse_config(text, source=tmp_path / "t.yaml")


def test_oidc_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load(BASE, tmp_path)
    assert cfg.oidc is not None
    assert cfg.oidc.groups_claim == "groups" and cfg.oidc.token_ttl == 12 * 3600
    assert cfg.oidc.username_claim == "preferred_username" and cfg.oidc.leeway == 60
    assert cfg.teams["payments"].members == []


@pytest.mark.parametrize(
    ("old", "new", "where", "what"),
    [
        ("eng-leads: leads}", "eng-leads: laeds}", ":10: oidc.groups.eng-leads",
         "no team 'laeds' in teams (teams: leads, payments)"),
        (f"issuer: {ISSUER}", "issuer: id.example.test", ":8: oidc.issuer", "not an issuer URL"),
        ("client_id: sqlrs", "client_id: sqlrs\n  scopes: [profile]", ":10: oidc.scopes",
         "must include openid"),
        ("client_id: sqlrs", "client_id: sqlrs\n  token_ttl: soon", ":10: oidc.token_ttl",
         "soon"),
        ("groups: {eng-payments: payments, eng-leads: leads}", "groups: {eng-leads: leads}",
         ":5: teams.payments.members", "no members, and no oidc.groups maps to it"),
    ],
)  # fmt: skip
def test_oidc_config_errors_name_file_line_and_key(
    old: str, new: str, where: str, what: str, tmp_path: Path
) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as e:
        load(BASE.replace(old, new), tmp_path)
    assert f"t.yaml{where}: " in e.value.message and what in e.value.message, e.value.message


def test_oidc_needs_teams(tmp_path: Path) -> None:
    text = (
        f"auth: {{method: scram-sha-256, users: {{}}}}\noidc: {{issuer: {ISSUER}, client_id: x}}\n"
    )
    with pytest.raises(ConfigError, match="oidc: needs teams"):
        load(text.replace("users: {}", "users: {a: 'SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5'}"),
             tmp_path)  # fmt: skip


def test_groups_map_to_teams_and_granted_teams_make_the_principal(tmp_path: Path) -> None:
    cfg = load(BASE, tmp_path)
    assert cfg.oidc is not None
    teams_for = OidcLogin.teams_for
    assert teams_for(cfg.oidc, ["eng-payments", "everyone", 7]) == ("payments",)
    assert teams_for(cfg.oidc, "eng-leads") == ("leads",)
    assert teams_for(cfg.oidc, {"eng-leads": True}) == ()
    assert teams_for(cfg.oidc, None) == ()
    ana = principal_for(cfg, "ana", ("payments",))
    assert ana is not None and ana.teams == ("payments",) and ana.role_for("shop") == "developer"
    assert principal_for(cfg, "ana") is None
    assert principal_for(cfg, "ana", ("gone",)) is None  # a team the config no longer has
    bob = principal_for(cfg, "bob", ("payments",))  # config membership and granted teams
    assert bob is not None and bob.teams == ("leads", "payments") and bob.role == "maintainer"


class Documents:
    """The issuer's discovery document and JWKS as in-memory values (no provider here)."""

    def __init__(self, key: RSAKey) -> None:
        self.docs: dict[str, dict[str, Any]] = {
            f"{ISSUER}/.well-known/openid-configuration": {
                "issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/auth",
                "token_endpoint": f"{ISSUER}/token", "jwks_uri": f"{ISSUER}/jwks",
                "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"],
            },
            f"{ISSUER}/jwks": {"keys": [key.as_dict(private=False)]},
        }  # fmt: skip

    async def __call__(self, url: str) -> dict[str, Any]:
        return self.docs[url]


def login_service(cfg: Config, key: RSAKey, now: float) -> OidcLogin:
    return OidcLogin(
        lambda: cfg, team=_TeamOn(), audit=None, fetch=Documents(key), clock=lambda: now
    )  # type: ignore[arg-type]  # verify() needs neither the team nor the audit


class _TeamOn:
    enabled = True


@pytest.mark.parametrize(
    ("exp", "iat", "ok"),
    [
        (-59, -300, True),  # expired 59 s ago: inside the 60 s leeway
        (-60, -300, False),  # expired exactly the leeway ago
        (+300, +60, True),  # issued 60 s "in the future": the provider's clock runs ahead
        (+300, +61, False),
    ],
)
def test_expiry_and_issue_time_at_the_edges_of_the_leeway(
    exp: int, iat: int, ok: bool, tmp_path: Path
) -> None:
    cfg = load(BASE, tmp_path)
    assert cfg.oidc is not None
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    now = 1_800_000_000
    svc = login_service(cfg, key, now)
    claims = {"iss": ISSUER, "sub": "s1", "aud": "sqlrs", "exp": now + exp, "iat": now + iat,
              "nonce": "n1", "preferred_username": "ana"}  # fmt: skip
    token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
    pending = _Pending("n1", now - 10, now + 600)
    run = svc.verify(cfg.oidc, token, pending)
    if ok:
        assert asyncio.run(run)["sub"] == "s1"
    else:
        with pytest.raises(Refusal) as e:
            asyncio.run(run)
        assert e.value.code == "unauthorized"


def test_an_hmac_signed_token_is_refused(tmp_path: Path) -> None:
    """Algorithm confusion: the discovery document lists HS256 (and none), but only
    asymmetric signatures from the issuer's keys count."""
    cfg = load(BASE, tmp_path)
    assert cfg.oidc is not None
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    now = time.time()
    svc = login_service(cfg, key, now)
    secret = OctKey.import_key(key.as_dict()["n"])
    claims = {"iss": ISSUER, "sub": "s", "aud": "sqlrs", "exp": int(now) + 60, "iat": int(now),
              "nonce": "n"}  # fmt: skip
    token = jwt.encode({"alg": "HS256", "kid": "k1"}, claims, secret)
    with pytest.raises(Refusal, match="unsupported_algorithm"):
        asyncio.run(svc.verify(cfg.oidc, token, _Pending("n", now, now + 60)))


def test_credentials_file_is_private_and_expired_logins_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAIDON_CONFIG_DIR", str(tmp_path / "conf"))
    base = "http://127.0.0.1:1"
    credentials.put(base, {"token": "tdn_x", "id": "x", "expires": time.time() + 60})
    assert stat.S_IMODE(credentials.path().stat().st_mode) == 0o600
    entry = credentials.get(base)
    assert entry is not None and entry["token"] == "tdn_x"
    credentials.put(base, {"token": "tdn_x", "id": "x", "expires": time.time() - 1})
    assert credentials.get(base) is None
    assert credentials.drop(base) is not None and credentials.drop(base) is None


def test_openapi_names_the_login_routes_public() -> None:
    paths = document()["paths"]
    for path in ("/v1/login/oidc/start", "/v1/login/oidc"):
        assert paths[path]["post"]["security"] == []
    assert "503" in paths["/v1/login/oidc"]["post"]["responses"]


class _Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, **fields: Any) -> None:
        self.records.append((kind, fields))


def test_a_dashboard_state_is_no_cli_login_and_each_is_single_use(tmp_path: Path) -> None:
    cfg = load(BASE, tmp_path)
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    audit = _Recorder()
    svc = OidcLogin(lambda: cfg, _TeamOn(), audit, Documents(key))  # type: ignore[arg-type]
    url, state = asyncio.run(svc.web_start("http://127.0.0.1:9/ui/oidc/callback"))
    assert url.startswith(f"{ISSUER}/auth?") and "code_challenge_method=S256" in url
    assert f"state={state}" in url and "nonce=" in url
    with pytest.raises(Refusal, match="unknown or expired"):
        asyncio.run(svc.finish(state, "a.b.c"))
    with pytest.raises(Refusal, match="unknown or expired"):  # popped by the first try
        asyncio.run(svc.web_finish(state, "code"))
    assert [k for k, _ in audit.records] == ["login_failure", "login_failure"]
    assert all(f["actor"] == "anonymous" for _, f in audit.records)
