"""Virtual databases: what `CREATE DATABASE test_<alias>` makes, and the maintenance route.

A test runner (Django's `manage.py test`, Rails' `db:create`) connects to the maintenance
database (`postgres`, `template1`) and creates, clones and drops its own database. Here a
created name that maps to a recipe alias becomes a *virtual database*: a shared instance of
that recipe (label = the name), made fresh from the recipe's current state, reached by
connecting to the name. `WITH TEMPLATE <virtual db>` clones the template's instance as it is
now (a live snapshot, reused while nobody connected to the template since). `DROP DATABASE`
destroys the instance (and a snapshot only it used). The registry lives in memory.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from taidon_proxy.config import Config
from taidon_proxy.errors import TaidonError
from taidon_proxy.instances.capture import capture
from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.instances.manager import Instance, InstanceManager
from taidon_proxy.pgwire.dbcommands import CreateDatabase, DropDatabase
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.routing import DEFAULT_LABEL, Route
from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.virtual")

# Connections to these databases (when no alias has the name) are maintenance connections.
MAINTENANCE_DATABASES = ("postgres", "template1")
MAINTENANCE_LABEL = "maintenance"
# Names the server itself owns: statements about them go to the real server.
SERVER_DATABASES = frozenset({"postgres", "template0", "template1"})
# Like Postgres (CountOtherDBBackends): wait this long for other sessions to leave a database
# that is being dropped or used as a template, since a client's close reaches us after its
# next statement may have.
IN_USE_WAIT_S = 5.0
IN_USE_POLL_S = 0.05


def pattern_regex(pattern: str, alias: str) -> re.Pattern[str]:
    """`test_{alias}_{n}` for alias shop → ^test_shop_[0-9]+$"""
    parts = re.split(r"(\{alias\}|\{n\})", pattern)
    body = "".join(
        re.escape(alias) if p == "{alias}" else "[0-9]+" if p == "{n}" else re.escape(p)
        for p in parts
    )
    return re.compile(f"^{body}$")


@dataclass
class VirtualDatabase:
    name: str
    alias: str
    # None: the recipe's current state when its instance starts; else an exact state.
    state_id: str | None
    created: float
    # The last live snapshot taken of it as a template: (state, instance id, taken at).
    snapshot: tuple[str, str, float] | None = None

    @property
    def label(self) -> str:
        return self.name

    def route(self, base: Route | None = None) -> Route:
        params = dict(base.params) if base is not None else {}
        ttl = base.ttl if base is not None else None
        if self.state_id is None:
            return Route(self.alias, None, self.label, "shared", ttl, params)
        return Route(None, self.state_id, self.label, "shared", ttl, params)

    @property
    def key(self) -> InstanceKey:
        """The manager's key of its shared instance."""
        if self.state_id is None:
            return InstanceKey.recipe(self.alias, self.label)
        return InstanceKey.exact(self.state_id, self.label)


def _in_use(what: str, n: int) -> TaidonError:
    sessions = "There is 1 other session" if n == 1 else f"There are {n} other sessions"
    return TaidonError(
        f"{what} is being accessed by other users",
        sqlstate="55006",
        detail=f"{sessions} using the database.",
    )


