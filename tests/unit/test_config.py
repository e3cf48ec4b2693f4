"""Config parsing: defaults, units, path resolution, and errors that name the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config import (
    LiquibasePrepare,
    PsqlPrepare,
    find_config_path,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from taidon_proxy.errors import ConfigError

pytestmark = pytest.mark.unit

SRC = Path("/etc/taidon/taidon.yaml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, source=SRC)
    return e.value.message


def test_defaults() -> None:
    cfg = parse_config("", source=SRC)
    assert cfg.listen == "127.0.0.1:55432"
    assert cfg.auth.method == "trust"
    assert cfg.instances.idle_ttl == 600.0
    assert cfg.cache.max_size == 20 * 2**30
    assert cfg.databases == {}
    assert cfg.source == SRC


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("250ms", 0.25), ("2", 2.0), (5, 5.0),
     ("1.5s", 1.5), ("1d", 86400.0)],
)  # fmt: skip
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "10 minutes", "-1s", "", "1y"])
def test_bad_durations(value: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [("512MiB", 512 * 2**20), ("20GiB", 20 * 2**30), ("1GB", 10**9), ("100", 100), (7, 7),
     ("1.5KiB", 1536), ("2tib", 2 * 2**40)],
)  # fmt: skip
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "conf" / "taidon.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "store: ./store\n"
        "tls: {cert: certs/c.pem, key: /abs/k.pem}\n"
        "databases:\n"
        "  a: {prepare: {kind: psql, files: [sql/1.sql, /abs/2.sql]}}\n"
        "  b: {prepare: {kind: lb, search_path: 'db,more', changelog: master.xml}}\n"
    )
    cfg = load_config(cfg_file)
    base = cfg_file.parent.resolve()
    assert cfg.store == base / "store"
    assert cfg.tls.cert == base / "certs/c.pem" and cfg.tls.key == Path("/abs/k.pem")
    a = cfg.databases["a"].prepare
    assert isinstance(a, PsqlPrepare)
    assert a.files == [base / "sql/1.sql", Path("/abs/2.sql")]
    b = cfg.databases["b"].prepare
    assert isinstance(b, LiquibasePrepare)
    assert b.search_path == [base / "db", base / "more"]
    assert b.changelog == "master.xml"  # relative to the search path, as Liquibase has it
    assert cfg.database_of("a") == "a"


def test_recipe_fields() -> None:
    cfg = parse_config(
        "databases:\n"
        "  shop:\n"
        "    prepare: {kind: psql, files: [a.sql], variables: {v: '1'}}\n"
        "    database: shopdb\n"
        "    roles: [app, ro]\n"
        "    isolation: connection\n"
        "    idle_ttl: 90s\n",
        source=SRC,
    )
    r = cfg.databases["shop"]
    assert (r.database, r.roles, r.isolation, r.idle_ttl) == (
        "shopdb", ["app", "ro"], "connection", 90.0,
    )  # fmt: skip
    assert cfg.database_of("shop") == "shopdb"


@pytest.mark.parametrize(
    ("text", "where", "key", "what"),
    [
        (
            "listen: x\ninstances:\n  idle_ttl: banana\n",
            ":3:", "instances.idle_ttl", "not a duration",
        ),
        ("cache:\n  max_size: lots\n", ":2:", "cache.max_size", "not a size"),
        ("bogus: 1\n", ":1:", "bogus", "Extra inputs are not permitted"),
        (
            "databases:\n  shop:\n    prepare:\n      kind: psql\n",
            ":3:", "databases.shop.prepare.files", "Field required",
        ),
        (
            "databases:\n  shop:\n    prepare: {kind: sh, files: [a]}\n",
            ":3:", "databases.shop.prepare", "kind",
        ),
        (
            "databases:\n  'bad:alias':\n    prepare: {kind: psql, files: [a.sql]}\n",
            ":1:", "databases", "not a valid alias",
        ),
        (
            "databases:\n  s:\n    prepare: {kind: psql, files: [a.sql]}\n    roles: ['x y']\n",
            ":4:", "databases.s.roles", "not a valid role name",
        ),
        (
            "auth:\n  method: scram-sha-256\n",
            ":1:", "auth", "needs at least one entry in auth.users",
        ),
        ("tls:\n  cert: c.pem\n", ":1:", "tls", "tls.cert and tls.key go together"),
        ("instances:\n  max: 0\n", ":2:", "instances.max", "greater than or equal to 1"),
        ("snapshot:\n  backend: ext4\n", ":2:", "snapshot.backend", "'auto'"),
    ],
)  # fmt: skip
def test_errors_name_key_and_line(text: str, where: str, key: str, what: str) -> None:
    msg = error_of(text)
    assert msg.startswith(f"{SRC}{where} {key}: "), msg
    assert what in msg


def test_yaml_syntax_error_names_the_line() -> None:
    msg = error_of("listen: a\nsnapshot: [\n")
    assert msg.startswith(f"{SRC}: line 3: invalid YAML"), msg


def test_top_level_must_be_a_mapping() -> None:
    assert "top level must be a mapping" in error_of("- a\n- b\n")


def test_several_errors_are_counted() -> None:
    msg = error_of("bogus: 1\nother: 2\n")
    assert "(and 1 more)" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_find_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAIDON_CONFIG", raising=False)
    assert find_config_path(None) == Path("taidon.yaml")
    monkeypatch.setenv("TAIDON_CONFIG", "/x/t.yaml")
    assert find_config_path(None) == Path("/x/t.yaml")
    assert find_config_path(Path("given.yaml")) == Path("given.yaml")
