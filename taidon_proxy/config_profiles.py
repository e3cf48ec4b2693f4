"""Before a config is validated: `${NAME}` from the environment, then the profile in force.

`${NAME}` takes the variable's value, `${NAME:-default}` a default when it is unset or empty,
`${file:PATH}` the content of a file (one trailing newline dropped; a relative PATH is from
the config file's directory), and `$${` is a literal `${`. A profile (`profiles: {test:
{...}}`, chosen by `--profile` or `$TAIDON_PROFILE`) is merged over the rest: mappings key
by key, anything else replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taidon_proxy.config_errors import Problem, config_error, line_of
from taidon_proxy.errors import ConfigError

PROFILE_ENV = "TAIDON_PROFILE"
_REF = re.compile(r"\$\$\{|\$\{file:([^}]+)\}|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_BAD_REF = re.compile(r"\$\{(?!file:[^}]+\}|[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})")
MAX_FILE_VALUE = 1 << 20


def interpolate(data: Any, *, source: Path, node: Any, env: Mapping[str, str] | None = None) -> Any:
    """Every string scalar with its `${…}` references replaced; errors name key and line."""
    env = os.environ if env is None else env
    problems: list[Problem] = []

    def value(text: str, key: list[str]) -> str:
        if _BAD_REF.search(text.replace("$${", "")):
            problems.append(
                Problem(
                    key, "a `${` that is not ${NAME}, ${NAME:-default} or ${file:PATH}",
                    line_of(node, key),
                )
            )  # fmt: skip
            return text

        def one(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            if m.group(1) is not None:
                try:
                    return file_value(source.parent / m.group(1).strip())
                except ValueError as e:
                    problems.append(Problem(key, str(e), line_of(node, key)))
                    return ""
            name, default = m.group(2), m.group(3)
            got = env.get(name)
            if got:
                return got
            if default is not None:
                return default
            problems.append(
                Problem(
                    key, f"${{{name}}} is not set in the environment"
                    " (give a default with ${" + name + ":-value})", line_of(node, key),
                )
            )  # fmt: skip
            return ""

        return _REF.sub(one, text)

    def walk(x: Any, key: list[str]) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, [*key, str(k)]) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, [*key, str(i)]) for i, v in enumerate(x)]
        return value(x, key) if isinstance(x, str) and "$" in x else x

    out = walk(data, [])
    if problems:
        raise config_error(source, problems)
    return out


def file_keys(data: Any, profile: str | None) -> list[str]:
    """The dotted keys (after the profile's merge) whose raw value names a `${file:…}`."""
    out: list[str] = []

    def walk(x: Any, key: list[str]) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, [*key, str(k)])
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, [*key, str(i)])
        elif isinstance(x, str) and "${file:" in x.replace("$${", ""):
            if key[:1] == ["profiles"]:
                if len(key) < 3 or key[1] != profile:
                    return
                key = key[2:]
            out.append(".".join(key))

    walk(data, [])
    return sorted(set(out))


def redact_file_values(data: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """`data` (a config's JSON dump) with each value read from a file shown as "(secret)"."""
    for dotted in keys:
        node: Any = data
        *head, last = dotted.split(".")
        for part in head:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = "(secret)"
    return data


def file_value(path: Path) -> str:
    """A file's text (one trailing newline dropped); ValueError says why it cannot be had.
    The value is never part of a message: it may be a secret."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_VALUE + 1)
    except OSError as e:
        raise ValueError(f"${{file:…}} cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_FILE_VALUE:
        raise ValueError(f"${{file:…}} {path} is larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"${{file:…}} {path} is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def apply_profile(
    data: dict[str, Any], name: str | None, *, source: Path, node: Any
) -> tuple[dict[str, Any], str | None]:
    """(the config with the profile merged over it, the profile's name); no name: as is."""
    profiles = data.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise config_error(
            source,
            [Problem(["profiles"], "a mapping of profile names to settings",
                     line_of(node, ["profiles"]))],
        )  # fmt: skip
    if not name:
        return data, None
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"{source}: no profile {name!r} (profiles: {known})")
    if "profiles" in profiles[name]:
        raise config_error(
            source,
            [Problem(["profiles", name, "profiles"], "a profile cannot hold profiles",
                     line_of(node, ["profiles", name, "profiles"]))],
        )  # fmt: skip
    return _merge(data, profiles[name]), name


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over
