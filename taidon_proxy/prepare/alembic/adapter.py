"""Builds alembic recipes: plan with Alembic's ScriptDirectory, one `upgrade <rev>` per state."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taidon_proxy.config import AlembicPrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare import provenance
from taidon_proxy.prepare.alembic import runner
from taidon_proxy.prepare.chain import ChainStep, build_chain, planned
from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.prepare.pytool import (
    RunnerAnswer,
    checkout_env,
    hash_field,
    read_input,
    run_runner,
    shown,
)
from taidon_proxy.prepare.toolrun import server_env
from taidon_proxy.runtimes.base import InstanceHandle

PLAN_TIMEOUT = 300.0
RUNNER = Path(runner.__file__)


@dataclass(frozen=True)
class Revision:
    id: str
    path: Path
    display: str  # relative to the recipe's base directory, for messages
    step_hash: str

    @property
    def step(self) -> ChainStep:
        name = f"{self.id} {self.display}"
        return ChainStep(self.step_hash, name, name)


@dataclass(frozen=True)
class AlembicPlan:
    revisions: list[Revision]
    inputs: list[str]  # everything the fingerprint covers
    version: str
    env_files: list[Path]  # env.py and the lock file, in every revision's hash


class AlembicAdapter:
    """One subprocess plans, then one subprocess per pending revision upgrades the clone."""

    kind = "alembic"

    async def _call(
        self, ctx: BuildContext, prep: AlembicPrepare, what: str, args: dict[str, Any],
        *, env: dict[str, str], deadline_s: float, stream: bool,
    ) -> RunnerAnswer:  # fmt: skip
        return await run_runner(
            RUNNER, what, {"config": str(prep.config), "x": prep.x, **args},
            python=prep.python, cwd=prep.config.parent,
            env={**env, **checkout_env(ctx.checkout is not None)}, deadline_s=deadline_s,
            on_line=(lambda line: ctx.job.emit("progress", line)) if stream else None,
        )  # fmt: skip

    async def _plan(self, ctx: BuildContext) -> AlembicPlan:
        prep = ctx.recipe.prepare
        assert isinstance(prep, AlembicPrepare)
        if not prep.config.is_file():
            raise BuildFailed(f"alembic config {shown(prep.config, ctx.base_dir)}: no such file")
        answer = await self._call(
            ctx, prep, "plan", {"target": prep.target}, env={},
            deadline_s=PLAN_TIMEOUT, stream=False,
        )  # fmt: skip
        if answer.result is None or not answer.ok:
            err = answer.failure("alembic plan failed", ctx.base_dir, PLAN_TIMEOUT)
            err.inputs = [str(prep.config)]
            raise err
        return await asyncio.to_thread(_hash_plan, prep, ctx.base_dir, answer.result)

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        p = await self._plan(ctx)
        return await planned(ctx, "alembic", [r.step for r in p.revisions])

    async def build(self, ctx: BuildContext) -> BuildResult:
        prep = ctx.recipe.prepare
        assert isinstance(prep, AlembicPrepare)
        p = await self._plan(ctx)

        async def upgrade(i: int, handle: InstanceHandle) -> None:
            r = p.revisions[i]
            url = (
                f"postgresql+psycopg://postgres@/{ctx.database}"
                f"?host={handle.socket_dir}&port={handle.port}"
            )
            answer = await self._call(
                ctx, prep, "upgrade", {"revision": r.id, "url": url},
                env=server_env(handle, ctx.database), deadline_s=prep.timeout, stream=True,
            )  # fmt: skip
            if not answer.ok:
                raise answer.failure(
                    f"revision {r.id} ({r.display}) failed", ctx.base_dir, prep.timeout
                )

        common = [prep.config, *p.env_files]

        def recorded(r: Revision) -> ChainStep:
            rec = provenance.step(
                ctx, "alembic", p.version, revision=r.id,
                files=provenance.files(ctx, [r.path, *common]),
                x=[provenance.value_hash("x", a) for a in prep.x],
            )  # fmt: skip
            return dataclasses.replace(r.step, record=rec)

        chain = await asyncio.to_thread(lambda: [recorded(r) for r in p.revisions])
        try:
            return await build_chain(
                ctx, "alembic", chain, upgrade,
                noun="revision", inputs=p.inputs, log=f"alembic {p.version}",
            )  # fmt: skip
        except BuildFailed as e:
            e.inputs = p.inputs
            raise


def _hash_plan(prep: AlembicPrepare, base: Path, answer: dict[str, Any]) -> AlembicPlan:
    """Each revision's hash: its file, env.py, the -x arguments, Alembic's version, the lock."""
    version = str(answer["alembic_version"])
    env_py = Path(answer["env_py"])
    common = hashlib.sha256()
    for label, path in (("env.py", env_py), ("lock", prep.lock)):
        if path is not None:
            hash_field(common, label, read_input(path, base))
    hash_field(common, "x", "\x00".join(prep.x).encode())
    hash_field(common, "alembic", version.encode())
    revisions = []
    for r in answer["revisions"]:
        path = Path(r["path"])
        h = common.copy()
        hash_field(h, "revision", str(r["id"]).encode() + b"\x00" + read_input(path, base))
        revisions.append(Revision(str(r["id"]), path, shown(path, base), h.hexdigest()))
    inputs = {str(prep.config), str(env_py), *(str(r.path) for r in revisions)}
    inputs |= {str(d) for d in answer["dirs"] if Path(d).is_dir()}  # a new revision file
    if prep.lock is not None:
        inputs.add(str(prep.lock))
    env_files = [env_py] if prep.lock is None else [env_py, prep.lock]
    return AlembicPlan(revisions, sorted(inputs), version, env_files)
