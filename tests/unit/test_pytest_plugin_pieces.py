"""The pytest plugin's pure pieces: addresses, DSNs, labels, the alias check."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.pytest_plugin.endpoint import (
    Endpoint,
    TaidonDatabase,
    TaidonPluginError,
    split_address,
)
from taidon_proxy.pytest_plugin.options import Settings
from taidon_proxy.pytest_plugin.session import TaidonSession

pytestmark = pytest.mark.unit


def test_split_address_tcp_v6_and_unix() -> None:
    assert split_address("127.0.0.1:55432") == ("127.0.0.1", 55432)
    assert split_address("[::1]:5") == ("::1", 5)
    assert split_address("/run/taidon/.s.PGSQL.55432") == ("/run/taidon", 55432)


def test_dsn_quotes_the_colon_and_handles_unix_sockets() -> None:
    db = TaidonDatabase("shop", "pytest-gw1-abc123-7", "127.0.0.1", 55432, "app")
    assert db.name == "shop:pytest-gw1-abc123-7"
    assert db.dsn == "postgresql://app@127.0.0.1:55432/shop%3Apytest-gw1-abc123-7"
    unix = TaidonDatabase("shop", "l", "/run/t", 5, "postgres")
    assert unix.dsn == "postgresql://postgres@/shop%3Al?host=%2Frun%2Ft&port=5"
    assert db.asyncpg_kwargs()["database"] == db.psycopg_kwargs()["dbname"] == db.name


def session(
    monkeypatch: pytest.MonkeyPatch, worker: str | None, alias: str | None
) -> TaidonSession:
    if worker is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    settings = Settings(None, Path("taidon.yaml"), False, alias, "function", "postgres", None)
    endpoint = Endpoint("http://127.0.0.1:1", None, "127.0.0.1", 2, ("shop", "crm"))
    return TaidonSession(settings, 2, {"endpoint": endpoint.to_json()})


def test_labels_name_the_worker_and_the_run_and_never_repeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = session(monkeypatch, "gw1", "shop")
    labels = [s.new_database().label for _ in range(3)]
    assert len(set(labels)) == 3
    assert all(label.startswith(f"pytest-gw1-{s.run}-") for label in labels)
    assert all(len(label) <= 63 for label in labels)
    other = session(monkeypatch, "gw1", "shop")
    assert other.new_database().label != labels[0]  # another run, another id
    assert session(monkeypatch, None, "shop").new_database().label.startswith("pytest-main-")


def test_an_unknown_or_unnamed_alias_is_refused_with_the_known_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(TaidonPluginError, match=r'unknown alias "nope" .*serves: shop, crm\)'):
        session(monkeypatch, None, "nope").new_database()
    with pytest.raises(TaidonPluginError, match=r"serves 2 aliases \(shop, crm\); name one"):
        session(monkeypatch, None, None).new_database()


def test_a_controller_error_is_every_workers_error(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(None, Path("taidon.yaml"), False, "shop", "function", "postgres", None)
    s = TaidonSession(settings, 2, {"error": "taidon: config x does not exist"})
    for _ in range(2):
        with pytest.raises(TaidonPluginError, match="config x does not exist"):
            s.new_database()
