"""Recipe → state: the fast path by fingerprint, single-flight builds, remembered failures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog

from taidon_proxy.config import Config, Recipe
from taidon_proxy.errors import BuildFailed, TaidonError, UnknownDatabase
from taidon_proxy.prepare.atref import AtRef, at_ref
from taidon_proxy.prepare.context import BuildContext, PlannedStep, RecipeAdapter
from taidon_proxy.prepare.gitref import GitTrees
from taidon_proxy.prepare.jobs import Job, JobEvent
from taidon_proxy.prepare.queue import REQUESTER, BuildQueue, Entry, Requester, priority_of
from taidon_proxy.prepare.session import WorkSession
from taidon_proxy.runtimes.base import EngineInfo, InstanceRuntime, RuntimeError_
from taidon_proxy.runtimes.connect import connect
from taidon_proxy.store.fingerprint import FileHashCache
from taidon_proxy.store.ids import digest, initdb_state_id, step_state_id
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.metadata_api import MetadataUnavailable
from taidon_proxy.store.queue import QueueRow, QueueRows
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.prepare")

# 1 MB WAL segments: a step's delta then costs a 1 MB segment, not 16 MB (overlayfs copies a
# whole file up on its first write; CoW filesystems still write the zero-filled new segment).
INITDB_SETTINGS: Mapping[str, str] = {"encoding": "UTF8", "locale": "C.UTF-8", "wal_segsize": "1"}
MAX_JOBS_KEPT = 200


@dataclass
class _Flight:
    job: Job
    task: asyncio.Task[str]


@dataclass(frozen=True)
class _Failure:
    expires: float
    fingerprint: str
    error: TaidonError


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class StateBuilder:
    """Decides which state serves a recipe now, building what is missing exactly once."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        runtime: InstanceRuntime,
        adapters: Mapping[str, RecipeAdapter],
        build_settings: Mapping[str, str],
    ) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.adapters = dict(adapters)
        self.build_settings = dict(build_settings)
        self.jobs: dict[str, Job] = {}
        self._engine: EngineInfo | None = None
        self._flights: dict[str, _Flight] = {}
        self._failures: dict[str, _Failure] = {}
        self._hashes = FileHashCache()
        self.trees = GitTrees(config.store)
        # Builds wait here for a slot (builds.concurrency, teams.X.quotas.builds); its rows
        # in the metadata let a restart resume them.
        self.queue_rows = QueueRows(store.meta)
        self.queue = BuildQueue(lambda: self.config, self.queue_rows)
        # Observers (metrics): (alias, served from cache) and (alias, outcome, seconds).
        self.on_resolved: Callable[[str, bool], None] | None = None
        self.on_built: Callable[[str, str, float], None] | None = None
        # The audit log: each finished build job with its duration in seconds.
        self.on_job_done: Callable[[Job, float], None] | None = None
        # Metrics per team: (team, outcome) of each finished build.
        self.on_team_built: Callable[[str | None, str], None] | None = None

    # --- identity -----------------------------------------------------------------------------

    async def engine(self) -> EngineInfo:
        if self._engine is None:
            self._engine = await self.runtime.engine()
        return self._engine

    async def _engine_key(self) -> tuple[str, str]:
        e = await self.engine()
        # Host binaries of one major.minor build the same clusters anywhere; an image is its own.
        source = e.source if e.source.startswith("docker") else "host"
        return e.version, source

    async def initdb_id(self) -> str:
        version, source = await self._engine_key()
        return initdb_state_id(version, source, INITDB_SETTINGS)

    async def root_id(self, alias: str) -> str:
        recipe = self.config.databases[alias]
        part = digest(self.config.database_of(alias), ",".join(recipe.roles))
        return step_state_id(await self.initdb_id(), "root", part)

    async def recipe_key(self, alias: str, recipe: Recipe | None = None) -> str:
        """The fast path's key: the recipe (as of a ref: with its paths in the checkout)."""
        recipe = recipe or self.config.databases[alias]
        version, source = await self._engine_key()
        return digest(alias, recipe.model_dump_json(), version, source, self.store.backend_name)

    def recipe(self, alias: str) -> None:
        if alias not in self.config.databases:
            known = ", ".join(sorted(self.config.databases)) or "(none configured)"
            raise UnknownDatabase(
                f'database "{alias}" does not exist',
                detail=f"known databases: {known}",
                hint="connect to one of the configured aliases, alias:label, or state:<id>;"
                " list them with: sqlrs ls aliases (a config edited since the proxy started"
                " is loaded with: sqlrs admin reload)",
            )

    # --- the connection path ----------------------------------------------------------------

    async def at_ref(self, alias: str, ref: str) -> AtRef:
        """The recipe with its files as of a git ref (checked out under the store once)."""
        self.recipe(alias)
        return await at_ref(self.trees, self.base_dir(), self.config.databases[alias], ref)

    async def resolve(
        self,
        alias: str,
        progress: Callable[[JobEvent], None] | None = None,
        ref: str | None = None,
    ) -> str:
        """The current state of a recipe (at a git ref, or of the work tree): cached by
        fingerprint, else built (single flight)."""
        self.recipe(alias)
        target = await self.at_ref(alias, ref) if ref is not None else None
        key = await self.recipe_key(alias, target.recipe if target else None)
        hit = await self._fast_path(key)
        if self.on_resolved is not None:
            self.on_resolved(alias, hit is not None)
        if hit is not None:
            return hit
        failure = self._failures.get(key)
        if failure is not None:
            same = failure.fingerprint == await self._fingerprint_of_error(key, failure.error)
            if failure.expires > time.monotonic() and same:
                raise failure.error
            del self._failures[key]
        flight = self._flights.get(key)
        requester = REQUESTER.get()
        if flight is None:
            job = Job(alias=alias, team=requester.team)
            entry = self.queue.enqueue(job.id, alias, ref, requester)  # may refuse: 53300
            self.jobs[job.id] = job
            self._trim_jobs()
            flight = self._fly(key, job, self._build(alias, key, job, target, entry))
        else:  # the same build: shared, and as urgent as its most urgent client
            self.queue.promote(flight.job.id, requester.priority)
        follower = None
        if progress is not None:
            follower = asyncio.create_task(self._forward(flight.job, progress))
        try:
            return await asyncio.shield(flight.task)
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    def _fly(self, key: str, job: Job, build: Coroutine[Any, Any, str]) -> _Flight:
        task = asyncio.create_task(build, name=f"build-{job.alias}")
        flight = self._flights[key] = _Flight(job, task)

        def landed(t: asyncio.Task[str]) -> None:
            self._flights.pop(key, None)
            self.queue.discard(job.id)  # (a task cancelled before it ran never took its slot)
            if not t.cancelled():
                t.exception()  # retrieved: a resumed build may have no client awaiting it

        task.add_done_callback(landed)
        return flight

    async def resume(self) -> int:
        """Builds an earlier proxy left queued or running start again, in their order (a
        running one rebuilds from its deepest complete state: the chain's cached prefix)."""
        planned: list[tuple[QueueRow, Job, str, AtRef | None]] = []
        for row in await self.queue_rows.pending():
            try:
                if row.alias is None:
                    raise UnknownDatabase("the build names no alias")
                self.recipe(row.alias)
                target = await self.at_ref(row.alias, row.ref) if row.ref is not None else None
                key = await self.recipe_key(row.alias, target.recipe if target else None)
            except TaidonError as e:
                log.warning("build.not_resumed", job=row.job_id, alias=row.alias, error=e.message)
                await self.queue_rows.remove(row.job_id)
                continue
            job = Job(alias=row.alias, id=row.job_id, started=row.enqueued, team=row.team)
            job.events = [JobEvent(*e) for e in await self.store.meta.job_events(job.id)]
            job.mark_flushed()
            await self.queue_rows.reopen_job(job.id)
            planned.append((row, job, key, target))
        for row, job, key, target in planned:  # no await here: the queue sees them in order
            if key in self._flights:
                job.finish("failed", error=f"superseded by {self._flights[key].job.id}")
                self._drop_resumed(job)
                continue
            entry = self.queue.enqueue(
                job.id, row.alias, row.ref, Requester(row.team, priority_of(row.priority)),
                seq=row.seq, resumed=row.running, enqueued=row.enqueued,
            )  # fmt: skip
            job.emit(
                "progress",
                "resumed after a restart"
                + (": rebuilding from its last complete state" if row.running else ""),
            )
            self.jobs[job.id] = job
            assert row.alias is not None
            self._fly(key, job, self._build(row.alias, key, job, target, entry, resumed=True))
        if planned:
            log.info("build.resumed", jobs=len(planned))
        return len(planned)

    def _drop_resumed(self, job: Job) -> None:
        """A resumed job that will not run: its rows say so (in the background)."""

        async def drop() -> None:
            await self.queue_rows.remove(job.id)
            await self._flush(job)

        asyncio.get_running_loop().create_task(drop())

    async def close(self) -> None:
        """Stop the builds in flight (a stop): their queue rows stay, for the next start."""
        tasks = [f.task for f in self._flights.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _forward(self, job: Job, progress: Callable[[JobEvent], None]) -> None:
        async for ev in job.follow():
            if ev.kind in ("step.start", "progress", "job.start", "queued"):
                progress(ev)

    async def _fast_path(self, key: str) -> str | None:
        remembered = await self.store.meta.fingerprint(key)
        if remembered is None:
            return None
        fp, state_id, inputs = remembered
        now = await asyncio.to_thread(self._hashes.fingerprint, key, [Path(p) for p in inputs])
        if now != fp or await self.store.get(state_id) is None:
            return None
        return state_id

    async def _fingerprint_of_error(self, key: str, error: TaidonError) -> str:
        """Fingerprint of the inputs a failed build read: a fix to them ends the memory early."""
        inputs = getattr(error, "inputs", None) or []
        return await asyncio.to_thread(self._hashes.fingerprint, key, [Path(p) for p in inputs])

    # --- building ---------------------------------------------------------------------------

    def base_dir(self) -> Path:
        base = self.config.source.parent if self.config.source else Path.cwd()
        return base.resolve()

    def context(self, alias: str, job: Job, root: str, target: AtRef | None = None) -> BuildContext:
        return BuildContext(
            alias=alias,
            recipe=target.recipe if target else self.config.databases[alias],
            config=self.config,
            base_dir=target.base_dir if target else self.base_dir(),
            database=self.config.database_of(alias),
            root_state=root,
            job=job,
            has_state=self._has_state,
            open_session=lambda sid: self.open_session(sid, alias, job),
            confine=target.checkout.path if target else None,
            checkout=target.checkout if target else None,
        )

    async def plan(self, alias: str, ref: str | None = None) -> list[PlannedStep]:
        self.recipe(alias)
        target = await self.at_ref(alias, ref) if ref is not None else None
        job = Job(alias=alias)
        root = await self.root_id(alias)
        recipe = self.config.databases[alias]
        ctx = self.context(alias, job, root, target)
        try:
            return await self.adapters[recipe.prepare.kind].plan(ctx)
        except BuildFailed as e:
            raise _at(e, target) from None

    async def _has_state(self, state_id: str) -> bool:
        return await self.store.get(state_id) is not None

    async def open_session(self, state_id: str, alias: str | None, job: Job) -> WorkSession:
        clone_id, path = await self.store.clone(state_id, "b")
        version, _ = await self._engine_key()
        return WorkSession(
            self.store, self.runtime, clone_id, path, state_id=state_id, alias=alias,
            engine=version, settings=self.build_settings, job=job,
        )  # fmt: skip

    @staticmethod
    def _crashed(alias: str, job: Job, e: Exception) -> NoReturn:
        job.finish("failed", error=f"internal error: {type(e).__name__}")
        log.exception("build.crashed", alias=alias, job=job.id)
        raise BuildFailed(f"preparing {alias} failed: internal error (see proxy log)") from e

    async def _build(
        self, alias: str, key: str, job: Job, target: AtRef | None, entry: Entry,
        resumed: bool = False,
    ) -> str:  # fmt: skip
        started = time.monotonic()
        if not resumed:
            await self.store.meta.add_job(job.id, alias, job.started)
        if not resumed or not job.events:  # (a resumed job's log has its start already)
            job.emit("job.start", f"preparing {alias}" + (f" {target.where()}" if target else ""))
        log.info("build.start", alias=alias, job=job.id)
        try:
            await self._flush(job)  # a kill -9 keeps the log up to here (a resume goes on)
            async with self.queue.slot(entry, lambda text: job.emit("queued", text)):
                if any(e.kind == "queued" for e in job.events):
                    waited = time.monotonic() - started
                    job.emit("progress", f"building now, after {waited:.1f}s in the queue")
                    await self._flush(job)
                root = await self.ensure_root(alias, job)
                recipe = self.config.databases[alias]
                ctx = self.context(alias, job, root, target)
                try:
                    result = await self.adapters[recipe.prepare.kind].build(ctx)
                except BuildFailed as e:
                    raise _at(e, target) from None
                fp = await asyncio.to_thread(
                    self._hashes.fingerprint, key, [Path(p) for p in result.inputs]
                )
                await self.store.meta.set_fingerprint(key, fp, result.state_id, result.inputs)
        except TaidonError as e:
            if isinstance(e, RuntimeError_):  # a runtime's failure is internal here
                self._crashed(alias, job, e)
            job.finish("failed", error=e.message)
            log.warning("build.failed", alias=alias, job=job.id, error=e.message)
            if not isinstance(e, MetadataUnavailable):  # an outage is not the recipe's
                fp_err = await self._fingerprint_of_error(key, e)
                expires = time.monotonic() + self.config.cache.failure_ttl
                self._failures[key] = _Failure(expires, fp_err, e)
            raise
        except Exception as e:
            self._crashed(alias, job, e)
        finally:
            await self._flush(job)
            if job.done:
                self._report(alias, job, time.monotonic() - started)
        job.finish("succeeded", target=result.state_id)
        self._report(alias, job, time.monotonic() - started)
        await self._flush(job)
        log.info(
            "build.done", alias=alias, job=job.id, state=result.state_id[:12],
            seconds=round(time.monotonic() - started, 3),
        )  # fmt: skip
        return result.state_id

    def _report(self, alias: str, job: Job, seconds: float) -> None:
        if self.on_built is not None:
            self.on_built(alias, job.status, seconds)
        if self.on_job_done is not None:
            self.on_job_done(job, seconds)
        if self.on_team_built is not None:
            self.on_team_built(job.team, job.status)

    async def _flush(self, job: Job) -> None:
        await self.store.meta.add_job_events(job.id, job.unflushed())
        if job.done:
            await self.store.meta.finish_job(job.id, job.status, job.target, job.error)

    def _trim_jobs(self) -> None:
        while len(self.jobs) > MAX_JOBS_KEPT:
            oldest = next(iter(self.jobs))
            if not self.jobs[oldest].done:
                break
            del self.jobs[oldest]

    async def ensure_initdb(self, job: Job) -> str:
        sid = await self.initdb_id()
        if await self._has_state(sid):
            return sid
        return await self._single("initdb:" + sid, lambda: self._make_initdb(sid, job))

    async def _make_initdb(self, sid: str, job: Job) -> str:
        if await self._has_state(sid):
            return sid
        job.emit("progress", "initializing a new cluster (initdb)")
        started = time.monotonic()
        clone_id, path = await self.store.create_workspace()
        try:
            await self.runtime.init_cluster(path / "pgdata", INITDB_SETTINGS)
            version, source = await self._engine_key()
            binaries = (await self.engine()).source
            await self.store.meta.add_provenance(
                {sid: {
                    "engine": {"version": version, "source": source, "binaries": binaries},
                    "initdb_settings": dict(INITDB_SETTINGS),
                    "backend": self.store.backend_name,
                }}
            )  # fmt: skip
            now = time.time()
            await self.store.commit(
                clone_id,
                StateRow(
                    sid, None, "initdb", None, "initdb", self.store.backend_name, version,
                    now, now, 0, time.monotonic() - started, 0, False, True,
                ),
            )  # fmt: skip
        finally:
            await self.store.remove_clone(clone_id)
        return sid

    async def ensure_root(self, alias: str, job: Job) -> str:
        sid = await self.root_id(alias)
        if await self._has_state(sid):
            return sid
        initdb = await self.ensure_initdb(job)
        return await self._single("root:" + sid, lambda: self._make_root(alias, initdb, sid, job))

    async def _make_root(self, alias: str, initdb: str, sid: str, job: Job) -> str:
        if await self._has_state(sid):
            return sid
        recipe = self.config.databases[alias]
        database = self.config.database_of(alias)
        job.emit("progress", f"creating database {database}")
        session = await self.open_session(initdb, alias, job)
        try:
            handle = await session.start()
            conn = await connect(handle, database="postgres", timeout=30)
            try:
                for role in recipe.roles:
                    await conn.execute(f"CREATE ROLE {quote_ident(role)} LOGIN")
                await conn.execute(f"CREATE DATABASE {quote_ident(database)}")
                for role in recipe.roles:
                    await conn.execute(
                        f"GRANT ALL ON DATABASE {quote_ident(database)} TO {quote_ident(role)}"
                    )
            finally:
                await conn.close()
            if recipe.roles:
                conn = await connect(handle, database=database, timeout=30)
                try:
                    for role in recipe.roles:
                        r = quote_ident(role)
                        await conn.execute(f"GRANT ALL ON SCHEMA public TO {r}")
                        # Objects the recipe creates as postgres are usable by its roles.
                        for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
                            await conn.execute(
                                "ALTER DEFAULT PRIVILEGES IN SCHEMA public"
                                f" GRANT ALL ON {kind} TO {r}"
                            )
                finally:
                    await conn.close()
            part = digest(database, ",".join(recipe.roles))
            await session.commit(
                "root", part, f"database {database}",
                provenance={"database": database, "roles": list(recipe.roles),
                            "backend": self.store.backend_name},
            )  # fmt: skip
        finally:
            await session.close()
        return sid

    async def _single(self, key: str, make: Callable[[], Coroutine[Any, Any, str]]) -> str:
        """Single flight for shared prefixes (initdb, roots) across recipes."""
        flight = self._flights.get(key)
        if flight is None:
            task = asyncio.create_task(make())
            flight = self._flights[key] = _Flight(Job(alias=None), task)
            task.add_done_callback(lambda _t: self._flights.pop(key, None))
        return await asyncio.shield(flight.task)


def _at(e: BuildFailed, target: AtRef | None) -> BuildFailed:
    """A build's error at a ref says which ref and commit (a file missing there, say)."""
    if target is None:
        return e
    out = BuildFailed(f"{e.message} {target.where()}", detail=e.detail, hint=e.hint)
    out.inputs = e.inputs
    return out
