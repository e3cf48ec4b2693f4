"""Recipes of kind lb: one Liquibase run per prepare, a state at every changeset commit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from taidon_proxy.config import Config, LiquibasePrepare
from taidon_proxy.errors import BuildFailed, ConfigError
from taidon_proxy.prepare import provenance
from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.prepare.liquibase.inputs import (
    changeset_file,
    collect_inputs,
    find_changelog,
    liquibase_version,
)
from taidon_proxy.prepare.liquibase.launcher import (
    RUN_TIMEOUT,
    UPDATE_JAVA_OPTS,
    ClassArchive,
    Masker,
    Outcome,
    check_parameters,
    error_text,
    find_launcher,
    global_args,
    kill,
    recipe_args,
    run_liquibase,
)
from taidon_proxy.prepare.liquibase.plan import (
    STEP_KIND,
    ChangeSet,
    chain,
    liquibase_plan,
    step_hash,
)
from taidon_proxy.prepare.liquibase.relay import BoundaryRelay
from taidon_proxy.prepare.session import WorkSession
from taidon_proxy.runtimes.connect import connect
from taidon_proxy.store.ids import digest
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.states import StateStore

SECRET = "(secret)"  # what a secret parameter's value reads as in output
log = structlog.get_logger("taidon.prepare.liquibase")

BOUNDARY_TIMEOUT = 120.0
# A live state starts with crash recovery from the last checkpoint: replaying 1 MB of WAL takes
# ~8 ms here. A boundary checkpoints when more WAL than this was written since the last one, and
# always at the last changeset (the state clients use most), so no state replays more.
CHECKPOINT_AFTER_WAL = 4 << 20
# `liquibase.keep_every: auto` on a plain-copy store: each state is a full copy of the data
# directory (7x one plain run at a state per changeset, 100 changesets), so keep every 10th;
# an edit then replays at most 9 changesets more than on a copy-on-write store.
PLAIN_COPY_KEEP_EVERY = 10
# One round trip per boundary: the lock row as a finished `liquibase update` leaves it (states
# are taken mid-run), the newest changelog row (checked against the plan) and the WAL written
# since the last checkpoint's redo point.
_BOUNDARY_QUERY = (
    "WITH unlock AS ("
    "UPDATE databasechangeloglock SET locked = FALSE, lockgranted = NULL, lockedby = NULL"
    " WHERE id = 1 AND locked RETURNING id)"
    " SELECT id, author, filename, md5sum,"
    " pg_wal_lsn_diff(pg_current_wal_insert_lsn(), (pg_control_checkpoint()).redo_lsn)::bigint"
    " FROM databasechangelog ORDER BY orderexecuted DESC, dateexecuted DESC LIMIT 1"
)


class _Stale(Exception):
    """The speculative base is not on the new plan's chain: run again from a cached prefix."""


