"""Routing: turn a StartupMessage's parameters into a Route, stripping the taidon.* switches."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from taidon_proxy.config import parse_duration
from taidon_proxy.errors import RoutingError

_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
_SWITCHES = ("instance", "isolation", "ref", "state", "ttl")
# A git ref as a route may name it: a branch or tag name, or a commit id (prefix). The rules are
# git check-ref-format's, minus the revision syntax (~ ^ @{ :), which a database name cannot carry.
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./+-]{0,199}$")
DEFAULT_LABEL = "default"


@dataclass(frozen=True)
class Route:
    """Where a connection goes: a recipe alias and label, or an exact state (`state_ref`)."""

    alias: str | None
    state_ref: str | None
    label: str
    isolation: str | None  # None: the recipe's default
    ttl: float | None
    # Startup parameters to send to the instance (database still the client's; the caller
    # replaces it with the recipe's database).
    params: dict[str, str] = field(default_factory=dict)
    # A git ref: the recipe's files as of that commit (None: the work tree).
    ref: str | None = None


def split_options(options: str) -> list[str]:
    """Split a libpq `options` string the way the server does: whitespace, backslash escapes."""
    out: list[str] = []
    cur: list[str] = []
    have = False
    it = iter(options)
    for ch in it:
        if ch == "\\":
            nxt = next(it, "")
            cur.append(nxt)
            have = True
        elif ch.isspace():
            if have:
                out.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(ch)
            have = True
    if have:
        out.append("".join(cur))
    return out


def join_options(tokens: list[str]) -> str:
    return " ".join(re.sub(r"([\\\s])", r"\\\1", t) for t in tokens)


def _extract_switches(options: str) -> tuple[dict[str, str], str | None]:
    """Pull `-c taidon.k=v` / `--taidon.k=v` out of options; return them and the rest."""
    tokens = split_options(options)
    keep: list[str] = []
    switches: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        setting: str | None = None
        consumed = 1
        if tok == "-c" and i + 1 < len(tokens):
            setting, consumed = tokens[i + 1], 2
        elif (tok.startswith("-c") and len(tok) > 2) or tok.startswith("--"):
            setting = tok[2:]
        if setting is not None and setting.lower().startswith("taidon."):
            name, eq, value = setting.partition("=")
            key = name[len("taidon.") :].lower()
            if not eq:
                raise RoutingError(f'option "{name}" needs a value: -c {name}=VALUE')
            if key not in _SWITCHES:
                raise RoutingError(
                    f'unrecognized configuration parameter "{name}"',
                    hint="taidon switches: " + ", ".join(f"taidon.{s}" for s in _SWITCHES),
                )
            switches[key] = value
        else:
            keep.extend(tokens[i : i + consumed])
        i += consumed
    if not switches:
        return {}, None
    return switches, join_options(keep)


def _label(value: str) -> str:
    if not _LABEL.match(value):
        raise RoutingError(
            f'invalid instance label "{value}"', hint="labels are 1-63 of A-Z a-z 0-9 _ . -"
        )
    return value


def parse_ref(value: str) -> str:
    """A git ref as a route (and the admin API's ?ref=) may name it; else a RoutingError."""
    bad = (
        not _REF.match(value) or ".." in value or "//" in value or "/." in value
        or value.endswith((".", "/", ".lock"))
    )  # fmt: skip
    if bad:
        raise RoutingError(
            f'invalid git ref "{value}"',
            hint="a branch or tag name (feature-x, v1.4, release/2) or a commit id (3f2a9c1)",
        )
    return value


def parse_route(params: Mapping[str, str]) -> Route:
    """Route a connection from its startup parameters (user is required, checked earlier)."""
    database = params.get("database") or params.get("user", "")
    forward = dict(params)
    switches: dict[str, str] = {}
    if "options" in params:
        switches, rest = _extract_switches(params["options"])
        if rest is not None:
            if rest:
                forward["options"] = rest
            else:
                del forward["options"]

    alias: str | None
    state_ref: str | None = None
    ref: str | None = None
    label = DEFAULT_LABEL
    if database.startswith("state:"):
        alias = None
        state_ref = database[len("state:") :]
        if not state_ref:
            raise RoutingError('database "state:" needs a state id prefix or name')
    else:
        head, sep, lab = database.partition(":")
        alias, at, at_ref = head.partition("@")
        if not alias:
            raise RoutingError(
                f'database "{database}" names no recipe alias',
                hint="use alias, alias:label, alias@ref, alias@ref:label, or state:<id>",
            )
        if sep:
            label = _label(lab)
        if at:
            ref = parse_ref(at_ref)
    if "state" in switches:
        state_ref = switches["state"]
    if "ref" in switches:
        ref = parse_ref(switches["ref"])
    if ref is not None and (state_ref is not None or alias is None):
        raise RoutingError(
            f'a git ref ("{ref}") applies to a recipe alias, not to a state',
            hint="use alias@ref, or state:<id> without a ref",
        )
    if "instance" in switches:
        label = _label(switches["instance"])
    isolation = switches.get("isolation")
    if isolation is not None and isolation not in ("shared", "connection"):
        raise RoutingError(
            f'invalid value for taidon.isolation: "{isolation}"', hint="use shared or connection"
        )
    ttl: float | None = None
    if "ttl" in switches:
        try:
            ttl = parse_duration(switches["ttl"])
        except ValueError as e:
            raise RoutingError(f"invalid value for taidon.ttl: {e}") from None
    return Route(
        alias=alias or None,
        state_ref=state_ref,
        label=label,
        isolation=isolation,
        ttl=ttl,
        params=forward,
        ref=ref,
    )
