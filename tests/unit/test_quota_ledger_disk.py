"""The disk and idle TTL quotas' decisions, without servers: the ledger charges what each
instance wrote to whoever last used it, refuses new instances past a limit (53100), and the
idle ceiling is the smaller of a user's and her team's."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config_load import parse_config
from taidon_proxy.services.access import principal_for
from taidon_proxy.services.disk import allocated_bytes, has_disk_quota
from taidon_proxy.services.quotas import DiskQuotaExceeded, QuotaLedger, seconds_limit

pytestmark = pytest.mark.unit

CONFIG = """\
auth: {method: scram-sha-256}
databases:
  shop: {prepare: {kind: psql, files: [a.sql]}}
teams:
  payments: {members: [ana, bob], aliases: [shop], quotas: {disk: 10MiB, idle_ttl: 5m}}
  ops: {members: [cy], aliases: [shop]}
users:
  ana: {quotas: {idle_ttl: 30s, disk: 1GiB}}
"""
MB = 2**20


def test_disk_use_refuses_new_instances_not_existing_ones() -> None:
    cfg = parse_config(CONFIG, source=Path("/etc/taidon/t.yaml"), check=False)
    assert has_disk_quota(cfg)
    ledger = QuotaLedger(lambda: cfg)
    ana, bob, cy = (principal_for(cfg, u) for u in ("ana", "bob", "cy"))
    assert ana and bob and cy
    slot = ledger.reserve(ana, "shop", "shop:ana")
    ledger.attach(slot, "i-1")
    ledger.measured({"i-1": 11 * MB}, {"i-1": "shop:ana", "i-2": "shop:gone"}, at=1.0)
    assert ledger.disk_used(team="payments") == ledger.disk_used(user="ana") == 11 * MB
    assert ledger.disk_used(user="bob") == 0
    with pytest.raises(DiskQuotaExceeded) as e:
        ledger.reserve(bob, "shop", "shop:bob")
    assert e.value.sqlstate == "53100" and e.value.quota == "disk"
    assert str(e.value) == (
        'quota exceeded: disk written by the instances of team "payments": 11.0 MiB in use,'
        " limit 10.0 MiB"
    )
    ledger.reserve(bob, "shop", "shop:ana")  # an instance that exists: no new one
    ledger.reserve(cy, "shop", "shop:cy")  # another team
    report = ledger.report(ana)
    assert report["teams"]["payments"]["disk"] == {"used": 11 * MB, "limit": 10 * MB}
    assert report["teams"]["payments"]["refused"] == 1
    assert report["users"]["ana"]["disk"] == {"used": 11 * MB, "limit": 2**30}
    assert report["disk_measured_at"] == 1.0
    # The instance is gone at the next measurement: its use and its owner are forgotten.
    ledger.measured({}, {}, at=2.0)
    assert ledger.disk_used(team="payments") == 0
    ledger.reserve(bob, "shop", "shop:bob")


def test_idle_ceiling_is_the_smaller_of_user_and_team() -> None:
    cfg = parse_config(CONFIG, source=Path("/etc/taidon/t.yaml"), check=False)
    ledger = QuotaLedger(lambda: cfg)
    ana, bob, cy = (principal_for(cfg, u) for u in ("ana", "bob", "cy"))
    assert ana and bob and cy
    slots = [ledger.reserve(p, "shop", f"shop:{p.user}") for p in (ana, bob, cy)]
    assert seconds_limit(cfg, slots[0], "idle_ttl") == (30.0, 'user "ana"')
    assert seconds_limit(cfg, slots[1], "idle_ttl") == (300.0, 'team "payments"')
    assert seconds_limit(cfg, slots[2], "idle_ttl") is None


def test_allocated_bytes_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "f"
    data.write_bytes(b"x" * 100_000)
    one = allocated_bytes(tmp_path)
    (tmp_path / "link").hardlink_to(data)
    assert allocated_bytes(tmp_path) == one >= 100_000
    assert allocated_bytes(tmp_path / "missing") == 0
