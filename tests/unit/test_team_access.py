"""The team server's config, permission table, principals and quota ledger (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config import Config
from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import ConfigError, UnknownDatabase
from taidon_proxy.services.access import (
    ADMIN,
    MINIMUM_ROLE,
    Forbidden,
    Permission,
    allowed,
    principal_for,
    require,
)
from taidon_proxy.services.quotas import QuotaExceeded, QuotaLedger

pytestmark = pytest.mark.unit

SRC = Path("/etc/taidon/team.yaml")
SQL = "prepare: {kind: psql, files: [a.sql]}"
BASE = f"""\
auth:
  method: scram-sha-256
databases:
  shop: {{{SQL}}}
  billing: {{{SQL}}}
  hr: {{{SQL}}}
"""
TEAMS = (
    BASE
    + """\
teams:
  payments:
    members: [ana, ci-payments]
    aliases: [shop, billing]
    role: developer
    quotas: {instances: 3}
  payments-leads:
    members: [bob]
    aliases: [shop]
    role: maintainer
  ops:
    members: [olga]
    role: admin
  auditors:
    members: [vic]
    aliases: [hr]
    role: viewer
users:
  ana:
    quotas: {instances: 2}
"""
)


def cfg_of(text: str) -> Config:
    return parse_config(text, source=SRC, check=False)


def error_of(text: str, tmp_path: Path) -> tuple[str, Path]:
    """The load error of a config whose SQL files exist (so only the team checks complain)."""
    (tmp_path / "a.sql").write_text("select 1;\n")
    src = tmp_path / "team.yaml"
    with pytest.raises(ConfigError) as e:
        parse_config(text, source=src)
    return e.value.message, src


def test_team_config_loads() -> None:
    cfg = cfg_of(TEAMS)
    assert cfg.teams["payments"].members == ["ana", "ci-payments"]
    assert cfg.teams["payments"].quotas.instances == 3
    assert cfg.users["ana"].quotas.instances == 2


def test_team_config_passes_its_checks(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("select 1;\n")
    assert parse_config(TEAMS, source=tmp_path / "team.yaml").teams["ops"].role == "admin"


def test_no_teams_is_the_single_user_config() -> None:
    cfg = cfg_of("databases: {}\n")
    assert cfg.teams == {} and cfg.users == {}
    # scram without users is still refused when there are no teams (tokens need teams)
    with pytest.raises(ConfigError, match=r"needs at least one entry in auth\.users"):
        cfg_of("auth: {method: scram-sha-256}\n")


@pytest.mark.parametrize(
    ("extra", "where", "key", "what"),
    [
        (
            "teams:\n  t:\n    members: [a]\n    role: owner\n",
            ":10:", "teams.t.role",
            "'owner' is not allowed; use one of: viewer, developer, maintainer, admin",
        ),
        (
            "teams:\n  t:\n    members: [a]\n    aliases: [shop, nope]\n",
            ":10:", "teams.t.aliases.1", "no alias 'nope' in databases (aliases: billing, hr, shop",
        ),
        (
            "teams:\n  t:\n    members: [a]\nusers:\n  zed:\n    quotas: {instances: 1}\n",
            ":11:", "users.zed", "is a member of no team",
        ),
        (
            "teams:\n  t:\n    members: [a]\n    quotas: {instances: -1}\n",
            ":10:", "teams.t.quotas.instances", "must be at least 0, not -1",
        ),
        (
            "teams:\n  t:\n    members: [a]\n    quotas: {gpus: 2}\n",
            ":10:", "teams.t.quotas.gpus",
            "unknown setting (allowed here: instances, builds, queued, lifetime, disk, idle_ttl)",
        ),
        (
            "teams:\n  t:\n    members: [a]\n    quotas: {disk: lots}\n",
            ":10:", "teams.t.quotas.disk", "not a size: 'lots'",
        ),
        ("teams:\n  t:\n    members: ['a b']\n", ":9:", "teams.t.members", "not a valid user"),
    ],
)  # fmt: skip
def test_team_config_errors_name_file_line_and_key(
    extra: str, where: str, key: str, what: str, tmp_path: Path
) -> None:
    msg, src = error_of(BASE + extra, tmp_path)
    assert msg.startswith(f"{src}{where} {key}: "), msg
    assert what in msg, msg


def test_teams_with_trust_are_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("select 1;\n")
    text = f"databases:\n  shop: {{{SQL}}}\nteams:\n  t:\n    members: [a]\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text, source=tmp_path / "t.yaml")
    assert "auth.method: teams need scram-sha-256 or password" in e.value.message


def test_permission_table_roles_include_the_ones_below() -> None:
    cfg = cfg_of(TEAMS)
    vic, ana, bob, olga = (principal_for(cfg, u) for u in ("vic", "ana", "bob", "olga"))
    assert vic and ana and bob and olga
    assert allowed(vic, Permission.SEE, "hr") and not allowed(vic, Permission.CONNECT, "hr")
    assert allowed(ana, Permission.CONNECT, "shop") and allowed(ana, Permission.BUILD, "billing")
    assert not allowed(ana, Permission.RESET, "shop")
    assert allowed(bob, Permission.RESET, "shop") and allowed(bob, Permission.PIN, "shop")
    assert not allowed(bob, Permission.ADMINISTER)
    for p in Permission:
        assert allowed(olga, p, "hr") and allowed(ADMIN, p, "anything")
    assert set(MINIMUM_ROLE) == set(Permission)  # every permission has its row


def test_principal_names_user_teams_and_highest_role() -> None:
    cfg = cfg_of(TEAMS.replace("members: [bob]", "members: [bob, ana]"))
    ana = principal_for(cfg, "ana")
    assert ana is not None
    assert (ana.user, ana.teams, ana.role) == ("ana", ("payments", "payments-leads"), "maintainer")
    assert ana.role_for("shop") == "maintainer" and ana.role_for("billing") == "developer"
    assert ana.role_for("hr") is None
    assert principal_for(cfg, "nobody") is None


def test_refusals_name_the_permission_and_hide_unseen_aliases() -> None:
    cfg = cfg_of(TEAMS)
    ana = principal_for(cfg, "ana")
    assert ana is not None
    with pytest.raises(Forbidden) as e:
        require(cfg, ana, Permission.RESET, "shop")
    assert e.value.sqlstate == "42501"
    assert str(e.value) == (
        'permission denied: reset on alias "shop" needs the maintainer role (ana has developer)'
    )
    with pytest.raises(UnknownDatabase) as unseen:
        require(cfg, ana, Permission.CONNECT, "hr")
    with pytest.raises(UnknownDatabase) as unknown:
        require(cfg, ana, Permission.CONNECT, "nope")
    assert str(unseen.value) == 'database "hr" does not exist'
    assert unseen.value.detail == unknown.value.detail == "known databases: billing, shop"
    with pytest.raises(Forbidden, match="administer needs the admin role"):
        require(cfg, ana, Permission.ADMINISTER)


def test_quota_ledger_counts_instances_not_sessions() -> None:
    cfg = cfg_of(TEAMS)
    ledger = QuotaLedger(lambda: cfg)
    ana, ci = principal_for(cfg, "ana"), principal_for(cfg, "ci-payments")
    assert ana and ci
    a1 = ledger.reserve(ana, "shop", "shop:default")
    a2 = ledger.reserve(ana, "shop", "shop:default")  # the same shared instance: no new slot
    a3 = ledger.reserve(ana, "shop", "shop:x")
    with pytest.raises(QuotaExceeded) as e:
        ledger.reserve(ana, "shop", "shop:y")
    assert e.value.sqlstate == "53300"
    assert str(e.value) == 'quota exceeded: instances for user "ana": 2 in use, limit 2'
    ledger.reserve(ci, "billing", "billing:default")  # the team's third
    with pytest.raises(QuotaExceeded, match='instances for team "payments": 3 in use, limit 3'):
        ledger.reserve(ci, "billing", "billing:z")
    report = ledger.report(ana)
    assert set(report["users"]) == {"ana"}
    assert report["users"]["ana"]["instances"] == {"used": 2, "limit": 2}
    assert report["users"]["ana"]["refused"] == 1
    assert report["teams"]["payments"]["instances"] == {"used": 3, "limit": 3}
    assert report["teams"]["payments"]["refused"] == 1
    assert report["teams"]["payments"]["builds"] == {"used": 0, "limit": None}  # running now
    assert report["teams"]["payments"]["queued"] == {"used": 0, "limit": None}  # and waiting
    for slot in (a1, a2, a3):
        ledger.release(slot)
    assert ledger.report(ADMIN)["users"]["ana"]["instances"]["used"] == 0
    assert ledger.report(ADMIN)["teams"]["payments"]["instances"]["used"] == 1


def test_lifetime_holds_an_instance_to_its_most_lenient_session() -> None:
    from types import SimpleNamespace

    from taidon_proxy.services.lifetime import expired
    from taidon_proxy.services.team import Admission

    cfg = cfg_of(
        TEAMS.replace("quotas: {instances: 3}", "quotas: {instances: 3, lifetime: 1h}").replace(
            "quotas: {instances: 2}", "quotas: {lifetime: 10m}"
        )
    )
    ledger = QuotaLedger(lambda: cfg)
    ana, ci, bob = (principal_for(cfg, u) for u in ("ana", "ci-payments", "bob"))
    assert ana and ci and bob

    def admission(p: object, key: str) -> Admission:
        return Admission(p, ledger.reserve(p, "shop", key))  # type: ignore[arg-type]

    one = SimpleNamespace(id="i-1", created=1000.0, stopping=False)
    shared = SimpleNamespace(id="i-2", created=1000.0, stopping=False)
    mixed = SimpleNamespace(id="i-3", created=0.0, stopping=False)
    holders = [
        (one, admission(ana, "a")),  # ana's own: 10 min (her limit is under the team's 1 h)
        (shared, admission(ana, "s")),
        (shared, admission(ci, "s")),  # ci-payments: the team's 1 h, the more lenient
        (mixed, admission(ana, "m")),
        (mixed, admission(bob, "m")),  # bob's team has no lifetime: never ended
    ]
    assert expired(cfg, holders, 1000.0 + 599) == []
    assert [(i.id, s, w) for i, s, w in expired(cfg, holders, 1000.0 + 600)] == [
        ("i-1", 600.0, 'user "ana"')
    ]
    assert [(i.id, w) for i, _, w in expired(cfg, holders, 1000.0 + 3600)] == [
        ("i-1", 'user "ana"'),
        ("i-2", 'team "payments"'),
    ]
