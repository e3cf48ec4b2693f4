"""The `metadata` section, which backend it opens, and how its secrets and errors are shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.admin.errors import from_domain
from taidon_proxy.config_diff import diff
from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.store.metadata import Metadata
from taidon_proxy.store.metadata_api import MetadataUnavailable
from taidon_proxy.store.metadata_choice import default_node, make_metadata
from taidon_proxy.store.metadata_pg import PgMetadata, describe_dsn
from taidon_proxy.store.pg_migrate import migrations

pytestmark = pytest.mark.unit

DSN = "postgresql://taidon:pa55-word-x@meta-db:5432/taidon"


def config(tmp_path: Path, text: str) -> object:
    path = tmp_path / "taidon.yaml"
    return parse_config(f"store: {tmp_path / 'store'}\n{text}", source=path)


def test_default_is_the_store_file(tmp_path: Path) -> None:
    cfg = config(tmp_path, "")
    meta = make_metadata(cfg.metadata, cfg.store)  # type: ignore[attr-defined]
    assert isinstance(meta, Metadata) and meta.kind == "sqlite" and not meta.is_open


def test_postgres_dsn_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAIDON_METADATA_DSN", DSN)
    cfg = config(tmp_path, "metadata: {kind: postgres, dsn: '${TAIDON_METADATA_DSN}'}\n")
    meta = make_metadata(cfg.metadata, cfg.store)  # type: ignore[attr-defined]
    assert isinstance(meta, PgMetadata) and meta.dsn == DSN and not meta.is_open
    assert meta.node == default_node(tmp_path / "store")
    assert meta.where == "taidon@meta-db:5432/taidon"
    named = config(tmp_path, f"metadata: {{kind: postgres, dsn: '{DSN}', node: gw-0}}\n")
    assert make_metadata(named.metadata, named.store).node == "gw-0"  # type: ignore[attr-defined,union-attr]


def test_default_node_differs_per_store_and_stays_for_one(tmp_path: Path) -> None:
    assert default_node(tmp_path / "a") == default_node(tmp_path / "a")
    assert default_node(tmp_path / "a") != default_node(tmp_path / "b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metadata: {kind: postgres}\n", "metadata.kind postgres needs metadata.dsn"),
        (f"metadata: {{dsn: '{DSN}'}}\n", "are for metadata.kind postgres"),
        ("metadata: {kind: mysql}\n", "metadata.kind"),
        ("metadata: {kind: postgres, dsn: '${NOT_SET_ANYWHERE_X}'}\n", "NOT_SET_ANYWHERE_X"),
    ],
)
def test_bad_sections_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, text)
    assert message in str(e.value)
    assert "pa55-word-x" not in str(e.value)


def test_dsn_password_is_never_shown(tmp_path: Path) -> None:
    assert describe_dsn(DSN) == "taidon@meta-db:5432/taidon"
    assert (
        describe_dsn("postgresql:///taidon?host=/run/pg") == "(default user)@(local socket)/taidon"
    )
    running = config(tmp_path, "")
    loaded = config(tmp_path, f"metadata: {{kind: postgres, dsn: '{DSN}'}}\n")
    change, _ = diff(running, loaded)  # type: ignore[arg-type]
    shown = change.as_dict()["needs_restart"]
    assert {p["key"] for p in shown} >= {"metadata.kind", "metadata.dsn"}
    assert "pa55-word-x" not in repr(shown)


def test_an_outage_is_a_503_with_its_sqlstate() -> None:
    err = from_domain(MetadataUnavailable("the gateway's metadata database is not reachable"))
    assert err.status == 503
    assert err.body()["error"] == {
        "code": "unavailable",
        "message": "the gateway's metadata database is not reachable",
        "sqlstate": "57P03",
    }


def test_migrations_are_numbered_from_one() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.sql.strip() and m.name for m in found)
