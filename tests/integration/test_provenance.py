"""Provenance: every input that made a state, recorded at its build (real git repository, real
psql and Liquibase builds), read through the admin API, and carried by a bundle."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import ProxyFactory, RunningProxy
from tests.git_repo import git, make_repo, recipe
from tests.integration.bundle_support import ADMIN, Api, split
from tests.integration.test_liquibase_build import copy_project, lb_recipe, needs_liquibase

pytestmark = pytest.mark.integration
SECRET = "hunter2-very-secret"


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def connect_once(p: RunningProxy, database: str) -> None:
    conn = await asyncpg.connect(p.dsn(database), timeout=120)
    await conn.close()


def blob(repo: Path, spec: str) -> str:
    return git(repo, "rev-parse", spec)


async def test_a_state_built_at_a_ref_names_its_files_commit_and_tools(
    make_proxy: ProxyFactory, pg_dir: Path, http: aiohttp.ClientSession
) -> None:
    ids = make_repo(pg_dir)
    (pg_dir / "token").write_text(SECRET + "\n")
    r = recipe(pg_dir)
    r["prepare"]["variables"] = {"owner": "app", "token": "${file:token}"}
    a = await make_proxy({"r": r}, admin=ADMIN)
    await connect_once(a, "r@feature")
    api = Api(a, http)
    _, key = await api.get("/v1/aliases/r/key?ref=feature")
    status, prov = await api.get(f"/v1/states/{key['key'][:12]}/provenance")
    assert status == 200, prov
    assert SECRET not in str(prov)
    assert prov["state"] == key["key"] and prov["alias"] == "r" and prov["complete"] is True
    assert prov["engine"]["version"].startswith("15.") and prov["engine"]["source"] == "host"
    assert prov["initdb_settings"] == {"encoding": "UTF8", "locale": "C.UTF-8", "wal_segsize": "1"}
    assert prov["backend"] == "copy"
    assert [s["kind"] for s in prov["steps"]] == ["initdb", "root", "psql", "psql"]
    assert prov["steps"][1]["record"]["database"] == "r"
    first, second = (s["record"] for s in prov["steps"][2:])
    assert first["source"] == "git" and first["ref"] == "feature"
    assert first["commit"] == ids["feature"] and first["tool"] == "psql"
    assert first["tool_version"].startswith("psql (PostgreSQL) 15.")
    # The file and the file it includes, with the blob ids git has for them at that commit.
    assert [(f["path"], f["blob"], f["commit"]) for f in first["files"]] == [
        ("sql/01_schema.sql", blob(pg_dir, "feature:sql/01_schema.sql"), ids["feature"]),
        ("sql/inc/types.sql", blob(pg_dir, "feature:sql/inc/types.sql"), ids["feature"]),
    ]
    data = git(pg_dir, "show", "feature:sql/02_tables.sql").encode() + b"\n"
    assert second["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert second["files"][0]["blob"] == blob(pg_dir, "feature:sql/02_tables.sql")
    # Variables as hashes only; the one read from a file changes with it, never shown.
    assert set(second["variables"]) == {"owner", "token"}
    assert all(v.startswith("sha256:") for v in second["variables"].values())

    # The work tree's state (uncommitted change) says it was read from the work tree.
    await connect_once(a, "r")
    _, key_wt = await api.get("/v1/aliases/r/key")
    _, prov_wt = await api.get(f"/v1/states/{key_wt['key']}/provenance")
    assert prov_wt["steps"][-1]["record"]["source"] == "work tree"
    assert "commit" not in prov_wt["steps"][-1]["record"]["files"][0]
    # Its first state is feature's (the same content): the first build's record is kept.
    assert prov_wt["steps"][2]["record"]["ref"] == "feature"

    # A bundle carries it: the importing store answers with the same records.
    exported = await api.export(key["key"])
    manifest, _ = split(exported)
    assert set(manifest["provenance"]) == {k["id"] for k in manifest["chain"]}
    b = await make_proxy({"r": recipe(pg_dir)}, admin=ADMIN)
    api_b = Api(b, http)
    status, out = await api_b.import_(exported)
    assert status == 200 and out["imported"], out
    _, prov_b = await api_b.get(f"/v1/states/{key['key']}/provenance")
    assert prov_b["steps"] == prov["steps"] and prov_b["engine"] == prov["engine"]

    status, err = await api.get("/v1/states/ffffffffffff/provenance")
    assert status == 404 and "ffffffffffff" in err["error"]["message"]


@pytest.mark.liquibase
@needs_liquibase
async def test_liquibase_changesets_with_checksums_contexts_and_hashed_parameters(
    make_proxy: ProxyFactory, pg_dir: Path, http: aiohttp.ClientSession
) -> None:
    project = copy_project(pg_dir)
    r = lb_recipe(project, parameters={"greeting": "hello", "pw": SECRET},
                  secret_parameters=["pw"])  # fmt: skip
    p = await make_proxy({"shop": r}, admin=ADMIN)
    await connect_once(p, "shop")
    api = Api(p, http)
    _, key = await api.get("/v1/aliases/shop/key")
    _, prov = await api.get(f"/v1/states/{key['key']}/provenance")
    assert SECRET not in str(prov)
    lb = [s["record"] for s in prov["steps"] if s["kind"] == "lb"]
    conn = await asyncpg.connect(p.dsn("shop"))
    try:
        rows = await conn.fetch(
            "select id, author, filename, md5sum from databasechangelog order by orderexecuted"
        )
    finally:
        await conn.close()
    assert [
        (c["id"], c["author"], c["filename"], c["checksum"]) for c in (x["changeset"] for x in lb)
    ] == [tuple(r) for r in rows]
    assert len(lb) == len(rows) >= 3
    assert all(x["tool"] == "liquibase" and x["tool_version"].startswith("4.") for x in lb)
    assert lb[0]["contexts"] == "dev" and lb[0]["source"] == "work tree"
    assert set(lb[0]["parameters"]) == {"greeting", "pw"}
    master = (project / "db" / "master.xml").read_bytes()
    assert lb[0]["files"][0]["path"] == "proj/db/master.xml"  # from the config's directory
    assert lb[0]["files"][0]["sha256"] == hashlib.sha256(master).hexdigest()
