"""Builds django recipes: Django's own migration plan, one `migrate <app> <name>` per state."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taidon_proxy.config import DjangoPrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare import provenance
from taidon_proxy.prepare.chain import ChainStep, build_chain, planned
from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.prepare.django import runner
from taidon_proxy.prepare.pytool import (
    RunnerAnswer,
    checkout_env,
    hash_field,
    read_input,
    run_runner,
    shown,
)
from taidon_proxy.prepare.toolrun import libpq_env
from taidon_proxy.runtimes.base import InstanceHandle

PLAN_TIMEOUT = 300.0
RUNNER = Path(runner.__file__)
# Planning connects to nothing; settings that read DATABASE_URL or PG* at import still find them.
PLAN_HOST = "/nonexistent/taidon-plans-without-a-server"
PLAN_PORT = 5432
USER = "postgres"


@dataclass(frozen=True)
class Migration:
    app: str
    name: str
    path: Path
    display: str  # the file relative to the recipe's directory, for messages

    @property
    def key(self) -> str:
        return f"{self.app}.{self.name}"


@dataclass(frozen=True)
class DjangoStep:
    migrations: tuple[Migration, ...]  # one (per: migration), or a run of one app's (per: app)
    chain: ChainStep

    @property
    def app(self) -> str:
        return self.migrations[0].app

    @property
    def target(self) -> str:
        """What `migrate <app> <target>` names: the step's last migration."""
        return self.migrations[-1].name

    def failing(self, key: str | None) -> Migration:
        """The migration the runner saw being applied, else the step's last."""
        return next((m for m in self.migrations if m.key == key), self.migrations[-1])


@dataclass(frozen=True)
class DjangoPlan:
    steps: list[DjangoStep]
    inputs: list[str]  # everything the fingerprint covers
    version: str


def group(migrations: Sequence[Migration], per: str) -> list[tuple[Migration, ...]]:
    """One step per migration, or per run of consecutive migrations of one app (per: app): a
    cross-app dependency splits an app's migrations into several steps, in Django's order."""
    if per == "migration":
        return [(m,) for m in migrations]
    runs: list[list[Migration]] = []
    for m in migrations:
        if runs and runs[-1][-1].app == m.app:
            runs[-1].append(m)
        else:
            runs.append([m])
    return [tuple(r) for r in runs]


def _display(path: Path, base: Path) -> str:
    """A migration file relative to the recipe; an installed app's as migrations/NAME.py."""
    rel = shown(path, base)
    return rel if rel != path.name else f"{path.parent.name}/{path.name}"


def hash_plan(prep: DjangoPrepare, base: Path, answer: dict[str, Any]) -> DjangoPlan:
    """Each step's hash: its migrations (app, name, file), the settings' files, the settings
    module's name, `pythonpath`, `per`, and Django's version (also in each state's label)."""
    version = str(answer["django_version"])
    settings_files = [Path(f) for f in answer["settings_files"]]
    common = hashlib.sha256()
    hash_field(common, "settings", prep.settings.encode())
    hash_field(common, "pythonpath", "\x00".join(shown(p, base) for p in prep.pythonpath).encode())
    for f in settings_files:
        hash_field(common, f"settings file {shown(f, base)}", read_input(f, base))
    hash_field(common, "per", prep.per.encode())
    hash_field(common, "django", version.encode())
    migrations = [
        Migration(str(m["app"]), str(m["name"]), Path(m["path"]), _display(Path(m["path"]), base))
        for m in answer["migrations"]
    ]
    steps = []
    for run in group(migrations, prep.per):
        h = common.copy()
        for m in run:
            hash_field(
                h, "migration", f"{m.app}\x00{m.name}\x00".encode() + read_input(m.path, base)
            )
        first, last = run[0], run[-1]
        name = (
            f"{first.key} {first.display}"
            if len(run) == 1
            else f"{first.key}..{last.name} ({len(run)} migrations)"
        )
        steps.append(DjangoStep(run, ChainStep(h.hexdigest(), name, f"{name} (Django {version})")))
    inputs = {str(prep.manage), str(answer["django_file"]), *(str(f) for f in settings_files)}
    inputs |= {str(m.path) for m in migrations}
    inputs |= {str(d) for d in answer["dirs"] if Path(d).is_dir()}  # a new migration file
    return DjangoPlan(steps, sorted(inputs), version)


