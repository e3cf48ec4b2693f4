"""State ids: deterministic, length-prefixed, chained so a change moves only what follows it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from taidon_proxy.config import PsqlPrepare
from taidon_proxy.prepare.psql import plan_steps
from taidon_proxy.store.ids import (
    ID_LEN,
    canonical,
    digest,
    initdb_state_id,
    step_state_id,
)

pytestmark = pytest.mark.unit


def test_digest_is_sha256_over_length_prefixed_fields() -> None:
    expected = hashlib.sha256(
        (1).to_bytes(8, "big") + b"a" + (2).to_bytes(8, "big") + b"bc"
    ).hexdigest()
    assert digest("a", "bc") == expected
    assert len(expected) == ID_LEN


def test_field_boundaries_matter() -> None:
    assert digest("ab", "c") != digest("a", "bc")
    assert digest("a", "") != digest("a")
    assert digest("x") == digest(b"x")


def test_canonical_is_order_independent() -> None:
    assert canonical({"a": "1", "b": "2"}) == canonical({"b": "2", "a": "1"})
    assert canonical({"a": "1"}) != canonical({"a": "2"})


def test_known_ids_are_stable() -> None:
    # Equal inputs give equal ids on any machine: pin one value so a change is noticed.
    init = initdb_state_id("15.18", "host", {"encoding": "UTF8", "locale": "C.UTF-8"})
    assert init == digest("initdb", "15.18", "host", "encoding=UTF8\x00locale=C.UTF-8")


def test_engine_and_settings_are_part_of_the_id() -> None:
    base = initdb_state_id("15.18", "host", {"encoding": "UTF8"})
    assert base != initdb_state_id("15.19", "host", {"encoding": "UTF8"})
    assert base != initdb_state_id("15.18", "docker:img@sha256:1", {"encoding": "UTF8"})
    assert base != initdb_state_id("15.18", "host", {"encoding": "LATIN1"})


def test_a_changed_step_moves_itself_and_what_follows_never_what_precedes() -> None:
    root = digest("root")

    def chain(hashes: list[str]) -> list[str]:
        ids, parent = [], root
        for h in hashes:
            parent = step_state_id(parent, "psql", h)
            ids.append(parent)
        return ids

    a = chain(["h1", "h2", "h3", "h4"])
    b = chain(["h1", "h2", "CHANGED", "h4"])
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]
    assert chain(["h1", "h2", "h3", "h4"]) == a
    # The step kind is part of the id: the same hash from another tool is another state.
    assert step_state_id(root, "psql", "h1") != step_state_id(root, "lb", "h1")


def test_psql_step_hash_covers_includes_and_variables(tmp_path: Path) -> None:
    (tmp_path / "inc.sql").write_text("select 1;\n")
    (tmp_path / "main.sql").write_text("\\ir inc.sql\nselect 2;\n")
    (tmp_path / "other.sql").write_text("select 3;\n")
    prep = PsqlPrepare(kind="psql", files=[tmp_path / "main.sql", tmp_path / "other.sql"])
    first = plan_steps(prep, tmp_path)
    assert [s.display for s in first] == ["main.sql", "other.sql"]
    assert set(first[0].inputs) == {tmp_path / "main.sql", tmp_path / "inc.sql"}
    (tmp_path / "inc.sql").write_text("select 10;\n")
    second = plan_steps(prep, tmp_path)
    assert second[0].step_hash != first[0].step_hash
    assert second[1].step_hash == first[1].step_hash
    with_vars = plan_steps(prep.model_copy(update={"variables": {"v": "1"}}), tmp_path)
    assert with_vars[1].step_hash != second[1].step_hash
    # Content, not location: the same files elsewhere hash the same.
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("inc.sql", "main.sql", "other.sql"):
        (moved / f).write_bytes((tmp_path / f).read_bytes())
    prep_moved = PsqlPrepare(kind="psql", files=[moved / "main.sql", moved / "other.sql"])
    assert [s.step_hash for s in plan_steps(prep_moved, moved)] == [s.step_hash for s in second]
