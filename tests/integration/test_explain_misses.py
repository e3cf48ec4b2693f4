"""The plan says why it misses the cache: root, a changed file, a new step, an evicted state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from taidon_proxy.admin.auth import read_token
from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration


async def call(p: RunningProxy, method: str, path: str) -> Any:
    """One admin API call with the store's token; its JSON answer (200 required)."""
    assert p.proxy.admin is not None
    token = read_token(p.proxy.config.store)
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, f"http://{p.proxy.admin.address}{path}",
            headers={"Authorization": f"Bearer {token}"},
        ) as r,
    ):  # fmt: skip
        assert r.status == 200, await r.text()
        return await r.json()


async def plan(p: RunningProxy, alias: str = "a") -> dict[str, Any]:
    out: dict[str, Any] = await call(p, "GET", f"/v1/aliases/{alias}/plan")
    return out


async def build(p: RunningProxy) -> None:
    conn = await asyncpg.connect(p.dsn("a", options="-c taidon.isolation=connection"))
    await conn.close()


def set_files(p: RunningProxy, files: list[Path]) -> None:
    cfg = yaml.safe_load(p.config_path.read_text())
    cfg["databases"]["a"]["prepare"]["files"] = [str(f) for f in files]
    p.config_path.write_text(yaml.safe_dump(cfg))


async def test_the_first_miss_is_explained(make_proxy: ProxyFactory, pg_dir: Path) -> None:
    sql = pg_dir / "sql"
    sql.mkdir()
    f1, f2, f3 = (sql / f"0{i}.sql" for i in (1, 2, 3))
    f1.write_text("create table one (x int);\n")
    f2.write_text("create table two (x int);\n")
    f3.write_text("create table three (x int);\n")
    p = await make_proxy(
        {"a": {"prepare": {"kind": "psql", "files": [str(f1), str(f2), str(f3)]}}},
        admin={"listen": "127.0.0.1:0"},
    )
    miss = (await plan(p))["first_miss"]
    assert miss["step"] == 0 and miss["reason"] == "root"

    await build(p)
    built = await plan(p)
    assert built["first_miss"] is None and built["cached"] is True
    old_two = built["steps"][1]["state"]

    f2.write_text("create table two (x int, y int);\n")  # an edit of step 2
    miss = (await plan(p))["first_miss"]
    assert (miss["step"], miss["reason"], miss["label"]) == (2, "changed", "sql/02.sql")
    assert miss["nearest"] == old_two and "sql/02.sql changed since state" in miss["message"]

    f2.write_text("create table two (x int);\n")  # back as it was: cached again
    assert (await plan(p))["first_miss"] is None

    extra = sql / "015.sql"
    extra.write_text("create table extra (x int);\n")
    set_files(p, [f1, extra, f2, f3])
    await p.proxy.reload()
    miss = (await plan(p))["first_miss"]
    assert (miss["step"], miss["reason"]) == (2, "new_step")
    assert "sql/015.sql is new at step 2" in miss["message"] and "sql/02.sql" in miss["message"]

    set_files(p, [f1, f2, f3])
    await p.proxy.reload()
    leaf = (await plan(p))["steps"][2]["state"]
    await call(p, "DELETE", f"/v1/states/{leaf}")
    miss = (await plan(p))["first_miss"]
    assert (miss["step"], miss["reason"]) == (3, "evicted")

    f3.write_text("create table three (x int, z int);\n")  # step 3 edited after its eviction
    miss = (await plan(p))["first_miss"]
    assert (miss["step"], miss["reason"]) == (3, "changed")  # the evicted state had its label
