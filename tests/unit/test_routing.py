"""Routing from startup parameters: alias, label, state refs, taidon.* switches and their errors."""

from __future__ import annotations

import pytest

from taidon_proxy.errors import RoutingError
from taidon_proxy.routing import (
    DEFAULT_LABEL,
    Route,
    join_options,
    parse_route,
    split_options,
)

pytestmark = pytest.mark.unit


def route(database: str, options: str | None = None, **more: str) -> Route:
    params = {"user": "postgres", "database": database, **more}
    if options is not None:
        params["options"] = options
    return parse_route(params)


def test_alias_is_the_default_shared_label() -> None:
    r = route("shop", application_name="app")
    assert (r.alias, r.label, r.state_ref, r.isolation, r.ttl) == (
        "shop", DEFAULT_LABEL, None, None, None,
    )  # fmt: skip
    assert r.params == {"user": "postgres", "database": "shop", "application_name": "app"}


def test_alias_colon_label() -> None:
    r = route("shop:gw1")
    assert (r.alias, r.label) == ("shop", "gw1")


def test_database_defaults_to_the_user_name() -> None:
    r = parse_route({"user": "shop"})
    assert r.alias == "shop"


def test_state_reference() -> None:
    r = route("state:abc123")
    assert (r.alias, r.state_ref, r.label) == (None, "abc123", DEFAULT_LABEL)
    r = route("state:golden")
    assert r.state_ref == "golden"


@pytest.mark.parametrize(
    "options",
    [
        "-c taidon.instance=ci",
        "-ctaidon.instance=ci",
        "--taidon.instance=ci",
        "-c TAIDON.Instance=ci",
    ],
)
def test_switch_spellings(options: str) -> None:
    r = route("shop", options)
    assert r.label == "ci"
    assert "options" not in r.params


def test_switches_stripped_other_options_kept_in_order() -> None:
    r = route(
        "shop:x",
        r"-c search_path=a,b -c taidon.instance=ci --work_mem=4MB -c taidon.isolation=connection"
        r" -c taidon.ttl=90s -c my.v=a\ b -c taidon.state=abc",
    )
    assert r.label == "ci"  # the switch overrides the label in the database name
    assert r.isolation == "connection"
    assert r.ttl == 90.0
    assert r.state_ref == "abc"
    assert r.alias == "shop"
    assert r.params["options"] == r"-c search_path=a,b --work_mem=4MB -c my.v=a\ b"
    assert split_options(r.params["options"]) == [
        "-c", "search_path=a,b", "--work_mem=4MB", "-c", "my.v=a b",
    ]  # fmt: skip


def test_options_without_switches_are_forwarded_byte_for_byte() -> None:
    raw = "-c  search_path=a   -c x.y=1 "
    r = route("shop", raw)
    assert r.params["options"] == raw


def test_shared_label_and_switch_name_the_same_route() -> None:
    a, b = route("shop:ci"), route("shop", "-c taidon.instance=ci")
    assert (a.alias, a.label) == (b.alias, b.label)


@pytest.mark.parametrize(
    ("database", "options", "message"),
    [
        ("shop:", None, "invalid instance label"),
        ("shop:a b", None, "invalid instance label"),
        ("shop:" + "x" * 64, None, "invalid instance label"),
        ("state:", None, "needs a state id prefix or name"),
        (":ci", None, "no recipe alias"),
        ("shop", "-c taidon.nope=1", 'unrecognized configuration parameter "taidon.nope"'),
        ("shop", "-c taidon.instance", "needs a value"),
        ("shop", "-c taidon.isolation=solo", "invalid value for taidon.isolation"),
        ("shop", "-c taidon.ttl=forever", "invalid value for taidon.ttl"),
        ("shop", "-c taidon.instance=a/b", "invalid instance label"),
    ],
)
def test_bad_routes(database: str, options: str | None, message: str) -> None:
    with pytest.raises(RoutingError) as e:
        route(database, options)
    assert message in e.value.message
    assert e.value.sqlstate == "42602"


def test_unknown_switch_hint_lists_the_switches() -> None:
    with pytest.raises(RoutingError) as e:
        route("shop", "-c taidon.lable=x")
    assert e.value.hint is not None
    for name in ("taidon.instance", "taidon.isolation", "taidon.state", "taidon.ttl"):
        assert name in e.value.hint


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", []),
        ("   ", []),
        ("-c a=1", ["-c", "a=1"]),
        (r"-c a=x\ y", ["-c", "a=x y"]),
        (r"a\\b", ["a\\b"]),
        ("a\tb\nc", ["a", "b", "c"]),
        ("trailing\\", ["trailing"]),
    ],
)
def test_split_options_like_the_server(text: str, tokens: list[str]) -> None:
    assert split_options(text) == tokens


def test_join_escapes_what_split_unescapes() -> None:
    tokens = ["-c", "a=x y", "b\\c", "tab\there"]
    assert split_options(join_options(tokens)) == tokens


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("127.0.0.1:55432", True),
        ("[::1]:55432", True),
        ("localhost:5432", True),
        ("/run/taidon", True),
        ("0.0.0.0:55432", False),
        ("192.0.2.7:5432", False),
    ],
)
def test_only_loopback_and_unix_sockets_count_as_local(spec: str, local: bool) -> None:
    from taidon_proxy.net.server import is_local

    assert is_local(spec) is local
