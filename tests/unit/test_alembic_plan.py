"""The alembic plan: Alembic's own graph walk (order, heads, cycles) and what each hash covers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taidon_proxy.config import AlembicPrepare
from taidon_proxy.prepare.alembic import runner
from taidon_proxy.prepare.alembic.adapter import _hash_plan

pytestmark = pytest.mark.unit

REV = "revision = {rev!r}\ndown_revision = {down!r}\n\ndef upgrade():\n    pass\n"


def project(base: Path, graph: dict[str, Any]) -> Path:
    (base / "m/versions").mkdir(parents=True)
    (base / "m/env.py").write_text("# env\n")
    for rev, down in graph.items():
        (base / f"m/versions/{rev}.py").write_text(REV.format(rev=rev, down=down))
    ini = base / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/m\n")
    return ini


def plan(ini: Path, target: str = "heads") -> dict[str, Any]:
    return runner.plan({"config": str(ini), "x": [], "target": target})


def test_branches_and_merges_come_in_upgrade_order(tmp_path: Path) -> None:
    graph = {"a": None, "b1": "a", "c1": "a", "b2": "b1", "m": ("b2", "c1"), "z": "m"}
    order = [r["id"] for r in plan(project(tmp_path, graph))["revisions"]]
    assert sorted(order) == sorted(graph)
    for rev, down in graph.items():  # every revision after everything it depends on
        for parent in (down,) if isinstance(down, str) else (down or ()):
            assert order.index(parent) < order.index(rev), order


def test_several_heads_are_named_when_one_head_is_asked_for(tmp_path: Path) -> None:
    ini = project(tmp_path, {"a": None, "b": "a", "c": "a"})
    with pytest.raises(LookupError, match="several heads: b, c"):
        plan(ini, "head")
    assert {r["id"] for r in plan(ini, "heads")["revisions"]} == {"a", "b", "c"}


def test_a_cycle_is_refused_by_alembic(tmp_path: Path) -> None:
    ini = project(tmp_path, {"a": None, "b": ("a", "c"), "c": "b"})
    with pytest.raises(Exception, match=r"(?i)cycl"):
        plan(ini)


def test_an_edit_changes_that_revisions_hash_only_and_x_changes_all(tmp_path: Path) -> None:
    ini = project(tmp_path, {"a": None, "b": "a", "c": "b"})
    prep = AlembicPrepare(kind="alembic", config=ini)
    first = [r.step_hash for r in _hash_plan(prep, tmp_path, plan(ini)).revisions]
    (tmp_path / "m/versions/b.py").write_text(REV.format(rev="b", down="a") + "# edited\n")
    edited = [r.step_hash for r in _hash_plan(prep, tmp_path, plan(ini)).revisions]
    assert edited[0] == first[0] and edited[1] != first[1] and edited[2] == first[2]
    other_x = AlembicPrepare(kind="alembic", config=ini, x=["tenant=b"])
    with_x = [r.step_hash for r in _hash_plan(other_x, tmp_path, plan(ini)).revisions]
    assert all(h not in edited for h in with_x)
