"""The plugin's command-line options and ini keys, and the settings they resolve to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

Scope = Literal["session", "package", "module", "class", "function"]
SCOPES: tuple[Scope, ...] = ("function", "class", "module", "package", "session")
DEFAULT_USER = "postgres"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("taidon", "Taidon proxy: a fresh database per test")
    group.addoption(
        "--taidon-url",
        default=None,
        help="Admin URL of a running proxy (http://127.0.0.1:55433); else $TAIDON_URL, else the"
        " ini key taidon_url; without one, the proxy of the config is used if it runs, else an"
        " embedded proxy is started for the session.",
    )
    group.addoption(
        "--taidon-config",
        default=None,
        help="Config file (default: ini taidon_config, else $TAIDON_CONFIG, else taidon.yaml"
        " in the rootdir).",
    )
    group.addoption("--taidon-alias", default=None, help="Recipe alias (ini taidon_alias).")
    group.addoption(
        "--taidon-scope",
        default=None,
        choices=SCOPES,
        help="How long one fresh database lives: function (default), class, module, package or"
        " session (ini taidon_scope).",
    )
    group.addoption("--taidon-user", default=None, help="Database user (ini taidon_user).")
    parser.addini("taidon_url", "Admin URL of a running Taidon proxy.", default="")
    parser.addini("taidon_config", "Taidon config file, relative to the rootdir.", default="")
    parser.addini("taidon_alias", "Recipe alias the fixtures open (default: the only one).")
    parser.addini("taidon_scope", "function | class | module | package | session.", default="")
    parser.addini("taidon_user", "Database user of the fixtures' connections.", default="")
    parser.addini(
        "taidon_warm",
        "Embedded proxy: started clones kept ready for new test databases (default: the"
        " number of xdist workers, at least 1).",
        default="",
    )


@dataclass(frozen=True)
class Settings:
    """What the options, ini keys and environment say, resolved once per pytest process."""

    url: str | None
    config_path: Path
    config_given: bool  # named by an option, ini key or $TAIDON_CONFIG (a missing one is an error)
    alias: str | None
    scope: Scope
    user: str
    warm: int | None

    @classmethod
    def of(cls, config: pytest.Config) -> Settings:
        def pick(option: str, ini: str) -> str | None:
            value = config.getoption(option, default=None)
            if value:
                return str(value)
            raw = config.getini(ini)
            return (str(raw).strip() or None) if raw else None

        ini_url = str(config.getini("taidon_url")).strip()
        url = config.getoption("taidon_url") or os.environ.get("TAIDON_URL") or ini_url or None
        given = pick("taidon_config", "taidon_config") or os.environ.get("TAIDON_CONFIG")
        path = Path(given) if given else Path("taidon.yaml")
        if not path.is_absolute():
            path = Path(config.rootpath) / path
        scope = pick("taidon_scope", "taidon_scope") or "function"
        if scope not in SCOPES:
            raise pytest.UsageError(f"taidon_scope = {scope!r}: must be one of {', '.join(SCOPES)}")
        warm_text = pick("taidon_warm", "taidon_warm")
        warm = None
        if warm_text is not None:
            if not warm_text.isdigit():
                raise pytest.UsageError(f"taidon_warm = {warm_text!r}: must be a whole number")
            warm = int(warm_text)
        return cls(
            url=url.rstrip("/") if url else None,
            config_path=path,
            config_given=given is not None,
            alias=pick("taidon_alias", "taidon_alias"),
            scope=scope,
            user=pick("taidon_user", "taidon_user") or DEFAULT_USER,
            warm=warm,
        )
