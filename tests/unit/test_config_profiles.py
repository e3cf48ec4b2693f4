"""${NAME} references and profiles, applied before the config is validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config import LiquibasePrepare
from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import ConfigError

pytestmark = pytest.mark.unit

SOURCE = Path("/etc/taidon/taidon.yaml")
TEXT = """\
listen: 127.0.0.1:${TAIDON_TEST_PORT:-55432}
store: ${TAIDON_TEST_STORE}
databases:
  shop:
    prepare:
      kind: lb
      changelog: db/master.xml
      contexts: dev
      parameters: {greeting: "${TAIDON_TEST_GREETING:-hello}", literal: "$${kept}"}
    isolation: shared
profiles:
  test:
    instances: {idle_ttl: 1m}
    databases:
      shop:
        isolation: connection
        prepare: {contexts: test, parameters: {extra: "${TAIDON_TEST_EXTRA:-x}"}}
        settings: {fsync: "off"}
"""


def load(monkeypatch: pytest.MonkeyPatch, text: str = TEXT, **env: str) -> object:
    for k in ("TAIDON_TEST_PORT", "TAIDON_TEST_GREETING", "TAIDON_TEST_EXTRA", "TAIDON_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TAIDON_TEST_STORE", "/var/lib/taidon")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return parse_config(text, source=SOURCE, check=False)


def test_references_take_the_environment_or_their_default(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(monkeypatch, TAIDON_TEST_GREETING="hi there")
    assert cfg.listen == "127.0.0.1:55432"  # type: ignore[attr-defined]
    assert str(cfg.store) == "/var/lib/taidon"  # type: ignore[attr-defined]
    prep = cfg.databases["shop"].prepare  # type: ignore[attr-defined]
    assert isinstance(prep, LiquibasePrepare)
    assert prep.parameters == {"greeting": "hi there", "literal": "${kept}"}
    assert cfg.profile is None and cfg.databases["shop"].isolation == "shared"  # type: ignore[attr-defined]


def test_a_profile_is_merged_over_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(monkeypatch, TAIDON_PROFILE="test", TAIDON_TEST_PORT="6000")
    assert cfg.profile == "test" and cfg.listen == "127.0.0.1:6000"  # type: ignore[attr-defined]
    shop = cfg.databases["shop"]  # type: ignore[attr-defined]
    assert shop.isolation == "connection" and shop.settings == {"fsync": "off"}
    assert shop.prepare.contexts == "test" and shop.prepare.changelog == "db/master.xml"
    assert shop.prepare.parameters == {"greeting": "hello", "literal": "${kept}", "extra": "x"}
    assert cfg.instances.idle_ttl == 60  # type: ignore[attr-defined]


def test_an_unset_variable_is_named_with_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as e:
        load(monkeypatch, text=TEXT.replace("${TAIDON_TEST_STORE}", "${TAIDON_TEST_NOPE}"))
    assert (
        "taidon.yaml:2" in e.value.message and "${TAIDON_TEST_NOPE} is not set" in e.value.message
    )
    assert "store" in e.value.message


def test_a_malformed_reference_and_an_unknown_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"taidon.yaml:2.*not \$\{NAME\}"):
        load(monkeypatch, text=TEXT.replace("${TAIDON_TEST_STORE}", "${1BAD}"))
    with pytest.raises(ConfigError, match=r"no profile 'prod' \(profiles: test\)"):
        load(monkeypatch, TAIDON_PROFILE="prod")


FILE_TEXT = """\
store: /var/lib/taidon
databases:
  shop:
    prepare:
      kind: psql
      files: [schema.sql]
      variables: {pw: "${file:secrets/pw}", both: "a-${file:/ABS}-${TAIDON_TEST_GREETING:-b}"}