def check_applied(steps: Sequence[DjangoStep], i: int, applied: Sequence[Sequence[str]]) -> None:
    """After step i, django_migrations must hold every planned migration up to it and none
    planned later: wrong content is never stored under a step's id."""
    done = {f"{app}.{name}" for app, name in applied}
    before = [m.key for s in steps[: i + 1] for m in s.migrations]
    later = [m.key for s in steps[i + 1 :] for m in s.migrations]
    step = steps[i]
    missing = [k for k in before if k not in done]
    if missing:
        raise BuildFailed(
            f"migrate {step.app} {step.target} left {', '.join(missing[:5])} unapplied"
            " (django_migrations has no row for it); nothing of this step is stored"
        )
    ahead = [k for k in later if k in done]
    if ahead:
        raise BuildFailed(
            f"migrate {step.app} {step.target} also applied {', '.join(ahead[:5])}, planned"
            " for later steps; nothing of this step is stored"
        )


class DjangoAdapter:
    """One subprocess plans, then one subprocess per pending step migrates the clone."""

    kind = "django"

    async def _call(
        self, ctx: BuildContext, what: str, args: dict[str, Any], *, host: str, port: int,
        deadline_s: float, stream: bool,
    ) -> RunnerAnswer:  # fmt: skip
        prep = ctx.recipe.prepare
        assert isinstance(prep, DjangoPrepare)
        db = {"host": host, "port": port, "name": ctx.database, "user": USER}
        common = {
            "project": str(prep.manage.parent),
            "settings": prep.settings,
            "db": db,
            "pythonpath": [str(p) for p in prep.pythonpath],
        }
        return await run_runner(
            RUNNER, what, {**common, **args},
            python=prep.python, cwd=prep.manage.parent,
            env={
                **libpq_env(host, port, ctx.database, USER),
                **checkout_env(ctx.checkout is not None),
            },
            deadline_s=deadline_s,
            on_line=(lambda line: ctx.job.emit("progress", line)) if stream else None,
        )  # fmt: skip

    async def _plan(self, ctx: BuildContext) -> DjangoPlan:
        prep = ctx.recipe.prepare
        assert isinstance(prep, DjangoPrepare)
        if not prep.manage.is_file():
            raise BuildFailed(f"django {shown(prep.manage, ctx.base_dir)}: no such file")
        answer = await self._call(
            ctx, "plan", {}, host=PLAN_HOST, port=PLAN_PORT, deadline_s=PLAN_TIMEOUT, stream=False
        )
        if answer.result is None or not answer.ok:
            err = answer.failure("django plan failed", ctx.base_dir, PLAN_TIMEOUT)
            files = answer.result.get("files") if answer.result else None
            err.inputs = [str(prep.manage), *(str(f) for f in files or [])]
            raise err
        return await asyncio.to_thread(hash_plan, prep, ctx.base_dir, answer.result)

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        p = await self._plan(ctx)
        return await planned(ctx, "django", [s.chain for s in p.steps])

    async def build(self, ctx: BuildContext) -> BuildResult:
        prep = ctx.recipe.prepare
        assert isinstance(prep, DjangoPrepare)
        p = await self._plan(ctx)

        async def migrate(i: int, handle: InstanceHandle) -> None:
            step = p.steps[i]
            answer = await self._call(
                ctx, "migrate", {"app": step.app, "name": step.target},
                host=str(handle.socket_dir), port=handle.port, deadline_s=prep.timeout, stream=True,
            )  # fmt: skip
            if answer.result is None or not answer.ok:
                m = step.failing(answer.result.get("migration") if answer.result else None)
                raise answer.failure(
                    f"migration {m.key} ({m.display}) failed", ctx.base_dir, prep.timeout
                )
            check_applied(p.steps, i, answer.result["applied"])

        def recorded(s: DjangoStep) -> ChainStep:
            rec = provenance.step(
                ctx, "django", p.version, migrations=[m.key for m in s.migrations],
                settings=prep.settings, files=provenance.files(ctx, [m.path for m in s.migrations]),
            )  # fmt: skip
            return dataclasses.replace(s.chain, record=rec)

        chain = await asyncio.to_thread(lambda: [recorded(s) for s in p.steps])
        noun = "migration" if prep.per == "migration" else "step"
        try:
            return await build_chain(
                ctx, "django", chain, migrate,
                noun=noun, inputs=p.inputs, log=f"Django {p.version}",
            )  # fmt: skip
        except BuildFailed as e:
            e.inputs = p.inputs
            raise
