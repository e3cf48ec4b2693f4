"""Config parsing: defaults, units, path resolution, and errors that name the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config import LiquibasePrepare, PsqlPrepare, parse_duration, parse_size
from taidon_proxy.config_load import find_config_path, load_config, parse_config
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
    cfg = load_config(cfg_file, check=False)  # the files need not exist for path resolution
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
        check=False,
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
        ("bogus: 1\n", ":1:", "bogus", "unknown setting (allowed here: listen, relay"),
        (
            "databases:\n  shop:\n    prepare:\n      kind: psql\n",
            ":3:", "databases.shop.prepare.files", "required, but not set",
        ),
        (
            "databases:\n  shop:\n    prepare: {kind: sh, files: [a]}\n",
            ":3:", "databases.shop.prepare.kind",
            "'sh' is not allowed; use one of: psql, lb, command, alembic, django,"
            " liquibase (same as lb)",
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
        ("instances:\n  max: 0\n", ":2:", "instances.max", "must be at least 1, not 0"),
        (
            "snapshot:\n  backend: ext4\n", ":2:", "snapshot.backend",
            "'ext4' is not allowed; use one of: auto, copy, overlayfs, btrfs, zfs",
        ),
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


def test_several_errors_are_all_named() -> None:
    msg = error_of("bogus: 1\nother: 2\n")
    assert msg.splitlines()[0].startswith(f"{SRC}:1: bogus: unknown setting"), msg
    assert msg.splitlines()[1].startswith(f"{SRC}:2: other: unknown setting"), msg
    many = "".join(f"k{i}: 1\n" for i in range(14))
    lines = error_of(many).splitlines()
    assert len(lines) == 11 and lines[-1] == "(and 4 more)", lines


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_find_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAIDON_CONFIG", raising=False)
    assert find_config_path(None) == Path("taidon.yaml")
    monkeypatch.setenv("TAIDON_CONFIG", "/x/t.yaml")
    assert find_config_path(None) == Path("/x/t.yaml")
    assert find_config_path(Path("given.yaml")) == Path("given.yaml")


# --- wording: the project's language, not pydantic's -----------------------------------------

JARGON = ("Input should", "Extra inputs", "Field required", "Value error", "discriminator", "tag")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("admin: 5\n", "admin: must be a mapping (key: value), not a number 5"),
        ("listen: [a]\n", "listen: must be a string, not a list"),
        ("instances:\n  max: lots\n", "instances.max: must be a whole number, not a string 'lots'"),
        (
            "databases:\n  s:\n    prepare: {kind: psql, files: a.sql}\n",
            "databases.s.prepare.files: must be a list ([a, b], or one '- item' per line)",
        ),
        (
            "databases:\n  s:\n    prepare: {files: [a.sql]}\n",
            "databases.s.prepare.kind: required, but not set;"
            " use one of: psql, lb, command, alembic, django, liquibase",
        ),
        (
            "instances:\n  idel_ttl: 5m\n",
            "instances.idel_ttl: unknown setting; did you mean idle_ttl? (allowed here: idle_ttl,",
        ),
        (
            "databases:\n  s:\n    prepare: {kind: liquibase, changelog: c.xml, file: x}\n",
            "databases.s.prepare.file: unknown setting (allowed here: kind, search_path,",
        ),
        (
            "databases:\n  s:\n    prepare: {kind: psql, files: []}\n",
            "databases.s.prepare.files: needs at least 1 entry",
        ),
    ],
)  # fmt: skip
def test_errors_say_what_is_allowed_without_jargon(text: str, says: str) -> None:
    msg = error_of(text)
    assert says in msg, msg
    for word in JARGON:
        assert word not in msg, msg


def test_liquibase_is_a_synonym_of_lb() -> None:
    text = "databases:\n  s:\n    prepare: {kind: %s, search_path: db, changelog: c.xml}\n"
    long = parse_config(text % "liquibase", source=SRC, check=False).databases["s"]
    short = parse_config(text % "lb", source=SRC, check=False).databases["s"]
    assert isinstance(long.prepare, LiquibasePrepare)
    assert long.prepare.kind == "lb"
    # The same recipe whichever way it is written: the same states.
    assert long.model_dump_json() == short.model_dump_json()


# --- what the config refers to, checked at load ----------------------------------------------

CHANGELOG = """<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog">
  <changeSet id="1" author="ann"><sql>create table t (id int)</sql></changeSet>
