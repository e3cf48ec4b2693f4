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
