"""The dashboard's pure parts: sessions and their expiry, the cookie-or-bearer check with its
CSRF rule, autoescaping, the tree layout and the build progress read from job events."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from taidon_proxy.admin.auth import authenticate
from taidon_proxy.admin.dashboard import charts
from taidon_proxy.admin.dashboard.render import environment, size
from taidon_proxy.admin.errors import ApiError
from taidon_proxy.admin.openapi import document
from taidon_proxy.admin.sessions import COOKIE, CSRF_HEADER, SessionStore
from taidon_proxy.services.access import ADMIN

pytestmark = pytest.mark.unit
TOKEN = "t0ken"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_session_expires_and_signs_out() -> None:
    clock = Clock()
    store = SessionStore(lifetime=60, clock=clock)
    s = store.open(ADMIN)
    assert s.id != s.csrf and TOKEN not in (s.id, s.csrf) and len(s.id) >= 40
    assert store.get(s.id) == s
    clock.now += 59.9
    assert store.get(s.id) == s
    clock.now += 0.2
    assert store.get(s.id) is None
    assert store.get(s.id) is None  # forgotten, not revived
    t = store.open(ADMIN)
    store.close(t.id)
    assert store.get(t.id) is None
    assert store.get(None) is None and store.get("") is None and store.get("nope") is None


def _request(method: str, headers: dict[str, str] | None = None, cookie: str | None = None) -> Any:
    h = dict(headers or {})
    if cookie is not None:
        h["Cookie"] = f"{COOKIE}={cookie}"
    return make_mocked_request(method, "/v1/states", headers=h)


async def test_bearer_or_cookie_and_csrf_for_changes() -> None:
    store = SessionStore()
    s = store.open(ADMIN)

    async def who(request: Any) -> Any:
        return await authenticate(request, TOKEN, store, None)

    assert await who(_request("POST", {"Authorization": f"Bearer {TOKEN}"})) == ADMIN
    assert await who(_request("GET", {"Authorization": "Bearer wrong"})) is None
    assert await who(_request("GET")) is None
    assert await who(_request("GET", cookie="forged")) is None
    assert await who(_request("GET", cookie=s.id)) == ADMIN
    ok = {CSRF_HEADER: s.csrf}
    assert await who(_request("DELETE", ok, cookie=s.id)) == ADMIN
    for bad in ({}, {CSRF_HEADER: "x"}, {CSRF_HEADER: s.id}):
        with pytest.raises(ApiError) as e:
            await who(_request("POST", bad, cookie=s.id))
        assert (e.value.status, e.value.code) == (403, "csrf")
    store.close(s.id)
    assert await who(_request("POST", ok, cookie=s.id)) is None


def test_templates_escape_what_users_wrote() -> None:
    env = environment()
    assert env.autoescape
    html = env.from_string("<td>{{ v }}</td><i data-x='{{ {'a': v} | tojson }}'>").render(
        v="<script>alert('x')</script><b>"
    )
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&lt;b&gt;" in html


def _state(sid: str, parent: str | None, created: float) -> dict[str, Any]:
    return {"id": sid, "parent": parent, "created": created}


def test_tree_places_children_under_their_parent() -> None:
    rows = [
        _state("c", "a", 3),
        _state("a", None, 1),
        _state("b", "a", 2),
        _state("d", "b", 4),
        _state("orphan", "gone", 5),  # its parent was removed: drawn as a root
    ]
    nodes = charts.tree(rows)
    assert [n.state["id"] for n in nodes] == ["a", "b", "d", "c", "orphan"]
    by = {n.state["id"]: n for n in nodes}
    assert by["a"].parent_x is None and by["orphan"].parent_x is None
    assert (by["d"].parent_x, by["d"].parent_y) == (by["b"].x, by["b"].y)
    assert by["d"].x > by["b"].x > by["a"].x == by["orphan"].x
    assert [n.y for n in nodes] == sorted(n.y for n in nodes)
    assert charts.tree_height(nodes) > nodes[-1].y


def _ev(kind: str, message: str = "") -> dict[str, Any]:
    return {"kind": kind, "message": message}


def _tri(p: charts.Progress) -> tuple[int, int | None, int]:
    return p.done, p.total, p.percent


def test_progress_from_step_events() -> None:
    assert charts.progress("running", []).percent == 0
    assert charts.progress("running", []).total is None
    evs = [_ev("job.start"), _ev("step.start", "applying a.sql (1/4)")]
    assert _tri(charts.progress("running", evs)) == (0, 4, 0)
    evs.append(_ev("snapshot", "a.sql -> 0123"))
    assert _tri(charts.progress("running", evs)) == (1, 4, 25)
    evs += [_ev("step.start", "changeset 3/4 x::y"), _ev("snapshot"), _ev("snapshot")]
    assert _tri(charts.progress("running", evs)) == (4, 4, 100)  # never past the total
    odd = [_ev("step.start", "applying v1/2.sql (2/5)")]  # a path's "1/2" is not the count
    assert _tri(charts.progress("running", odd)) == (1, 5, 20)
    assert charts.progress("succeeded", [_ev("progress", "all 3 files cached")]).percent == 100
    failed = charts.progress("failed", [_ev("step.start", "applying b.sql (2/3)")])
    assert (failed.done, failed.total, failed.percent) == (1, 3, 33)


def test_cache_bars() -> None:
    usage = {"used_bytes": 30, "high_water_bytes": 60, "free_bytes": 10, "total_bytes": 40}
    cache, fs = charts.cache_bars(usage)
    assert (cache.width, cache.over) == (charts.BAR_WIDTH // 2, False)
    assert (fs.value, fs.limit, fs.width) == (30, 40, charts.BAR_WIDTH * 3 // 4)
    over = charts.cache_bars({**usage, "used_bytes": 90})[0]
    assert over.over and over.width == charts.BAR_WIDTH
    assert size(0) == "0 B" and size(1536) == "1.5 KiB" and size(None) == "\N{EN DASH}"


def test_openapi_names_the_session_cookie_and_the_csrf_refusal() -> None:
    doc = document()
    scheme = doc["components"]["securitySchemes"]["session"]
    assert (scheme["in"], scheme["name"]) == ("cookie", COOKIE)
    assert {"session": []} in doc["security"] and {"bearer": []} in doc["security"]
    pin = doc["paths"]["/v1/states/{ref}/pin"]
    for method in ("post", "delete"):
        assert "X-CSRF-Token" in pin[method]["responses"]["403"]["description"]
    # A read can be refused by a team role, never for a missing CSRF header.
    assert "CSRF" not in doc["paths"]["/v1/states"]["get"]["responses"]["403"]["description"]
