"""Builds alembic recipes: plan with Alembic's ScriptDirectory, one `upgrade <rev>` per state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taidon_proxy.config import AlembicPrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare.alembic import runner
from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.prepare.toolrun import run_tool, server_env
from taidon_proxy.store.ids import step_state_id

PLAN_TIMEOUT = 300.0
RUNNER = Path(runner.__file__)
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH")


@dataclass(frozen=True)
class Revision:
    id: str
    path: Path
    display: str  # relative to the recipe's base directory, for messages
    step_hash: str


@dataclass(frozen=True)
class AlembicPlan:
    revisions: list[Revision]
    inputs: list[str]  # everything the fingerprint covers
    version: str


class AlembicAdapter:
    """One subprocess plans, then one subprocess per pending revision upgrades the clone."""

    kind = "alembic"

    def _python(self, prep: AlembicPrepare) -> str:
        return str(prep.python) if prep.python is not None else sys.executable

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        return {**env, "PYTHONUNBUFFERED": "1", **extra}

    async def _call(
        self, ctx: BuildContext, prep: AlembicPrepare, what: str, args: dict[str, Any],
        *, env: dict[str, str], deadline_s: float, stream: bool,
    ) -> tuple[dict[str, Any] | None, list[str], int | None]:  # fmt: skip
        answer: dict[str, Any] | None = None
        lines: list[str] = []

        def on_line(line: str) -> None:
            nonlocal answer
            if line.startswith(runner.MARK):
                answer = json.loads(line.removeprefix(runner.MARK))
                return
            lines.append(line)
            if stream:
                ctx.job.emit("progress", line)

        base = {"config": str(prep.config), "x": prep.x, **args}
        argv = [self._python(prep), str(RUNNER), what, json.dumps(base)]
        try:
            res = await run_tool(
                argv, cwd=prep.config.parent, env=self._env(env),
                deadline_s=deadline_s, on_line=on_line,
            )  # fmt: skip
        except OSError as e:
            raise BuildFailed(f"cannot run {argv[0]}: {e.strerror}") from None
        return answer, lines, res.returncode

    async def _plan(self, ctx: BuildContext) -> AlembicPlan:
        prep = ctx.recipe.prepare
        assert isinstance(prep, AlembicPrepare)
        if not prep.config.is_file():
            raise BuildFailed(f"alembic config {_rel(prep.config, ctx.base_dir)}: no such file")
        answer, lines, rc = await self._call(
            ctx, prep, "plan", {"target": prep.target}, env={},
            deadline_s=PLAN_TIMEOUT, stream=False,
        )  # fmt: skip
        if answer is None or "error" in answer:
            why = answer["error"] if answer else (lines[-1] if lines else f"exit {rc}")
            err = BuildFailed(
                _scrub(f"alembic plan failed: {why}", ctx.base_dir),
                detail=_scrub("\n".join(lines[-20:]), ctx.base_dir) or None,
            )
            err.inputs = [str(prep.config)]
            raise err
        return await asyncio.to_thread(_hash_plan, prep, ctx.base_dir, answer)

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        p = await self._plan(ctx)
        planned, parent = [], ctx.root_state
        for r in p.revisions:
            parent = step_state_id(parent, "alembic", r.step_hash)
            planned.append(PlannedStep(parent, f"{r.id} {r.display}", await ctx.has_state(parent)))
        return planned

    async def build(self, ctx: BuildContext) -> BuildResult:
        prep = ctx.recipe.prepare
        assert isinstance(prep, AlembicPrepare)
        p = await self._plan(ctx)
        try:
            return await self._build(ctx, prep, p)
        except BuildFailed as e:
            e.inputs = p.inputs
            raise

    async def _build(self, ctx: BuildContext, prep: AlembicPrepare, p: AlembicPlan) -> BuildResult:
        ids, parent = [], ctx.root_state
        for r in p.revisions:
            parent = step_state_id(parent, "alembic", r.step_hash)
            ids.append(parent)
        if not ids:
            return BuildResult(ctx.root_state, p.inputs)
        # Deepest cached prefix: an edited revision k reuses states 1..k-1.
        start = 0
        for i in range(len(ids) - 1, -1, -1):
            if await ctx.has_state(ids[i]):
                start = i + 1
                break
        if start == len(ids):
            ctx.job.emit("progress", f"all {len(ids)} revisions cached")
            return BuildResult(ids[-1], p.inputs)
        ctx.job.emit("log", f"alembic {p.version}")
        session = await ctx.open_session(ids[start - 1] if start else ctx.root_state)
        try:
            for i in range(start, len(ids)):
                r = p.revisions[i]
                n = len(ids)
                ctx.job.emit("step.start", f"applying revision {r.id} {r.display} ({i + 1}/{n})")
                session.begin_step()
                handle = await session.start()
                env = server_env(handle, ctx.database)
                url = (
                    f"postgresql+psycopg://postgres@/{ctx.database}"
                    f"?host={handle.socket_dir}&port={handle.port}"
                )
                answer, lines, rc = await self._call(
                    ctx, prep, "upgrade", {"revision": r.id, "url": url}, env=env,
                    deadline_s=prep.timeout, stream=True,
                )  # fmt: skip
                if answer is None or "error" in answer:
                    if rc is None:
                        why = f"timed out after {prep.timeout:g}s"
                    else:
                        why = answer["error"] if answer else (lines[-1] if lines else f"exit {rc}")
                    raise BuildFailed(
                        _scrub(f"revision {r.id} ({r.display}) failed: {why}", ctx.base_dir),
                        detail=_scrub("\n".join(lines[-20:]), ctx.base_dir) or None,
                    )
                await session.commit("alembic", r.step_hash, f"{r.id} {r.display}")
        finally:
            await session.close()
        return BuildResult(ids[-1], p.inputs)


def _hash_plan(prep: AlembicPrepare, base: Path, answer: dict[str, Any]) -> AlembicPlan:
    """Each revision's hash: its file, env.py, the -x arguments, Alembic's version, the lock."""
    version = str(answer["alembic_version"])
    env_py = Path(answer["env_py"])
    common = hashlib.sha256()
    for label, path in (("env.py", env_py), ("lock", prep.lock)):
        if path is not None:
            common.update(f"\x00{label}\x00".encode() + _read(path, base))
    common.update(b"\x00x\x00" + "\x00".join(prep.x).encode())
    common.update(b"\x00alembic\x00" + version.encode())
    revisions = []
    for r in answer["revisions"]:
        path = Path(r["path"])
        h = common.copy()
        h.update(b"\x00revision\x00" + str(r["id"]).encode() + b"\x00" + _read(path, base))
        revisions.append(Revision(str(r["id"]), path, _rel(path, base), h.hexdigest()))
    inputs = {str(prep.config), str(env_py), *(str(r.path) for r in revisions)}
    inputs |= {str(d) for d in answer["dirs"] if Path(d).is_dir()}  # a new revision file
    if prep.lock is not None:
        inputs.add(str(prep.lock))
    return AlembicPlan(revisions, sorted(inputs), version)


def _read(path: Path, base: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BuildFailed(f"cannot read {_rel(path, base)}: {e.strerror}") from None


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base))
    except ValueError:
        return p.name


def _scrub(text: str, base: Path) -> str:
    """Clients see paths relative to the recipe, never the host's layout."""
    return text.replace(f"{base}{os.sep}", "").replace(str(base), ".")