class VirtualDatabases:
    """The registry of virtual databases, and the use-cases of a maintenance connection."""

    def __init__(
        self,
        config: Config,
        manager: InstanceManager,
        store: StateStore,
        runtime: InstanceRuntime,
        patterns: Iterable[str],
    ) -> None:
        self.config = config
        self.manager = manager
        self.store = store
        self.runtime = runtime
        self.patterns = list(patterns)
        self._dbs: dict[str, VirtualDatabase] = {}
        self._owned: set[str] = set()  # snapshot states made here, removed once unused
        self._lock = asyncio.Lock()

    # --- routing ----------------------------------------------------------------------------

    def databases(self) -> list[VirtualDatabase]:
        return list(self._dbs.values())

    def alias_of(self, name: str) -> str | None:
        """The alias a new database of this name belongs to (the longest alias that fits)."""
        best: str | None = None
        for alias in self.config.databases:
            if best is not None and len(alias) <= len(best):
                continue
            if any(pattern_regex(p, alias).match(name) for p in self.patterns):
                best = alias
        return best

    def is_maintenance(self, route: Route) -> bool:
        return (
            route.state_ref is None
            and route.alias in MAINTENANCE_DATABASES
            and route.alias not in self.config.databases
            and bool(self.config.databases)
        )

    def maintenance_route(self, route: Route, user: str) -> Route:
        """A maintenance connection lands in the `postgres` database of a shared instance
        (label `maintenance`) of the first alias, in config order, whose recipe has the
        user's role, else of the first alias: a real server, so catalog queries work. Not
        the alias's `default` instance: a `DROP DATABASE <alias>` must not find its own
        connection in the way."""
        aliases = list(self.config.databases)
        alias = next((a for a in aliases if user in self.config.databases[a].roles), aliases[0])
        label = MAINTENANCE_LABEL if route.label == DEFAULT_LABEL else route.label
        return Route(alias, None, label, "shared", route.ttl, dict(route.params))

    def reroute(self, route: Route) -> Route:
        """A connection to a virtual database goes to its instance; others are unchanged."""
        if route.state_ref is not None or route.alias is None:
            return route
        vdb = self._dbs.get(route.alias)
        if vdb is None or route.alias in self.config.databases:
            return route
        return vdb.route(route)

    # --- CREATE DATABASE --------------------------------------------------------------------

    async def create(
        self, cmd: CreateDatabase, progress: Callable[[JobEvent], None] | None = None
    ) -> list[str]:
        """Make a virtual database; the notices to send. Errors are TaidonErrors."""
        name = cmd.name
        if name in self.config.databases:
            raise TaidonError(f'database "{name}" already exists', sqlstate="42P04")
        async with self._lock:
            existing = self._dbs.get(name)
            if existing is not None:
                inst = self._running(existing)
                if inst is not None and inst.leases:
                    raise TaidonError(f'database "{name}" already exists', sqlstate="42P04")
            alias = existing.alias if existing is not None else self.alias_of(name)
            if alias is None:
                raise TaidonError(
                    f'the proxy cannot create database "{name}"',
                    sqlstate="0A000",
                    detail="A created database is a fresh copy of a recipe, named after its "
                    "alias: " + ", ".join(self.patterns) + ".",
                    hint="known aliases: " + (", ".join(self.config.databases) or "(none)"),
                )
            state_id, alias = await self._source(cmd.template, alias)
            if existing is not None:
                # Still answered with 42P04 below, as Postgres does; but nobody uses it, so it
                # is made again as asked: a run that keeps its database (Django --keepdb)
                # starts from the recipe's state all the same.
                await self._discard(existing, "recreated")
            vdb = VirtualDatabase(name=name, alias=alias, state_id=state_id, created=time.time())
            # A clone an earlier proxy kept under this name (shared instances outlive a
            # restart; this registry does not) is not this new database.
            await self._remove_instance(vdb.key)
            self._dbs[name] = vdb
            try:
                lease = await self.manager.acquire(vdb.route(), progress)
            except BaseException:
                del self._dbs[name]
                await self._remove_unused_states()
                raise
            self.manager.release(lease)
            log.info("virtual.created", database=name, alias=alias, instance=lease.instance.id,
                     template=cmd.template, recreated=existing is not None)  # fmt: skip
        if existing is not None:
            raise TaidonError(f'database "{name}" already exists', sqlstate="42P04")
        return []

    async def _source(self, template: str | None, alias: str) -> tuple[str | None, str]:
        """(state, alias) a new database starts from: the recipe for no template, template0/1
        or the alias itself; a live snapshot of a virtual template."""
        if template is None or template in SERVER_DATABASES or template in self.config.databases:
            if template in self.config.databases:
                alias = template
            return None, alias
        tdb = self._dbs.get(template)
        if tdb is None:
            raise TaidonError(f'template database "{template}" does not exist', sqlstate="3D000")
        inst = self._running(tdb)
        if inst is None:
            # Stopped after its idle TTL (clone kept) or never started: start it, so what
            # is cloned is what its clients wrote.
            lease = await self.manager.acquire(tdb.route())
            self.manager.release(lease)
            inst = lease.instance
        await self._wait_unused(inst, f'source database "{template}"')
        snap = tdb.snapshot
        if snap is not None and snap[1] == inst.id and inst.last_active <= snap[2]:
            return snap[0], tdb.alias  # nobody connected since: same content
        taken = time.time()
        sid = await self._snapshot(inst, template)
        tdb.snapshot = (sid, inst.id, taken)
        return sid, tdb.alias

    async def _snapshot(self, inst: Instance, name: str) -> str:
        """A live snapshot of an idle instance as an (unnamed) state the registry owns."""
        row = await capture(
            self.store, self.runtime, inst, why=f"database {name}",
            label=f"template database {name}",
        )  # fmt: skip
        self._owned.add(row.id)
        log.info("virtual.template_snapshot", database=name, state=row.id[:12])
        return row.id

    # --- DROP DATABASE ----------------------------------------------------------------------

    async def drop(self, cmd: DropDatabase) -> list[str]:
        name = cmd.name
        async with self._lock:
            if name in self.config.databases:
                # The alias's own database: throw its shared instance away (like `sqlrs admin
                # reset`); the next connection gets a fresh one, so `db:drop` + `db:create`
                # starts over from the recipe.
                await self._drop_alias(name, cmd.force)
                return []
            vdb = self._dbs.get(name)
            if vdb is None:
                if cmd.if_exists:
                    return [f'database "{name}" does not exist, skipping']
                raise TaidonError(f'database "{name}" does not exist', sqlstate="3D000")
            inst = self._running(vdb)
            if inst is not None and not cmd.force:
                await self._wait_unused(inst, f'database "{name}"')
            await self._discard(vdb, "dropped")
            log.info("virtual.dropped", database=name)
        return []

    async def _drop_alias(self, alias: str, force: bool) -> None:
        key = InstanceKey.recipe(alias, DEFAULT_LABEL)
        inst = self._running_by_key(key)
        if inst is not None and not force:
            await self._wait_unused(inst, f'database "{alias}"')
        await self._remove_instance(key)

    async def _discard(self, vdb: VirtualDatabase, reason: str) -> None:
        await self._remove_instance(vdb.key)
        self._dbs.pop(vdb.name, None)
        await self._remove_unused_states()
        log.info("virtual.discarded", database=vdb.name, reason=reason)

    async def _remove_instance(self, key: InstanceKey) -> None:
        """Its server (its clients get 57P01) and its clone, running or kept after its idle
        TTL or a restart: the manager's reset of that shared key."""
        await self.manager.reset(key)

    async def _remove_unused_states(self) -> None:
        used = {v.state_id for v in self._dbs.values()} | {
            v.snapshot[0] for v in self._dbs.values() if v.snapshot is not None
        }
        live = {i.state_id for i in self.manager.instances.values()}
        for sid in sorted(self._owned - used - live):
            self._owned.discard(sid)
            try:
                await self.store.remove_state(sid)
            except Exception:  # the evictor gets it later; the drop itself succeeded
                log.exception("virtual.state_remove_failed", state=sid[:12])

    # --- instances --------------------------------------------------------------------------

    def _running_by_key(self, key: InstanceKey) -> Instance | None:
        return next(
            (i for i in self.manager.instances.values() if i.key == key and not i.stopping), None
        )

    def _running(self, vdb: VirtualDatabase) -> Instance | None:
        """Its instance with a server (None: not started, or stopped with its clone kept)."""
        return self._running_by_key(vdb.key)

    async def _wait_unused(self, inst: Instance, what: str) -> None:
        """Wait (as Postgres does, up to 5 s) for other sessions to leave; else 55006."""
        deadline = time.monotonic() + IN_USE_WAIT_S
        while inst.leases and not inst.stopping:
            if time.monotonic() >= deadline:
                raise _in_use(what, len(inst.leases))
            await asyncio.sleep(IN_USE_POLL_S)

    async def close(self) -> None:
        """At shutdown, before the manager's close (which keeps shared clones): the registry
        is not kept, so neither are its databases' clones, nor snapshots made for templates."""
        async with self._lock:
            for vdb in list(self._dbs.values()):
                await self._discard(vdb, "shutdown")
