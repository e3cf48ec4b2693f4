"""liquibase.keep_every: on a plain-copy store (the tests' /tmp) a state every 10th changeset.

Each state there is a full copy of the data directory, so auto keeps every 10th changeset and
the last; the chain's ids stay the same, so appending builds only the new changesets and an
edit replays from the nearest kept state, and the plan and explain say which were not kept.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ProxyFactory, RunningProxy
from tests.integration.test_explain_misses import plan as alias_plan
from tests.integration.test_liquibase_build import events, jobs_of, needs_liquibase

pytestmark = [pytest.mark.integration, pytest.mark.liquibase, needs_liquibase]

N = 24  # changesets; each sleeps a little so the plan (a parallel run) arrives early on


def changelog(n: int, edited: int | None = None) -> str:
    parts = ["--liquibase formatted sql\n"]
    for i in range(1, n + 1):
        col = "y" if i == edited else "x"
        parts.append(
            f"--changeset ann:{i}\nselect pg_sleep(0.15);\ncreate table t{i} ({col} int);\n"
        )
    return "".join(parts)


async def tables(p: RunningProxy) -> dict[str, str]:
    # A fresh clone of the recipe's current state each time (a shared one keeps its data).
    conn = await asyncpg.connect(
        p.dsn("shop", options="-c taidon.isolation=connection"), timeout=300
    )
    try:
        rows = await conn.fetch(
            "select c.relname, a.attname from pg_class c join pg_attribute a"
            " on a.attrelid = c.oid and a.attnum = 1 where c.relname ~ '^t[0-9]+$'"
        )
        return {r[0]: r[1] for r in rows}
    finally:
        await conn.close()


async def test_plain_copy_keeps_every_tenth_changeset_and_reuses_the_chain(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    root = pg_dir / "lb"
    root.mkdir()
    log = root / "changelog.sql"
    log.write_text(changelog(N))
    recipe = {"prepare": {"kind": "lb", "search_path": str(root), "changelog": "changelog.sql"}}
    p = await make_proxy({"shop": recipe}, admin={"listen": "127.0.0.1:0"})
    assert not p.proxy.store.backend.capabilities.instant_clone  # a plain copy here
    assert await tables(p) == {f"t{i}": "x" for i in range(1, N + 1)}

    (first,) = jobs_of(p, "shop")
    kept = [m.split(" -> ")[0] for m in events(first, "snapshot") if "::" in m]
    skipped = [m for m in events(first, "progress") if "not kept" in m]
    assert kept[-1] == f"{N}::ann" and skipped, (kept, skipped)
    assert len(kept) + len(skipped) == N
    # Once the plan is known (it is, after the first few), only every 10th and the last.
    late = kept[len(kept) - len([k for k in kept if int(k.split("::")[0]) > 10]) :]
    assert all(int(k.split("::")[0]) % 10 == 0 or k == f"{N}::ann" for k in late), kept

    out = await alias_plan(p, "shop")
    steps = out["steps"]
    assert isinstance(steps, list) and len(steps) == N
    assert steps[-1]["cached"] and out["first_miss"] is None
    assert sum(not s["cached"] for s in steps) == len(skipped)

    # Appending runs only the new changesets, on the kept last state.
    log.write_text(changelog(N + 2))
    await p.proxy.reload()
    assert await tables(p) == {f"t{i}": "x" for i in range(1, N + 3)}
    second = [j for j in jobs_of(p, "shop") if j is not first][-1]
    assert next(m for m in events(second, "step.start") if "changeset" in m).startswith(
        f"changeset {N + 1}/{N + 2}"
    )

    # An edit of changeset 15 replays from the nearest kept state at or before 14, and the
    # plan's explanation names changeset 15, not the unkept steps before it.
    log.write_text(changelog(N + 2, edited=15))
    await p.proxy.reload()
    miss = (await alias_plan(p, "shop"))["first_miss"]
    assert isinstance(miss, dict)
    assert (miss["step"], miss["reason"]) == (15, "changed"), miss
    got = await tables(p)
    assert got["t15"] == "y" and got["t14"] == "x" and len(got) == N + 2
