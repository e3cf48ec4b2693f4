"""Routing with git refs: alias@ref, alias@ref:label, -c taidon.ref, the instance key's text
form, and the refs a route refuses."""

from __future__ import annotations

import pytest

from taidon_proxy.errors import RoutingError
from taidon_proxy.instances.keys import InstanceKey, Isolation
from taidon_proxy.routing import DEFAULT_LABEL, Route, parse_route

pytestmark = pytest.mark.unit


def route(database: str, options: str | None = None) -> Route:
    params = {"user": "postgres", "database": database}
    if options is not None:
        params["options"] = options
    return parse_route(params)


@pytest.mark.parametrize(
    ("database", "alias", "ref", "label"),
    [
        ("shop", "shop", None, DEFAULT_LABEL),
        ("shop@feature-x", "shop", "feature-x", DEFAULT_LABEL),
        ("shop@v1.4", "shop", "v1.4", DEFAULT_LABEL),
        ("shop@3f2a9c1", "shop", "3f2a9c1", DEFAULT_LABEL),
        ("shop@feature-x:ci", "shop", "feature-x", "ci"),
        ("shop@release/2.0:gw1", "shop", "release/2.0", "gw1"),
        ("shop@user+topic", "shop", "user+topic", DEFAULT_LABEL),
    ],
)
def test_alias_at_ref_with_or_without_a_label(
    database: str, alias: str, ref: str | None, label: str
) -> None:
    r = route(database)
    assert (r.alias, r.ref, r.label, r.state_ref) == (alias, ref, label, None)
    assert r.params["database"] == database  # the session replaces it with the recipe's


def test_the_ref_switch_names_the_same_route_and_is_stripped() -> None:
    a = route("shop:ci", "-c taidon.ref=feature-x -c work_mem=8MB")
    b = route("shop@feature-x:ci")
    assert (a.alias, a.ref, a.label) == (b.alias, b.ref, b.label)
    assert a.params["options"] == "-c work_mem=8MB"
    assert route("shop@main", "-c taidon.ref=v2").ref == "v2"  # the switch wins, as for labels


@pytest.mark.parametrize(
    ("database", "options", "message"),
    [
        ("shop@", None, 'invalid git ref ""'),
        ("shop@a..b", None, 'invalid git ref "a..b"'),
        ("shop@-c", None, 'invalid git ref "-c"'),  # never an option to git
        ("shop@--upload-pack=x", None, "invalid git ref"),
        ("shop@main.lock", None, "invalid git ref"),
        ("shop@a//b", None, "invalid git ref"),
        ("shop@a/", None, "invalid git ref"),
        ("shop@a/.b", None, "invalid git ref"),
        ("shop@HEAD~1", None, "invalid git ref"),
        ("shop@a b", None, "invalid git ref"),
        ("shop@" + "x" * 201, None, "invalid git ref"),
        ("@main", None, "names no recipe alias"),
        ("state:abc", "-c taidon.ref=main", "applies to a recipe alias, not to a state"),
        ("shop", "-c taidon.ref", "needs a value"),
    ],
)
def test_bad_refs_are_refused(database: str, options: str | None, message: str) -> None:
    with pytest.raises(RoutingError) as info:
        route(database, options)
    assert message in info.value.message
    assert info.value.sqlstate == "42602"


def test_an_instance_key_with_a_ref_round_trips_its_text_form() -> None:
    key = InstanceKey.recipe("shop", "ci", Isolation.SHARED, "release/2.0")
    assert str(key) == "shop@release/2.0:ci"
    assert InstanceKey.parse(str(key)) == key
    plain = InstanceKey.recipe("shop", "ci")
    assert str(plain) == "shop:ci" and InstanceKey.parse("shop:ci") == plain
    assert key != plain