@dataclass
class _Run:
    """One Liquibase update: the plan it is checked against and how far it got.

    The plan (a second JVM) often arrives after the first boundaries: those states are taken
    under the ids their own rows give, but held back (not states yet) until the plan arrives
    and every one of them matches it; a mismatch fails the build and drops them.
    """

    ctx: BuildContext
    prep: LiquibasePrepare
    session: WorkSession
    base: str
    plan: list[ChangeSet] | None = None
    ids: list[str] = field(default_factory=list)
    index: int = 0  # the next planned changeset
    early: list[ChangeSet] = field(default_factory=list)  # recorded before the plan came
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    side: asyncpg.Connection | None = None
    version: str | None = None  # Liquibase's, for each state's provenance

    def record(self, cs: ChangeSet) -> dict[str, Any]:
        """What made a changeset's state: its row, the settings, its file (provenance)."""
        found = changeset_file(self.prep, cs.filename)
        return provenance.step(
            self.ctx, "liquibase", self.version,
            changeset={"id": cs.id, "author": cs.author, "filename": cs.filename,
                       "checksum": cs.md5sum},
            contexts=self.prep.contexts, labels=self.prep.labels,
            parameters=provenance.hashed(self.prep.parameters),
            files=provenance.files(self.ctx, [found] if found else []),
        )  # fmt: skip

    async def set_plan(self, plan: list[ChangeSet], ids: list[str]) -> None:
        """Place the base on the plan's chain (raises _Stale when it is not there); check and
        publish the states taken before the plan."""
        async with self.lock:
            if self.base == self.ctx.root_state:
                start = 0
            elif self.base in ids:
                start = ids.index(self.base) + 1
            else:
                raise _Stale()
            n = len(plan)
            for i, got in enumerate(self.early):
                if start + i >= n:
                    raise BuildFailed(f"Liquibase ran more changesets than the {n} planned")
                _check(start + i, plan, got)
            if self.early and self.session.state_id != ids[start + len(self.early) - 1]:
                raise RuntimeError("state chain diverged from the plan")  # our bug
            self.plan, self.ids = plan, ids
            position = {ids[start + i]: start + i for i in range(len(self.early))}

            def announce(row: StateRow) -> None:
                self.index = position[row.id]
                self._announce()

            await self.session.publish(before=announce)
            self.index = start + len(self.early)
            self._announce()

    def _announce(self) -> None:
        if self.plan is not None and self.index < len(self.plan):
            cs = self.plan[self.index]
            self.ctx.job.emit(
                "step.start", f"changeset {self.index + 1}/{len(self.plan)} {cs.label}"
            )

    async def on_boundary(self) -> None:
        """Liquibase committed a changeset: check it against the plan, take its state."""
        async with asyncio.timeout(BOUNDARY_TIMEOUT), self.lock:
            assert self.side is not None
            row = await self.side.fetchrow(_BOUNDARY_QUERY)
            got = ChangeSet(row[0], row[1], row[2], row[3] or "") if row is not None else None
            if self.plan is None:
                if got is None:
                    raise BuildFailed("Liquibase committed a changeset but recorded no row")
                # Not known to be the last changeset: checkpoint (see CHECKPOINT_AFTER_WAL).
                await self.side.execute("CHECKPOINT")
                await self.session.commit(
                    STEP_KIND, step_hash(got, self.prep), got.label, live=True, publish=False,
                    provenance=await asyncio.to_thread(self.record, got),
                )  # fmt: skip
                self.early.append(got)
                return
            n = len(self.plan)
            if self.index >= n:
                raise BuildFailed(f"Liquibase ran more changesets than the {n} planned")
            want = _check(self.index, self.plan, got)
            assert row is not None
            if not self._keeps(self.index, n):
                sid = await self.session.skip(
                    STEP_KIND, step_hash(want, self.prep), want.label,
                    provenance=await asyncio.to_thread(self.record, want),
                )  # fmt: skip
                if sid != self.ids[self.index]:  # our bug, never the user's
                    raise RuntimeError("state chain diverged from the plan")
                self.index += 1
                self._announce()
                return
            if self.index == n - 1 or row[4] > CHECKPOINT_AFTER_WAL:
                # Short crash recovery when a server starts on the state (see above).
                await self.side.execute("CHECKPOINT")
            sid = await self.session.commit(
                STEP_KIND, step_hash(want, self.prep), want.label, live=True,
                provenance=await asyncio.to_thread(self.record, want),
            )  # fmt: skip
            if sid != self.ids[self.index]:  # our bug, never the user's
                raise RuntimeError("state chain diverged from the plan")
            self.index += 1
            self._announce()

    def _keeps(self, index: int, n: int) -> bool:
        """Whether changeset `index` (of n) becomes a state: the last always does."""
        every = keep_every(self.ctx.config.liquibase.keep_every, self.session.store)
        return index == n - 1 or (index + 1) % every == 0


def keep_every(setting: int | str, store: StateStore) -> int:
    if isinstance(setting, int):
        return setting
    return 1 if store.backend.capabilities.instant_clone else PLAIN_COPY_KEEP_EVERY


def _check(index: int, plan: Sequence[ChangeSet], got: ChangeSet | None) -> ChangeSet:
    """The planned changeset at index, if Liquibase recorded exactly it."""
    want = plan[index]
    if got is None or got.key != want.key:
        shown = f"{got.filename}::{got.id}::{got.author}" if got else "no row"
        raise BuildFailed(
            f"changeset {index + 1}/{len(plan)}: Liquibase recorded {shown} but the plan"
            f" has {want.filename}::{want.label} (checksum {want.md5sum});"
            " nothing was stored for it",
        )
    return want