%s</databaseChangeLog>
"""


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.message


def test_a_missing_sql_file_is_named_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "01.sql").write_text("select 1;\n")
    cfg = tmp_path / "taidon.yaml"
    cfg.write_text(
        "databases:\n"
        "  shop:\n"
        "    prepare:\n"
        "      kind: psql\n"
        "      files:\n"
        "        - sql/01.sql\n"
        "        - sql/02_missing.sql\n"
    )
    msg = load_error(cfg)
    missing = tmp_path.resolve() / "sql" / "02_missing.sql"
    assert msg == f"{cfg}:7: databases.shop.prepare.files.1: {missing}: no such file", msg
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.problems == [
        {
            "file": str(cfg),
            "line": 7,
            "key": "databases.shop.prepare.files.1",
            "message": f"{missing}: no such file",
        }
    ]
    assert load_config(cfg, check=False).databases["shop"]  # the schema alone is fine


def test_a_directory_is_not_a_sql_file(tmp_path: Path) -> None:
    (tmp_path / "d.sql").mkdir()
    cfg = tmp_path / "t.yaml"
    cfg.write_text("databases:\n  s: {prepare: {kind: psql, files: [d.sql]}}\n")
    assert "d.sql: not a regular file" in load_error(cfg)


def lb_config(tmp_path: Path, changelog: str = "db/master.xml", search: str = ".") -> Path:
    cfg = tmp_path / "taidon.yaml"
    cfg.write_text(
        "databases:\n"
        "  shop:\n"
        "    prepare:\n"
        "      kind: liquibase\n"
        f"      search_path: {search}\n"
        f"      changelog: {changelog}\n"
    )
    return cfg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_good_changelog_loads(tmp_path: Path) -> None:
    write(tmp_path / "db" / "master.xml", CHANGELOG % '  <include file="db/more.sql"/>\n')
    write(tmp_path / "db" / "more.sql", "--liquibase formatted sql\n")
    cfg = load_config(lb_config(tmp_path))
    assert cfg.databases["shop"].prepare.kind == "lb"


def test_a_changelog_outside_the_search_path(tmp_path: Path) -> None:
    msg = load_error(lb_config(tmp_path))
    assert msg.startswith(f"{tmp_path}/taidon.yaml:6: databases.shop.prepare.changelog: "), msg
    assert "db/master.xml is not in the search path" in msg


def test_a_missing_search_path(tmp_path: Path) -> None:
    msg = load_error(lb_config(tmp_path, search="nope"))
    assert f":5: databases.shop.prepare.search_path.0: {tmp_path.resolve()}/nope: no such" in msg


def test_a_changelog_that_does_not_parse_names_its_own_line(tmp_path: Path) -> None:
    broken = CHANGELOG % '  <changeSet id="2" author="ann"><sql>select 1</sql>\n'
    write(tmp_path / "db" / "master.xml", broken)
    msg = load_error(lb_config(tmp_path))
    assert msg.startswith(f"{tmp_path}/taidon.yaml:6: databases.shop.prepare.changelog: "), msg
    assert "db/master.xml:5: not well-formed XML: mismatched tag" in msg


def test_an_include_that_does_not_exist_names_the_including_line(tmp_path: Path) -> None:
    write(tmp_path / "db" / "master.xml", CHANGELOG % '  <include file="db/child.xml"/>\n')
    child = CHANGELOG % (
        '  <include file="gone.sql" relativeToChangelogFile="true"/>\n'
        '  <includeAll path="db/nowhere"/>\n'
    )
    write(tmp_path / "db" / "child.xml", child)
    msg = load_error(lb_config(tmp_path))
    assert "db/child.xml:4: included file gone.sql not found" in msg, msg
    assert "db/child.xml:5: includeAll path db/nowhere not found" in msg, msg


def test_yaml_changelogs_are_parsed_too(tmp_path: Path) -> None:
    write(tmp_path / "db" / "master.yaml", "databaseChangeLog:\n  - changeSet: [\n")
    msg = load_error(lb_config(tmp_path, changelog="db/master.yaml"))
    assert "db/master.yaml:3: not valid YAML" in msg, msg
    write(tmp_path / "db" / "master.yaml", "databaseChangeLog:\n  - include: {file: db/x.xml}\n")
    assert "db/master.yaml: included file db/x.xml not found" in load_error(
        lb_config(tmp_path, changelog="db/master.yaml")
    )


@pytest.mark.parametrize(
    ("roles", "says"),
    [
        ("[postgres]", "role 'postgres' exists in every instance"),
        ("[public]", "role 'public' is reserved"),
        ("[app, pg_monitor2]", "roles.1: role 'pg_monitor2': names starting pg_ are reserved"),
        ("[app, app]", "roles.1: role 'app' is listed twice"),
    ],
)
def test_roles_a_recipe_cannot_create(tmp_path: Path, roles: str, says: str) -> None:
    write(tmp_path / "a.sql", "select 1;\n")
    cfg = write(
        tmp_path / "t.yaml",
        f"databases:\n  s:\n    prepare: {{kind: psql, files: [a.sql]}}\n    roles: {roles}\n",
    )
    msg = load_error(cfg)
    assert msg.startswith(f"{cfg}:4: databases.s.roles."), msg
    assert says in msg


# --- what a reload changes --------------------------------------------------------------------


def test_reload_diff_keeps_what_needs_a_restart() -> None:
    from taidon_proxy.config_diff import diff

    base = (
        "listen: 127.0.0.1:55432\n"
        "auth: {method: scram-sha-256, users: {app: 'SCRAM-SHA-256$4096:a$b:c'}}\n"
        "databases:\n"
        "  a: {prepare: {kind: psql, files: [a.sql]}}\n"
        "  b: {prepare: {kind: psql, files: [b.sql]}}\n"
    )
    running = parse_config(base, source=SRC, check=False)
    edited = (
        base.replace("127.0.0.1:55432", "127.0.0.1:6432")
        .replace("b.sql", "b2.sql")
        .replace("'SCRAM-SHA-256$4096:a$b:c'", "'SCRAM-SHA-256$4096:x$y:z'")
        .replace("  a: {", "  c: {")
        + "instances: {max: 7}\nsnapshot: {backend: btrfs}\n"
    )
    change, effective = diff(running, parse_config(edited, source=SRC, check=False))
    assert (change.added, change.removed, change.changed) == (["c"], ["a"], ["b"])
    assert change.applied == ["instances.max"]
    assert [p.key for p in change.needs_restart] == ["auth.users.app", "listen", "snapshot.backend"]
    shown = change.as_dict()["needs_restart"]
    assert shown[0] == {"key": "auth.users.app", "running": "(secret)", "configured": "(secret)"}
    assert shown[1] == {
        "key": "listen",
        "running": "127.0.0.1:55432",
        "configured": "127.0.0.1:6432",
    }
    # In force now: the live sections; the rest as it runs until a restart.
    assert sorted(effective.databases) == ["b", "c"] and effective.instances.max == 7
    assert effective.listen == "127.0.0.1:55432" and effective.snapshot.backend == "auto"
    assert effective.auth == running.auth
    unchanged, _ = diff(running, running)
    assert unchanged.empty