"""


def _file_config(tmp_path: Path, text: str) -> object:
    return parse_config(text, source=tmp_path / "taidon.yaml", check=False)


def test_file_references_read_the_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("s3cr3t\n")
    absolute = tmp_path / "abs.txt"
    absolute.write_text("from-abs")
    cfg = _file_config(tmp_path, FILE_TEXT.replace("/ABS", str(absolute)))
    variables = cfg.databases["shop"].prepare.variables  # type: ignore[attr-defined]
    assert variables == {"pw": "s3cr3t", "both": "a-from-abs-b"}


def test_a_changed_file_value_changes_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "abs.txt").write_text("x")
    text = FILE_TEXT.replace("/ABS", str(tmp_path / "abs.txt"))
    (tmp_path / "secrets" / "pw").write_text("one")
    first = _file_config(tmp_path, text).databases["shop"].model_dump_json()  # type: ignore[attr-defined]
    (tmp_path / "secrets" / "pw").write_text("two")
    second = _file_config(tmp_path, text).databases["shop"].model_dump_json()  # type: ignore[attr-defined]
    assert first != second


def test_a_missing_file_names_the_config_line_and_the_file_not_a_value(tmp_path: Path) -> None:
    (tmp_path / "abs.txt").write_text("x")
    text = FILE_TEXT.replace("/ABS", str(tmp_path / "abs.txt"))
    with pytest.raises(ConfigError) as exc:
        _file_config(tmp_path, text)
    msg = exc.value.message
    assert f"{tmp_path / 'taidon.yaml'}:7: databases.shop.prepare.variables.pw:" in msg
    assert f"cannot read {tmp_path / 'secrets' / 'pw'}: No such file or directory" in msg


def test_a_file_value_that_is_not_text_is_refused_without_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_bytes(b"\xff\xfe-binary")
    (tmp_path / "abs.txt").write_text("x")
    with pytest.raises(ConfigError) as exc:
        _file_config(tmp_path, FILE_TEXT.replace("/ABS", str(tmp_path / "abs.txt")))
    assert "is not UTF-8 text" in exc.value.message
    assert "binary" not in exc.value.message


def test_an_empty_file_reference_is_a_bad_reference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _file_config(tmp_path, "store: ${file:}\n")
    assert "${file:PATH}" in exc.value.message


def test_values_from_files_are_shown_as_secret(tmp_path: Path) -> None:
    from taidon_proxy.config_profiles import redact_file_values

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("s3cr3t")
    (tmp_path / "abs.txt").write_text("x")
    text = FILE_TEXT.replace("/ABS", str(tmp_path / "abs.txt")) + (
        "profiles:\n  ci:\n    databases:\n"
        "      shop: {prepare: {variables: {ci: '${file:secrets/pw}'}}}\n"
    )
    cfg = parse_config(text, source=tmp_path / "taidon.yaml", check=False, profile="ci")
    assert cfg.file_values == [
        "databases.shop.prepare.variables.both", "databases.shop.prepare.variables.ci",
        "databases.shop.prepare.variables.pw",
    ]  # fmt: skip
    shown = redact_file_values(cfg.model_dump(mode="json"), cfg.file_values)
    assert "s3cr3t" not in str(shown)
    assert shown["databases"]["shop"]["prepare"]["variables"]["pw"] == "(secret)"
    assert cfg.databases["shop"].prepare.variables["ci"] == "s3cr3t"  # type: ignore[union-attr]


def test_a_reload_report_hides_values_read_from_files(tmp_path: Path) -> None:
    from taidon_proxy.config_diff import diff

    text = "store: /var/lib/taidon\nlisten: '127.0.0.1:${file:port}'\n"
    (tmp_path / "port").write_text("6001")
    running = parse_config(text, source=tmp_path / "taidon.yaml", check=False)
    (tmp_path / "port").write_text("6002")
    loaded = parse_config(text, source=tmp_path / "taidon.yaml", check=False)
    change, effective = diff(running, loaded)
    [pending] = change.as_dict()["needs_restart"]
    assert pending == {"key": "listen", "running": "(secret)", "configured": "(secret)"}
    assert effective.listen == "127.0.0.1:6001" and effective.file_values == ["listen"]