class LiquibaseAdapter:
    """Builds lb recipes. The plan (offline, no server) and the update run side by side."""

    kind = "lb"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        for alias, recipe in cfg.databases.items():
            if isinstance(recipe.prepare, LiquibasePrepare):
                try:
                    check_parameters(recipe.prepare.parameters)
                except BuildFailed as e:
                    raise ConfigError(f"databases.{alias}.prepare.parameters: {e.message}") from e

    # --- plan ---------------------------------------------------------------------------------

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        prep = self._prep(ctx)
        check_parameters(prep.parameters)
        launcher = find_launcher(self.cfg)
        changesets = await self._plan(ctx, prep, launcher)
        ids = chain(ctx.root_state, changesets, prep)
        return [
            PlannedStep(sid, cs.label, await ctx.has_state(sid))
            for sid, cs in zip(ids, changesets, strict=True)
        ]

    async def _plan(
        self, ctx: BuildContext, prep: LiquibasePrepare, launcher: Path
    ) -> list[ChangeSet]:
        find_changelog(prep)
        return await liquibase_plan(
            launcher, prep, masker=self._masker(prep),
            on_line=lambda line: ctx.job.emit("log", "plan: " + line),
            archive=self._archive(launcher),
        )  # fmt: skip

    # --- build --------------------------------------------------------------------------------

    async def build(self, ctx: BuildContext) -> BuildResult:
        prep = self._prep(ctx)
        inputs = await asyncio.to_thread(collect_inputs, prep)
        try:
            check_parameters(prep.parameters)
            find_changelog(prep)
            launcher = find_launcher(self.cfg)
            final = await self._build(ctx, prep, launcher)
        except BuildFailed as e:
            e.inputs = inputs
            raise
        return BuildResult(final, inputs)

    async def _build(self, ctx: BuildContext, prep: LiquibasePrepare, launcher: Path) -> str:
        memory = self._memory_path(ctx)
        base = await self._deepest(ctx, _read_chain(memory)) or ctx.root_state
        plan_task = asyncio.create_task(self._plan(ctx, prep, launcher), name="lb-plan")
        try:
            try:
                return await self._update(ctx, prep, launcher, base, plan_task, memory)
            except _Stale:
                plan = plan_task.result()
                ids = chain(ctx.root_state, plan, prep)
                again = await self._deepest(ctx, ids) or ctx.root_state
                ctx.job.emit(
                    "progress", f"changelog changed: applying from changeset {_pos(ids, again)}"
                )
                return await self._update(ctx, prep, launcher, again, plan_task, memory)
        finally:
            if not plan_task.done():
                plan_task.cancel()
            with contextlib.suppress(BaseException):
                await plan_task

    async def _update(
        self,
        ctx: BuildContext,
        prep: LiquibasePrepare,
        launcher: Path,
        base: str,
        plan_task: asyncio.Task[list[ChangeSet]],
        memory: Path,
    ) -> str:
        session = await ctx.open_session(base)
        # Commits must reach the WAL before the client hears of them (the boundary snapshot).
        session.settings["synchronous_commit"] = "on"
        # Nothing may write WAL while a boundary is held: on btrfs/zfs the server is not
        # frozen for the snapshot, and a write racing the snapshot's flush (say pg_control
        # of a timed checkpoint without its WAL record) could land without what it depends
        # on. Boundaries checkpoint themselves when WAL has grown (see _Run.on_boundary).
        session.settings["autovacuum"] = "off"
        session.settings["checkpoint_timeout"] = "1d"
        run = _Run(ctx, prep, session, base, version=liquibase_version(launcher))
        relay: BoundaryRelay | None = None
        proc: list[asyncio.subprocess.Process] = []
        lb_task: asyncio.Task[Outcome] | None = None
        scratch = Path(tempfile.mkdtemp(prefix="taidon-lb-"))
        try:
            handle = await session.start()
            run.side = await connect(handle, database=ctx.database, timeout=30)
            relay = BoundaryRelay(handle.socket_path, run.on_boundary)
            port = await relay.start()
            url = (
                f"jdbc:postgresql://127.0.0.1:{port}/{ctx.database}"
                "?sslmode=disable&gssEncMode=disable&prepareThreshold=0"
                "&ApplicationName=taidon-prepare"
            )
            argv = [
                str(launcher), *global_args(prep), "update", f"--url={url}",
                "--username=postgres", *recipe_args(prep),
            ]  # fmt: skip
            masker = self._masker(prep)
            lb_task = asyncio.create_task(
                run_liquibase(
                    argv,
                    cwd=scratch,
                    java_opts=f"{UPDATE_JAVA_OPTS} {self._archive(launcher).use()}".strip(),
                    on_line=lambda line: ctx.job.emit("log", line),
                    masker=masker,
                    started=proc.append,
                )
            )
            async with asyncio.timeout(RUN_TIMEOUT):
                plan = await plan_task  # a changelog Liquibase can't read fails here
            ids = chain(ctx.root_state, plan, prep)
            _write_chain(memory, ids)
            await run.set_plan(plan, ids)  # raises _Stale: the finally kills the speculative run
            outcome = await lb_task
            if relay.error is not None:
                raise relay.error
            if outcome.returncode != 0:
                msg, detail = error_text(outcome.tail, outcome.returncode)
                done_n = f"{run.index}/{len(plan)} changesets applied"
                raise BuildFailed(f"Liquibase update failed ({done_n}): {msg}", detail=detail)
            if run.index != len(plan):
                raise BuildFailed(
                    f"Liquibase finished after {run.index} of {len(plan)} planned changesets"
                    " (a precondition with onFail=CONTINUE, or runAlways/runOnChange changesets?)"
                )
            return ids[-1] if ids else ctx.root_state
        finally:
            for p in proc:
                kill(p)
            if lb_task is not None and not lb_task.done():
                lb_task.cancel()
            if lb_task is not None:
                with contextlib.suppress(BaseException):
                    await lb_task
            if relay is not None:
                await relay.close()
            if run.side is not None:
                with contextlib.suppress(Exception):
                    await run.side.close(timeout=5)
            await session.close()
            shutil.rmtree(scratch, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _prep(ctx: BuildContext) -> LiquibasePrepare:
        prep = ctx.recipe.prepare
        if not isinstance(prep, LiquibasePrepare):
            raise TypeError("LiquibaseAdapter got a recipe of another kind")
        return prep

    @staticmethod
    def _masker(prep: LiquibasePrepare) -> Masker:
        return Masker(
            [(str(p.resolve()), "") for p in prep.search_path]
            + [(str(p), "") for p in prep.search_path]
            + [(prep.parameters[name], SECRET) for name in prep.secret_parameters]
        )

    def _archive(self, launcher: Path) -> ClassArchive:
        return ClassArchive(self.cfg.store / "liquibase", launcher)

    def _memory_path(self, ctx: BuildContext) -> Path:
        """The last plan's chain of the recipe, whatever its search path: a build at another
        git ref (the same recipe checked out elsewhere) starts from the chain the last one
        left, so two branches share the prefix they have in common."""
        prep = self._prep(ctx).model_copy(update={"search_path": []})
        recipe = ctx.recipe.model_copy(update={"prepare": prep})
        key = digest(ctx.alias, recipe.model_dump_json(), ctx.root_state)
        return self.cfg.store / "liquibase" / f"{key[:32]}.json"

    @staticmethod
    async def _deepest(ctx: BuildContext, ids: Sequence[str]) -> str | None:
        for sid in reversed(ids):
            if await ctx.has_state(sid):
                return sid
        return None


def _pos(ids: Sequence[str], base: str) -> int:
    return ids.index(base) + 2 if base in ids else 1


def _read_chain(path: Path) -> list[str]:
    """The state ids of the recipe's last plan (where a speculative run may start)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    ids = data.get("chain") if isinstance(data, dict) else None
    return [str(x) for x in ids] if isinstance(ids, list) else []


def _write_chain(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"chain": list(ids)}), encoding="utf-8")
    os.replace(tmp, path)
