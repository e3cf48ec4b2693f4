"""Pure pieces of the admin API and CLI: prefix lookup, error → exit code, OpenAPI shape."""

from __future__ import annotations

import pytest

from taidon_proxy.admin.errors import from_domain
from taidon_proxy.admin.openapi import OPERATIONS, document
from taidon_proxy.cli.errors import EXIT_AUTH, EXIT_CONFLICT, EXIT_NOT_FOUND, api_failure
from taidon_proxy.cli.render import duration, size
from taidon_proxy.services import Refusal
from taidon_proxy.services.lookup import unique

pytestmark = pytest.mark.unit


def test_unique_prefix_rules() -> None:
    ids = ["i-abc1", "i-abc2", "i-def"]
    assert unique("instance", "i-def", ids) == "i-def"
    assert unique("instance", "i-d", ids) == "i-def"
    with pytest.raises(Refusal) as e:
        unique("instance", "i-abc", ids)
    assert e.value.code == "ambiguous" and e.value.extra["candidates"] == ["i-abc1", "i-abc2"]
    assert from_domain(e.value).status == 409
    with pytest.raises(Refusal) as e:
        unique("instance", "x", ids)
    assert e.value.code == "not_found" and from_domain(e.value).status == 404
    with pytest.raises(Refusal):
        unique("instance", "", ids)  # an empty prefix never matches everything


def test_api_errors_become_exit_codes_with_candidates() -> None:
    err = api_failure(
        409, {"code": "ambiguous", "message": "prefix is ambiguous", "candidates": ["a1", "a2"]}
    )
    assert err.exit_code == EXIT_CONFLICT and err.message.endswith("candidates: a1, a2")
    assert api_failure(404, {"message": "x"}).exit_code == EXIT_NOT_FOUND
    assert api_failure(401, {"message": "x"}).exit_code == EXIT_AUTH


def test_openapi_operations_are_unique_and_documented() -> None:
    doc = document()
    keys = [(m, p) for m, p, *_ in OPERATIONS]
    assert len(keys) == len(set(keys))
    op_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids))
    snap = doc["paths"]["/v1/snapshots"]["post"]["requestBody"]["content"]["application/json"]
    assert set(snap["schema"]["required"]) == {"instance", "name"}


def test_human_sizes_and_durations() -> None:
    assert size(0) == "0" and size(512) == "512 B" and size(3 * 2**20) == "3.0 MiB"
    assert duration(5.25) == "5.2s" and duration(125) == "2m05s" and duration(7200) == "2h00m"


def test_jobs_table_shows_a_queued_jobs_place(capsys: pytest.CaptureFixture[str]) -> None:
    from taidon_proxy.cli.render import jobs_table

    base = {"alias": "shop", "started": 0.0, "finished": None, "target": None, "steps": []}
    jobs_table(
        [
            {**base, "id": "j-1", "status": "queued",
             "queue": {"state": "queued", "position": 1, "priority": "ci", "team": "payments"}},
            {**base, "id": "j-2", "status": "running",
             "queue": {"state": "running", "position": None, "priority": "interactive",
                       "team": None}},
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "queued #1 (ci, team payments)" in out
    assert "running" in out and "queued #None" not in out
