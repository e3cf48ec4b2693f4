"""The instances table: one STATE column (the state id), one STATUS column, kept clones."""

from __future__ import annotations

import re
from typing import Any

import pytest

from taidon_proxy.cli import render

pytestmark = pytest.mark.unit

SID = "3f2a9c" + "0" * 58
NEW = "7b7b7b" + "0" * 58


def view(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "i-000000000001", "key": "shop:default", "alias": "shop", "label": "default",
        "state": SID, "isolation": "shared", "status": "running", "connections": 1,
        "age_seconds": 90.0, "idle_seconds": 0.0, "retention_seconds": 7 * 86400,
        "expires_in_seconds": None, "recipe_state": SID, "recipe_current": True,
    }  # fmt: skip
    return {**base, **kw}


def rows(capsys: pytest.CaptureFixture[str], views: list[dict[str, Any]]) -> list[list[str]]:
    """The table's lines as cells (title and rule lines left out)."""
    render.instances_table(views)
    lines = capsys.readouterr().out.splitlines()
    bars = re.compile("[│┃]")
    return [[c.strip() for c in bars.split(line)] for line in lines if bars.search(line)]


def test_header_has_one_state_column_and_a_status(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    header = rows(capsys, [view()])[0]
    assert header == [
        "ID", "ALIAS:LABEL", "ISOLATION", "STATE", "STATUS", "CONN", "AGE", "IDLE", "KEPT",
    ]  # fmt: skip


def test_stopped_spare_state_routes_and_a_recipe_that_moved_on(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    out = rows(
        capsys,
        [
            view(id="i-run"),
            view(id="i-stopped", key="shop:dev", label="dev", status="stopped", connections=0,
                 idle_seconds=3600.0, expires_in_seconds=6 * 86400 + 3600.0),
            view(id="i-old", key="shop:old", label="old", status="stopped", connections=0,
                 recipe_state=NEW, recipe_current=False, expires_in_seconds=60.0),
            view(id="i-spare", key=f"spare:shop:{SID}", label=None, isolation="connection",
                 status="spare", connections=0, retention_seconds=None),
            view(id="i-state", key=f"state:{SID}:x", label="x", recipe_current=None),
            view(id="i-forever", key="shop:f", label="f", retention_seconds=None),
        ],
    )  # fmt: skip
    line = {r[0]: r for r in out[1:]}
    assert line["i-run"][1:6] == ["shop:default", "shared", SID[:12], "running", "1"]
    assert line["i-run"][-1] == "7d00h idle"
    assert line["i-stopped"][4] == "stopped" and line["i-stopped"][-1] == "6d01h left"
    assert line["i-old"][3] == f"{SID[:12]} (recipe moved on)"
    assert line["i-spare"][1:5] == ["shop", "connection", SID[:12], "spare"]
    assert line["i-spare"][-1] == "-"
    assert line["i-state"][1] == f"state:{SID[:12]}:x"
    assert line["i-forever"][-1] == "forever"
