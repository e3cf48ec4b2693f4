"""What the recipe-kind tests ask of a running proxy: its builder, an alias's jobs, the steps a
job ran, rows through a real client."""

from __future__ import annotations

from typing import Any

import asyncpg

from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.jobs import Job
from tests.conftest import RunningProxy


def builder(p: RunningProxy) -> StateBuilder:
    assert p.proxy.builder is not None
    return p.proxy.builder


def jobs(p: RunningProxy, alias: str) -> list[Job]:
    return [j for j in builder(p).jobs.values() if j.alias == alias]


def steps_run(job: Job) -> list[str]:
    """The first word of each step a job applied ("applying r3a migrations/… (1/6)" → r3a)."""
    return [e.message.split()[1] for e in job.events if e.kind == "step.start"]


async def fetch(p: RunningProxy, database: str, sql: str) -> list[Any]:
    """Rows of one query over asyncpg, as tuples."""
    conn = await asyncpg.connect(p.dsn(database))
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()
