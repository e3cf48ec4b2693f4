"""Routing invariants over arbitrary options strings: only RoutingError, switches never leak."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taidon_proxy.errors import RoutingError
from taidon_proxy.routing import join_options, parse_route, split_options

pytestmark = pytest.mark.property

token_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
tokens = st.text(token_chars, min_size=1, max_size=12)
plain_setting = st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8})?=[A-Za-z0-9 ,.\\]{0,8}", fullmatch=True)
switch = st.tuples(
    st.sampled_from(["instance", "isolation", "state", "ttl"]),
    st.sampled_from(["ci", "gw0", "shared", "connection", "abc123", "1s", "10m"]),
)


@given(st.lists(tokens, max_size=8))
def test_join_then_split_round_trips(parts: list[str]) -> None:
    parts = [p for p in parts if p.strip()]  # a blank token cannot survive any split
    joined = join_options(parts)
    assert split_options(joined) == parts


def settings_in(tokens: list[str]) -> list[str]:
    """The `name=value` settings a server would take from split options tokens."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            out.append(tokens[i + 1])
            i += 2
            continue
        if (tok.startswith("-c") and len(tok) > 2) or tok.startswith("--"):
            out.append(tok[2:])
        i += 1
    return out


@given(st.text(max_size=200))
def test_any_options_string_routes_or_raises_routing_error(options: str) -> None:
    try:
        r = parse_route({"user": "u", "database": "shop", "options": options})
    except RoutingError as e:
        assert e.sqlstate == "42602"
        return
    rest = split_options(r.params.get("options", ""))
    assert not [s for s in settings_in(rest) if s.lower().startswith("taidon.")]


@given(st.lists(st.sampled_from(["-c", "taidon.instance=x", "-ctaidon.ttl=1s", "a=1", "--x=2"])))
def test_no_taidon_setting_survives_any_token_sequence(parts: list[str]) -> None:
    r = parse_route({"user": "u", "database": "shop", "options": join_options(parts)})
    rest = split_options(r.params.get("options", ""))
    assert not [s for s in settings_in(rest) if s.lower().startswith("taidon.")]


@given(st.lists(st.one_of(plain_setting, switch), max_size=8))
def test_switches_are_removed_and_everything_else_kept_in_order(
    items: list[str | tuple[str, str]],
) -> None:
    parts: list[str] = []
    kept: list[str] = []
    last: dict[str, str] = {}
    for item in items:
        if isinstance(item, tuple):
            parts += ["-c", f"taidon.{item[0]}={item[1]}"]
            last[item[0]] = item[1]
        else:
            parts += ["-c", item]
            kept += ["-c", item]
    try:
        r = parse_route({"user": "u", "database": "shop:lbl", "options": join_options(parts)})
    except RoutingError:
        # Only a bad switch value refuses: isolation must be shared|connection, ttl a duration.
        assert last.get("isolation", "shared") not in ("shared", "connection") or (
            "ttl" in last and not last["ttl"][0].isdigit()
        )
        return
    assert split_options(r.params.get("options", "")) == kept
    assert r.label == last.get("instance", "lbl")
    assert r.isolation == last.get("isolation")
    assert r.state_ref == last.get("state")
    assert r.alias == "shop"
